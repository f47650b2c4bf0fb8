"""Gated attention (prefill and split-KV decode) vs the fp32 twins under the Triton CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from qwen35c.backends.triton.attention import attention_decode, attention_prefill, naive

# Bounds ~10x the worst measured over the test grid (1 and 2 threads), the measured value beside each.
TOL = {torch.float32: 5e-6, torch.float16: 3e-3}  # measured 4.2e-7 / 3.5e-4


def rel_err(out, ref, floor=1e-6):
    return ((out.float() - ref.float()).pow(2).mean().sqrt() / max(ref.float().pow(2).mean().sqrt().item(), floor)).item()


def make(b, t, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).to(dtype)
    k = torch.randn(b, t, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, t, hkv, d, generator=g).to(dtype)
    gate = (2 * torch.randn(b, t, hq, d, generator=g)).to(dtype)
    return q, k, v, gate


def test_naive_prefill_matches_sdpa():
    q, k, v, gate = make(2, 9, 4, 2, 32, torch.float32, 0)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        is_causal=True).transpose(1, 2) * torch.sigmoid(gate)
    assert torch.allclose(naive.attention_prefill(q, k, v, gate), ref, atol=2e-6)  # measured max |diff| 1.2e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 1, 2, 1, 64), (1, 63, 4, 2, 64), (2, 65, 2, 2, 32),
                                          (1, 129, 4, 1, 32), (1, 33, 2, 1, 256)])
def test_prefill(b, t, hq, hkv, d, dtype):
    q, k, v, gate = make(b, t, hq, hkv, d, dtype, t + hq)
    out = attention_prefill(q, k, v, gate)
    ref = naive.attention_prefill(q, k, v, gate)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_prefill_strided_q_and_gate():
    # q and gate are interleaved per head in one projection [B, T, H, 2D]
    g = torch.Generator().manual_seed(5)
    qg = torch.randn(1, 40, 4, 128, generator=g)
    q, gate = qg[..., :64], qg[..., 64:]
    k = torch.randn(1, 40, 2, 64, generator=g)
    v = torch.randn(1, 40, 2, 64, generator=g)
    assert rel_err(attention_prefill(q, k, v, gate), naive.attention_prefill(q, k, v, gate)) < 2e-6  # 1.3e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,splits", [(4, 1, 64, 1), (8, 2, 32, 3), (2, 2, 256, 2)])
def test_decode_matches_prefill_last_token(hq, hkv, d, splits, dtype):
    # per-sequence lengths 1, 63, 65, 129 in one batch; a cache longer than any of them
    lens = [1, 63, 65, 129]
    b, s_max = len(lens), 140
    g = torch.Generator().manual_seed(hq * d + splits)
    k_cache = torch.randn(b, hkv, s_max, d, generator=g).to(dtype)
    v_cache = torch.randn(b, hkv, s_max, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    gate = torch.randn(b, hq, d, generator=g).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    out = attention_decode(q, k_cache, v_cache, kv_lens, gate, num_splits=splits)
    ref = naive.attention_decode(q, k_cache, v_cache, kv_lens, gate)
    assert out.shape == q.shape and rel_err(out, ref) < TOL[dtype]
    # decode == the last row of a causal prefill over the same tokens
    for i, n in enumerate(lens):
        qs = torch.zeros(1, n, hq, d, dtype=dtype)
        qs[0, -1] = q[i]
        gs = torch.zeros(1, n, hq, d, dtype=dtype)
        gs[0, -1] = gate[i]
        pre = naive.attention_prefill(qs, k_cache[i, :, :n].transpose(0, 1)[None], v_cache[i, :, :n].transpose(0, 1)[None], gs)
        assert rel_err(out[i], pre[0, -1]) < TOL[dtype]


def test_decode_empty_sequence_gives_zeros():
    k = torch.randn(2, 1, 16, 32)
    q = torch.randn(2, 2, 32)
    out = attention_decode(q, k, k, torch.tensor([0, 5], dtype=torch.int32), torch.ones(2, 2, 32), num_splits=2)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    assert rel_err(out[1], naive.attention_decode(q, k, k, torch.tensor([0, 5]), torch.ones(2, 2, 32))[1]) < 2e-6  # 1.1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (2, 1, 32)])
def test_prefill_on_a_cache(hq, hkv, d, dtype):
    """A prompt on top of a KV cache (chunked prefill, multi-token steps): rows at different q_start
    (0, 1, 63, 65, 0) with different lengths (1, 64, 63, 0, 0 of T = 64) attend to the cache up to
    their own position; the twin agrees with a whole causal prefill over the concatenated tokens; a
    row with no keys at all gives zeros."""
    starts, lens, t, s_max = [0, 1, 63, 65, 0], [1, 64, 63, 0, 0], 64, 160
    b = len(starts)
    g = torch.Generator().manual_seed(hq * d)
    k_cache = torch.randn(b, hkv, s_max, d, generator=g).to(dtype)
    v_cache = torch.randn(b, hkv, s_max, d, generator=g).to(dtype)
    q = torch.randn(b, t, hq, d, generator=g).to(dtype)
    gate = torch.randn(b, t, hq, d, generator=g).to(dtype)
    q_start = torch.tensor(starts, dtype=torch.int32)
    kv_lens = q_start + torch.tensor(lens, dtype=torch.int32)
    out = attention_prefill(q, k_cache, v_cache, gate, q_start=q_start, kv_lens=kv_lens)
    ref = naive.attention_prefill(q, k_cache, v_cache, gate, q_start=q_start, kv_lens=kv_lens)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for i, (s, n) in enumerate(zip(starts, lens)):
        assert rel_err(out[i, :n], ref[i, :n]) < TOL[dtype] if n else s or out[i].abs().max() == 0  # 2.6e-7 / 3.0e-4
        if n:   # the valid rows are the last n rows of a causal prefill over positions 0..s+n-1
            qs = torch.cat([torch.zeros(1, s, hq, d, dtype=dtype), q[i:i + 1, :n]], dim=1)
            gs = torch.cat([torch.zeros(1, s, hq, d, dtype=dtype), gate[i:i + 1, :n]], dim=1)
            whole = naive.attention_prefill(qs, k_cache[i, :, :s + n].transpose(0, 1)[None],
                                            v_cache[i, :, :s + n].transpose(0, 1)[None], gs)
            assert rel_err(ref[i, :n], whole[0, s:]) < 1e-6   # measured 0 (a BLAS may order the sums otherwise)
