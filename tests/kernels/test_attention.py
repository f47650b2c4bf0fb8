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
