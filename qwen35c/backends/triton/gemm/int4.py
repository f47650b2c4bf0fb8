"""INT4 weight-only GEMM (W4A16), group 128 along K, dequantized inside the kernel.

Per K tile (BLOCK_K divides the group, so a tile lies in one group) the kernel computes
dot(x, q - z) with q - z a small integer (exact in bf16/fp16) and multiplies the fp32 partial product by
the group scale: y = sum_groups s[n, g] * sum_{k in g} x[m, k] (q[n, k] - z[n, g]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35c.backends.triton.gemm.dense import tile_coords


@triton.jit
def int4_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
    GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    qw_cols = qw_ptr + cols.to(tl.int64)[None, :] * stride_qn
    shift = ((ks % 2) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        packed = tl.load(qw_cols + (kk // 2)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
        q = ((packed.to(tl.int32) >> shift) & 0xF).to(tl.float32)          # [BLOCK_K, BLOCK_N]
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + cols.to(tl.int64) * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + cols.to(tl.int64) * stride_zn + g, mask=col_ok, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 8.0, dtype=tl.float32)
        w = q - zero[None, :]                                               # integers in [-15, 15]
        part = tl.dot(a.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty))
        acc += part * scale[None, :]
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def int4_gemm_config(m: int) -> dict:
    if m <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    # BLOCK_N 64: 128 x 128 spilled 336 bytes on sm_100; 128 x 64 needs 186/186/177/235 registers on sm_80/89/90/100
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def int4_linear(x, qweight, scales, zeros=None, group_size: int = 128):
    """y [M, N] = x @ ((q - z) * s).T; layouts in the package docstring. Output in x.dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2) and k % group_size == 0
    assert scales.shape == (n, k // group_size)
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1
    if zeros is not None:
        assert zeros.dtype == torch.uint8 and zeros.shape == scales.shape and zeros.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = int4_gemm_config(m)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    z = zeros if zeros is not None else qweight
    int4_gemm_kernel[grid](
        x, qweight, scales, z, y, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), z.stride(0), y.stride(0),
        GROUP_SIZE=group_size, HAS_ZERO=zeros is not None, **cfg)
    return y
