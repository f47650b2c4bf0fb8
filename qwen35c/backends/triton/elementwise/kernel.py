"""SwiGLU and the KV-cache write: one load and one store per element, fp32 in between."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(
    g_ptr, u_ptr, y_ptr, N, stride_g, stride_u, stride_y,
    BLOCK_N: tl.constexpr,
):
    """Program (row, column block): y = SiLU(g) * u = g * sigmoid(g) * u."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def kv_cache_write_kernel(
    src_ptr, cache_ptr, q_start_ptr, lengths_ptr,   # src [B*T, H, D]; cache [B, H, S, D] (any strides)
    T, H, stride_st, stride_sh, stride_cb, stride_ch, stride_cs,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (token b*T + t, head block): cache[b, h, q_start[b] + t] = src[b*T + t, h] when t < lengths[b]."""
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    heads_here = tl.where(t < tl.load(lengths_ptr + b).to(tl.int64), H, 0)   # a padded token writes nothing
    ok = (heads < heads_here)[:, None] & (dims < HEAD_DIM)[None, :]
    x = tl.load(src_ptr + bt * stride_st + heads.to(tl.int64)[:, None] * stride_sh + dims[None, :], mask=ok,
                other=0.0)
    pos = tl.load(q_start_ptr + b).to(tl.int64) + t
    out = cache_ptr + b * stride_cb + heads.to(tl.int64)[:, None] * stride_ch + pos * stride_cs + dims[None, :]
    tl.store(out, x.to(cache_ptr.dtype.element_ty), mask=ok)


def swiglu_config(n: int) -> dict:
    return dict(BLOCK_N=min(1024, triton.next_power_of_2(n)), num_warps=4)


def kv_cache_write_config(heads: int, head_dim: int) -> dict:
    return dict(BLOCK_H=min(8, triton.next_power_of_2(heads)), HEAD_DIM=head_dim, num_warps=4)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [M, N] (unit stride along N) -> SiLU(gate) * up [M, N] in gate.dtype."""
    assert gate.shape == up.shape and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1
    m, n = gate.shape
    y = torch.empty(m, n, dtype=gate.dtype, device=gate.device)
    cfg = swiglu_config(n)
    swiglu_kernel[(m, triton.cdiv(n, cfg["BLOCK_N"]))](gate, up, y, n, gate.stride(0), up.stride(0), y.stride(0),
                                                       **cfg)
    return y


def kv_cache_write(src: torch.Tensor, cache: torch.Tensor, q_start: torch.Tensor, lengths: torch.Tensor) -> None:
    """src [B, T, H, D] (unit stride along D; rows of H heads may be strided) into cache [B, H, S, D] at
    positions q_start[b] + t for t < lengths[b]; nothing else of the cache is touched."""
    b, t, h, d = src.shape
    assert cache.shape[0] == b and cache.shape[1] == h and cache.shape[3] == d and cache.stride(3) == 1
    assert src.stride(3) == 1 and src.stride(0) == t * src.stride(1)
    cfg = kv_cache_write_config(h, d)
    kv_cache_write_kernel[(b * t, triton.cdiv(h, cfg["BLOCK_H"]))](
        src, cache, q_start, lengths, t, h, src.stride(1), src.stride(2),
        cache.stride(0), cache.stride(1), cache.stride(2), **cfg)
