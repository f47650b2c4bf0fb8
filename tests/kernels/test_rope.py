"""Partial RoPE (and the fused q/k norm + RoPE) vs the fp32 twins under the Triton CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from qwen35c.backends.triton.rope import naive, qk_norm_rope, rope

# Bounds ~10x the worst measured over the test grid (1 and 2 threads), the measured value beside each.
# fp16 measured 0 (kernel and twin round the same fp32 values); 1e-5 allows a few last-bit flips.
TOL = {torch.float32: 6e-7, torch.float16: 1e-5}  # measured 5.2e-8 / 0


def rel_err(out, ref, floor=1e-6):
    return ((out.float() - ref.float()).pow(2).mean().sqrt() / max(ref.float().pow(2).mean().sqrt().item(), floor)).item()


def test_naive_rope_matches_rotate_half_formula():
    # independent check of the twin: HF-style rotate_half with cos/sin over the first R dims
    x = torch.randn(5, 2, 16)
    pos = torch.tensor([0, 1, 7, 100, 3])
    r = 8
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2).float() / r))
    emb = torch.cat([pos[:, None].float() * inv] * 2, -1)[:, None, :]
    xr = x[..., :r]
    rot = torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], -1)
    ref = torch.cat([xr * emb.cos() + rot * emb.sin(), x[..., r:]], -1)
    assert torch.allclose(naive.rope(x, pos, 10000.0, r), ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 8, 256), (63, 2, 64), (65, 3, 32), (129, 1, 16)])
def test_rope(tokens, heads, head_dim, dtype):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    pos = torch.randint(0, 5000, (tokens,), generator=g, dtype=torch.int32)
    rotary = head_dim // 4
    out = rope(x, pos, 10_000_000.0, rotary)
    ref = naive.rope(x, pos, 10_000_000.0, rotary)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out[..., rotary:], x[..., rotary:])  # pass-through dims untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_rope_on_strided_q(dtype):
    # q is the first half of each head of the q|gate projection [B, T, H, 2D]
    g = torch.Generator().manual_seed(3)
    b, t, h, d = 2, 33, 4, 64
    qg = torch.randn(b, t, h, 2 * d, generator=g).to(dtype)
    q = qg[..., :d]
    w = (0.1 * torch.randn(d, generator=g)).to(dtype)
    pos = torch.arange(t, dtype=torch.int32).repeat(b, 1) + torch.tensor([[0], [17]], dtype=torch.int32)
    out = qk_norm_rope(q, w, pos, 10_000_000.0, d // 4, eps=1e-6)
    ref = naive.qk_norm_rope(q, w, pos, 10_000_000.0, d // 4, eps=1e-6)
    assert out.shape == q.shape and rel_err(out, ref) < TOL[dtype]


def test_position_zero_is_identity():
    x = torch.randn(3, 2, 32)
    out = rope(x, torch.zeros(3, dtype=torch.int32), 10000.0, 8)
    assert torch.allclose(out, x, atol=1e-7)
