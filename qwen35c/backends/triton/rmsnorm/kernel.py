"""Row-wise RMSNorm kernels: zero-centred (optionally fused with the residual add) and gated (GDN)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr,
    N, stride_x, stride_res, stride_y, stride_res_out, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row per program. y = h * rsqrt(mean(h^2) + eps) * (1 + w), h = x (+ residual)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        stored = h.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, stored, mask=ok)
        h = stored.to(tl.float32)  # normalise exactly the residual that was stored
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (h * rstd * (1.0 + w)).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gated_rmsnorm_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr,
    ROWS, N, eps,
    ROWS_PER_PROG: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """ROWS_PER_PROG contiguous head rows [*, N] per program: y = x * rstd * w * SiLU(z)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS_PER_PROG + tl.arange(0, ROWS_PER_PROG)
    cols = tl.arange(0, BLOCK_N)
    ok = (rows < ROWS)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :] * (z * tl.sigmoid(z))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def rmsnorm_config(n: int) -> dict:
    block = triton.next_power_of_2(n)
    return dict(BLOCK_N=block, num_warps=max(1, min(8, block // 256)))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Zero-centred RMSNorm over the last dim; with `residual` returns (y, x + residual)."""
    assert x.stride(-1) == 1 and weight.shape == (x.shape[-1],)
    x2 = _rows(x)
    n = x2.shape[1]
    y = torch.empty_like(x)
    y2 = y.view(-1, n)
    if residual is not None:
        r2 = _rows(residual)
        res_out = torch.empty_like(x)
        ro2 = res_out.view(-1, n)
    else:
        r2 = ro2 = res_out = x2
    cfg = rmsnorm_config(n)
    rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, weight, y2, ro2, n, x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, **cfg)
    return (y, res_out) if residual is not None else y


def gated_rmsnorm_config(n: int) -> dict:
    block = triton.next_power_of_2(n)
    return dict(ROWS_PER_PROG=max(1, 2048 // block), BLOCK_N=block, num_warps=4)


def gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """GDN gated norm per head over the last dim dv: y = rmsnorm(x) * w * SiLU(gate)."""
    assert x.shape == gate.shape and weight.shape == (x.shape[-1],)
    x2 = x.contiguous().view(-1, x.shape[-1])
    z2 = gate.contiguous().view(-1, x.shape[-1])
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, n = x2.shape
    cfg = gated_rmsnorm_config(n)
    grid = (triton.cdiv(rows, cfg["ROWS_PER_PROG"]),)
    gated_rmsnorm_kernel[grid](x2, z2, weight, y, rows, n, eps, **cfg)
    return y
