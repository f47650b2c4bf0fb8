"""Partial rotate-half RoPE, optionally fused after the per-head zero-centred q/k RMSNorm.

The fusion pays: the norm reads each head once anyway, and RoPE then needs no second pass over
memory (one load + one store of q or k instead of two of each).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qwen35c.backends.triton.rope import naive


@triton.jit
def rope_kernel(
    x_ptr, w_ptr, pos_ptr, inv_freq_ptr, y_ptr,
    H, D, stride_xt, stride_xh, eps,
    ROTARY_DIM: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token t, head block): y[t, h, :] = rope(norm?(x[t, h, :])); y is contiguous [T, H, D]."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    ok = (heads < H)[:, None] & (dims < D)[None, :]
    rotary = dims < ROTARY_DIM
    partner = tl.where(dims < HALF, dims + HALF, dims - HALF)
    row = x_ptr + t * stride_xt + heads.to(tl.int64)[:, None] * stride_xh
    x = tl.load(row + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(row + partner[None, :], mask=ok & rotary[None, :], other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=rotary, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * (1.0 + w[None, :])
        xp = xp * rstd[:, None] * (1.0 + wp[None, :])
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freq = tl.load(inv_freq_ptr + (dims % HALF), mask=rotary, other=0.0).to(tl.float32)
    angle = pos * freq
    sign = tl.where(dims < HALF, -1.0, 1.0)
    rotated = x * tl.cos(angle)[None, :] + sign[None, :] * xp * tl.sin(angle)[None, :]
    y = tl.where(rotary[None, :], rotated, x)
    out = y_ptr + (t * H + heads.to(tl.int64))[:, None] * D + dims[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=32)
def _inv_freq(theta: float, rotary_dim: int, device: str) -> torch.Tensor:
    return naive.inv_freq(theta, rotary_dim, torch.device(device))


def rope_config(num_heads: int, head_dim: int) -> dict:
    return dict(BLOCK_H=min(triton.next_power_of_2(num_heads), 8), BLOCK_D=triton.next_power_of_2(head_dim),
                num_warps=4)


def _launch(x, weight, positions, theta, rotary_dim, eps, has_norm):
    *lead, h, d = x.shape
    assert x.stride(-1) == 1 and rotary_dim % 2 == 0 and rotary_dim <= d
    assert tuple(positions.shape) == tuple(lead), "one position per token"
    x3 = x.reshape(-1, h, d)  # a view for the usual strided layouts (q inside the q|gate projection)
    t = x3.shape[0]
    pos = positions.reshape(-1).contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    freqs = _inv_freq(float(theta), int(rotary_dim), str(x.device))
    cfg = rope_config(h, d)
    grid = (t, triton.cdiv(h, cfg["BLOCK_H"]))
    rope_kernel[grid](x3, weight if weight is not None else freqs, pos, freqs, y, h, d,
                      x3.stride(0), x3.stride(1), eps, ROTARY_DIM=rotary_dim, HAS_NORM=has_norm, **cfg)
    return y


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Partial rotate-half RoPE (see naive.rope). x [..., H, D] (heads may be strided), positions [...] int."""
    return _launch(x, None, positions, theta, rotary_dim, 0.0, False)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, theta: float,
                 rotary_dim: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-head zero-centred RMSNorm fused with partial RoPE (see naive.qk_norm_rope)."""
    assert weight.shape == (x.shape[-1],)
    return _launch(x, weight, positions, theta, rotary_dim, eps, True)
