"""FP8 block-128 GEMM (weights 128x128 blocks, activations 1x128 dynamic groups) and its quantizer.

Numerics: acc += dot(a_fp8, w_fp8) * a_scale[m, kb] * w_scale_inv[nb, kb] per 128-wide K block, in
fp32. Both scales are *multiplied* to dequantize. The fp8 operands go to the MMA as loaded (fp8 -> MMA
is exact); everything else is widened to fp32 right after its load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35c.backends.triton.gemm.dense import tile_coords

FP8_MAX = 448.0
FP8_BLOCK = 128
ACT_QUANT_ROWS = 32     # tokens a program of fp8_act_quant_kernel


@triton.jit
def round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest E4M3 value, ties to even, in fp32 arithmetic.

    The spacing of E4M3 values at x is 2^(e - 3) with e = max(exponent(x), -6) (subnormals below
    2^-6); x / spacing is exact and is rounded to an integer by the 1.5 * 2^23 trick (RNE).
    """
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    spacing = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = x / spacing
    return ((y + 12582912.0) - 12582912.0) * spacing


@triton.jit
def fp8_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
    GROUP: tl.constexpr, ROWS: tl.constexpr, EMULATE_E4M3: tl.constexpr = False,
):
    """One program per (ROWS tokens, 128-group): s = max(amax, 1e-10)/448 per token, q = clamp(x/s,
    +-448) as E4M3. ROWS tokens a program keep a program's work above a warp's on the GPU and cut the
    programs the CPU interpreter runs one after another (~0.1 ms an op each) by ROWS."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)
    scale = amax / 448.0
    q = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    if EMULATE_E4M3:
        q = round_to_e4m3(q)   # an fp32 q buffer holding E4M3 values (the interpreter's fp8 stores are wrong)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + rows * stride_sm + g, scale, mask=row_ok)


@triton.jit
def fp8_block_gemm_kernel(
    a_ptr, a_s_ptr, w_ptr, w_s_ptr, y_ptr,
    M, N, K,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    a_s_rows = a_s_ptr + rows.to(tl.int64) * stride_asm
    w_s_cols = w_s_ptr + (cols // 128) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = (kb * BLOCK_K + ks) < K
        a = tl.load(a_rows + (kb * BLOCK_K + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + (kb * BLOCK_K + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_s = tl.load(a_s_rows + kb, mask=row_ok, other=0.0).to(tl.float32)
        w_s = tl.load(w_s_cols + kb, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.dot(a, b.to(a.dtype)) * a_s[:, None] * w_s[None, :]   # fp8 x fp8; fp32 x widened fp8 (interpreter)
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fp8_dynamic_gemm_kernel(
    x_ptr, w_ptr, w_s_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_wsn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EMULATE_E4M3: tl.constexpr = False,
):
    """fp8_act_quant_kernel fused into fp8_block_gemm_kernel: each program quantizes the 1x128 groups of
    its rows as it loads them (the same s, q and rounding), so no E4M3 activation tensor exists between
    two kernels: one launch a linear (a TensorRT AOT plugin is one kernel). The row groups are quantized
    once per column tile: cheap at decode sizes, redundant work in a long prefill."""
    BLOCK_K: tl.constexpr = 128
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    w_s_cols = w_s_ptr + (cols // 128) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = (kb * BLOCK_K + ks) < K
        x = tl.load(x_rows + (kb * BLOCK_K + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        a_s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / 448.0
        q = tl.minimum(tl.maximum(x / a_s[:, None], -448.0), 448.0)
        if EMULATE_E4M3:
            a = round_to_e4m3(q)                         # fp32 holding E4M3 values (the interpreter)
        else:
            a = q.to(tl.float8e4nv)
        b = tl.load(w_cols + (kb * BLOCK_K + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_s = tl.load(w_s_cols + kb, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.dot(a, b.to(a.dtype)) * a_s[:, None] * w_s[None, :]
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fp8_dynamic_expert_gemv_kernel(
    x_ptr, e_ptr, w_ptr, w_s_ptr, y_ptr, N, K,
    BLOCK_N: tl.constexpr, EMULATE_E4M3: tl.constexpr = False,
):
    """One routed slot per program row: y[s] = x[s] @ W[e[s]]^T over stacked FP8 block-128 experts
    W [E, N, K] (scales [E, N/128, K/128]), x[s]'s 1x128 groups quantized as loaded (as
    fp8_dynamic_gemm_kernel). Grid (slots, cdiv(N, BLOCK_N)): a mat-vec per slot, the decode shape of MoE."""
    BLOCK_K: tl.constexpr = 128
    slot = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    kb_count = tl.cdiv(K, BLOCK_K)
    expert = tl.load(e_ptr + slot).to(tl.int64)
    w_cols = w_ptr + expert * N * K + cols.to(tl.int64)[None, :] * K
    w_s_cols = w_s_ptr + expert * tl.cdiv(N, 128) * kb_count + (cols // 128) * kb_count
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(0, kb_count):
        k_ok = (kb * BLOCK_K + ks) < K
        x = tl.load(x_ptr + slot * K + kb * BLOCK_K + ks, mask=k_ok, other=0.0).to(tl.float32)
        a_s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-10) / 448.0
        q = tl.minimum(tl.maximum(x / a_s, -448.0), 448.0)
        if EMULATE_E4M3:
            a = round_to_e4m3(q)
        else:
            a = q.to(tl.float8e4nv).to(tl.float32)
        b = tl.load(w_cols + (kb * BLOCK_K + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_s = tl.load(w_s_cols + kb, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * b.to(tl.float32), axis=0) * a_s * w_s
    tl.store(y_ptr + slot * N + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


def fp8_gemm_config(m: int) -> dict:
    if m <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    # BLOCK_N 64: 128 x 128 spilled 16 bytes on sm_89; 128 x 64 needs 173/147/146 registers on sm_89/90/100
    return dict(BLOCK_M=128, BLOCK_N=64, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_quantize_activations(x: torch.Tensor, group_size: int = FP8_BLOCK, emulate: bool = False):
    """x [M, K] -> (q [M, K] float8_e4m3fn, s [M, ceil(K/128)] fp32). With `emulate`, q is fp32
    holding the E4M3 values (rounded in fp32 arithmetic: the CPU interpreter's fp8 stores are wrong)."""
    assert group_size == FP8_BLOCK and x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty(m, k, dtype=torch.float32 if emulate else torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    fp8_act_quant_kernel[(triton.cdiv(m, ACT_QUANT_ROWS), groups)](
        x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0),
        GROUP=group_size, ROWS=ACT_QUANT_ROWS, EMULATE_E4M3=emulate, num_warps=8)
    return q, s


def fp8_block_linear(x_q, x_scale, weight, weight_scale_inv, out_dtype=torch.bfloat16):
    """y [M, N] = (x_q * x_scale) @ (weight * weight_scale_inv).T; weight [N, K] fp8, scales fp32."""
    m, k = x_q.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x_scale.shape == (m, triton.cdiv(k, FP8_BLOCK))
    assert weight_scale_inv.shape == (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK))
    assert x_scale.stride(1) == 1 and weight_scale_inv.stride(1) == 1
    y = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    cfg = fp8_gemm_config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    fp8_block_gemm_kernel[grid](
        x_q, x_scale, weight, weight_scale_inv, y, m, n, k,
        x_q.stride(0), x_scale.stride(0), weight.stride(0), weight_scale_inv.stride(0), y.stride(0), **cfg)
    return y


def fp8_linear(x, weight, weight_scale_inv):
    """Dynamic 1x128 activation quantization (separate small kernel), then the block GEMM."""
    x_q, x_scale = fp8_quantize_activations(x)
    return fp8_block_linear(x_q, x_scale, weight, weight_scale_inv, out_dtype=x.dtype)
