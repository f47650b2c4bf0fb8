"""RTN, AWQ and GPTQ on single matrices with structured calibration inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def _upper_cholesky_of_inverse_naive(h, damp):
    """The textbook formula, out of place (the twin of algorithms._upper_cholesky_of_inverse)."""
    mean_diag = float(torch.diag(h).mean())
    for attempt in range(6):
        damped = h + (damp * (10 ** attempt)) * mean_diag * torch.eye(h.shape[0])
        chol, info = torch.linalg.cholesky_ex(damped.double())
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return upper.float()
    raise ValueError("not positive definite")


def test_gptq_factorisation_in_place_equals_the_textbook_formula_to_the_bit():
    from qwen35c.quant.algorithms import _upper_cholesky_of_inverse

    g = torch.Generator().manual_seed(0)
    for k, rows, shift in [(64, 1000, 0.0), (256, 100, 0.0), (512, 4096, 0.0), (128, 5, 0.0), (96, 64, 0.05)]:
        x = torch.randn(rows, k, generator=g) * torch.rand(k, generator=g) * 5
        h = 2 / rows * (x.t() @ x)
        h.diagonal().sub_(shift * float(h.diagonal().mean()))     # indefinite: the damping retries
        for damp in (0.01, 1e-9):
            ours, twin = _outcome(_upper_cholesky_of_inverse, h, damp), _outcome(_upper_cholesky_of_inverse_naive, h, damp)
            assert type(ours) is type(twin) and (isinstance(ours, str) or torch.equal(ours, twin)), (k, damp)


def _outcome(factorise, h, damp):
    try:
        return factorise(h, damp)
    except ValueError:
        return "not positive definite"


_FACTOR_PEAK = """
import json, sys, torch
from pathlib import Path
from qwen35c.quant.algorithms import _upper_cholesky_of_inverse
torch.set_num_threads(1)
k = 4096
x = torch.randn(2 * k, k, generator=torch.Generator().manual_seed(0))
h = x.t() @ x / (2 * k)
del x
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")
base = rss("VmRSS")
_upper_cholesky_of_inverse(h, 0.01)
print(json.dumps({"growth": rss("VmHWM") - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_gptq_factorisation_holds_one_float64_copy_of_the_hessian():
    """K = 4096: one float64 matrix is 128 MiB (and the float32 result 64 MiB); the out-of-place
    chain held four and an identity, and LAPACK calls on a row-major matrix copy it."""
    out = subprocess.run([sys.executable, "-c", _FACTOR_PEAK], capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    one = 4096 * 4096 * 8
    assert growth < 1.75 * one, f"the factorisation grew RSS by {growth / 2**20:.0f} MiB (one float64 copy: 128 MiB)"
