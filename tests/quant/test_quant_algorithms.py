"""RTN, AWQ and GPTQ on single matrices with structured calibration inputs."""

from __future__ import annotations

import torch

from qwen35c.quant.algorithms import awq, gptq, rtn
from qwen35c.quant.recipe import parse_scheme


def _problem(n=64, k=256, rows=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    # correlated activations with a few salient channels (what AWQ and GPTQ exploit)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, ::31] *= 12.0
    return w, x


def _out_err(w, x, q):
    ref = x @ w.t()
    return float((ref - x @ q.effective_weight().t()).norm() / ref.norm())


def test_gptq_and_awq_beat_rtn():
    w, x = _problem()
    for symmetric in (True, False):
        base = _out_err(w, x, rtn(w, parse_scheme("int4-rtn", symmetric=symmetric)))
        e_gptq = _out_err(w, x, gptq(w, x, parse_scheme("int4-gptq", symmetric=symmetric)))
        e_awq = _out_err(w, x, awq(w, x, parse_scheme("int4-awq", symmetric=symmetric)))
        assert e_gptq < 0.8 * base, (symmetric, e_gptq, base)
        assert e_awq < 0.9 * base, (symmetric, e_awq, base)


def test_gptq_with_identity_hessian_is_rtn():
    w, _ = _problem(k=256)
    recipe = parse_scheme("int4-gptq", damp=0.0)
    q = gptq(w, None, recipe, hessian=torch.eye(256))
    r = rtn(w, recipe)
    assert torch.equal(q.qweight, r.qweight) and torch.allclose(q.scales, r.scales)


def test_gptq_act_order():
    w, x = _problem()
    base = _out_err(w, x, gptq(w, x, parse_scheme("int4-gptq")))
    static = gptq(w, x, parse_scheme("int4-gptq", act_order=True))
    assert static.g_idx is None                                    # static groups keep the plain layout
    dynamic = gptq(w, x, parse_scheme("int4-gptq", act_order=True, static_groups=False))
    assert dynamic.g_idx is not None and dynamic.g_idx.shape == (256,)
    assert torch.bincount(dynamic.g_idx.long()).tolist() == [128, 128]
    for q in (static, dynamic):
        assert _out_err(w, x, q) < 1.15 * base


def test_gptq_dead_columns_and_awq_pre_scale():
    w, x = _problem()
    x[:, 5] = 0.0
    q = gptq(w, x, parse_scheme("int4-gptq"))
    assert torch.isfinite(q.scales).all()
    a = awq(w, x, parse_scheme("int4-awq"))
    assert a.pre_scale is not None and a.pre_scale.shape == (256,) and bool((a.pre_scale > 0).all())
    # the packed matrix encodes W / pre_scale: the effective weight approximates W
    assert float((a.effective_weight() - w).norm() / w.norm()) < 0.2


def test_gptq_in_row_chunks_is_the_whole_matrix_gptq(monkeypatch):
    """GPTQ runs in row chunks (a 248K-row LM head): rows are independent given H, so the codes,
    scales, zeros and g_idx are bit-identical to one chunk, for plain, static and dynamic act-order."""
    import dataclasses

    from qwen35c.quant import algorithms

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen) * torch.linspace(0.1, 3.0, 128)
    x[:, 7] = 0.0                                                                       # a dead column
    for options in ({}, {"act_order": True}, {"act_order": True, "static_groups": False}, {"symmetric": False}):
        recipe = dataclasses.replace(parse_scheme("int4-gptq", group_size=32), **options)
        whole = gptq(w, x, recipe)
        monkeypatch.setattr(algorithms, "_GPTQ_CHUNK_BYTES", 4 * 128 * 7)            # 7 rows a chunk
        chunked = gptq(w, x, recipe)
        monkeypatch.undo()
        for part in ("qweight", "scales", "zeros", "g_idx"):
            a, b = getattr(whole, part), getattr(chunked, part)
            assert (a is None and b is None) or torch.equal(a, b), (options, part)
