"""Grouped expert GEMMs over quantized stacked experts: FP8 block-128 (dynamic 1x128 activations) and
INT4 weight-only group-wise, the same expert-sorted slot layout as `kernel.py` (moe_align).

Weight layouts (per expert e, the dense kernel's [E, 2I, H] / [E, H, I] with the gemm package's formats):
  FP8   w13 float8_e4m3fn [E, 2I, H], s13 fp32 [E, 2 * ceil(I/128), ceil(H/128)]: gate_proj's 128x128
        blocks, then up_proj's (each projection quantized on its own, as the checkpoint's linears are);
        w2 [E, H, I], s2 [E, ceil(H/128), ceil(I/128)]. Activations: x (gate|up) quantized per token and
        the SwiGLU output (down) per slot row, 1x128 groups, by fp8_act_quant; dequantize by multiplying.
  INT4  w13 uint8 [E, 2I, H/2] (low nibble = even k), s13 fp32 [E, 2I, H/g]; w2 uint8 [E, H, I/2],
        s2 [E, H, I/g]; symmetric (zero point 8). BLOCK_K divides g.
Per K tile: fp32 partial dot products, scaled and accumulated in fp32, as in the dense FP8 / INT4 GEMMs.
Twins: `naive.moe_experts` on the dequantized weights (with the activations fake-quantized for FP8).
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen35c.backends.triton.moe.kernel import moe_align, sorted_block


@triton.jit
def _weight_tile(w_ptr, s_ptr, expert, rows, cols, ks, row_ok, k_ok, stride_we, stride_wn, stride_se, stride_sn,
                 k0, s_row0, FORMAT: tl.constexpr, GROUP: tl.constexpr):
    """W[e, rows, k0 + ks]^T as [BLOCK_K, BLOCK_N] fp32 and its per-column scale [BLOCK_N] for this K tile.
    FP8 scales: block row s_row0 + cols // 128 (cols: the row within its projection); INT4: per weight row."""
    mask = k_ok[:, None] & row_ok[None, :]
    base = w_ptr + expert * stride_we + rows.to(tl.int64)[None, :] * stride_wn
    if FORMAT == "fp8":
        w = tl.load(base + (k0 + ks)[:, None], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + expert * stride_se + (s_row0 + cols // 128) * stride_sn + k0 // 128, mask=row_ok,
                    other=0.0).to(tl.float32)
    else:
        packed = tl.load(base + ((k0 + ks) // 2)[:, None], mask=mask, other=0)
        w = (((packed.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 0xF) - 8).to(tl.float32)
        s = tl.load(s_ptr + expert * stride_se + rows.to(tl.int64) * stride_sn + k0 // GROUP, mask=row_ok,
                    other=0.0).to(tl.float32)
    return w, s


@triton.jit
def moe_gate_up_q_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, y_ptr,
    H, INTER, NUM_SLOTS, TOP_K, GATE_SCALE_ROWS,
    stride_xm, stride_xsm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
    FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """As moe_gate_up_kernel, weights FP8 / INT4: y[p, c] = SiLU(x_t Wg[e, c]) * (x_t Wu[e, c]).
    FP8: x holds E4M3 codes (or fp32 E4M3 values) with xs [tokens, ceil(H/128)] scales."""
    positions, slots, slot_ok, expert, active = sorted_block(sorted_ptr, block_expert_ptr, num_padded_ptr,
                                                             NUM_SLOTS, BLOCK_M)
    pid_n = tl.program_id(1)
    tokens = (slots // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H * active, BLOCK_K):
        k_ok = (k0 + ks) < H
        a = tl.load(x_ptr + tokens[:, None] * stride_xm + (k0 + ks)[None, :], mask=slot_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        wg, sg = _weight_tile(w_ptr, s_ptr, expert, cols, cols, ks, col_ok, k_ok, stride_we, stride_wn, stride_se,
                              stride_sn, k0, 0, FORMAT, GROUP)
        wu, su = _weight_tile(w_ptr, s_ptr, expert, cols + INTER, cols, ks, col_ok, k_ok, stride_we, stride_wn,
                              stride_se, stride_sn, k0, GATE_SCALE_ROWS, FORMAT, GROUP)
        if FORMAT == "fp8":
            a_s = tl.load(xs_ptr + tokens * stride_xsm + k0 // 128, mask=slot_ok, other=0.0).to(tl.float32)
            a = a.to(x_ptr.dtype.element_ty)
            acc_gate += tl.dot(a, wg.to(a.dtype)) * a_s[:, None] * sg[None, :]
            acc_up += tl.dot(a, wu.to(a.dtype)) * a_s[:, None] * su[None, :]
        else:
            a = a.to(x_ptr.dtype.element_ty)
            acc_gate += tl.dot(a, wg.to(a.dtype)) * sg[None, :]
            acc_up += tl.dot(a, wu.to(a.dtype)) * su[None, :]
    y = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out = y_ptr + positions.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def moe_down_q_kernel(
    a_ptr, as_ptr, w_ptr, s_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, topk_w_ptr, y_ptr,
    H, INTER, NUM_SLOTS,
    stride_am, stride_asm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
    FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """As moe_down_kernel (routing weight fused, scattered to slot order), weights FP8 / INT4."""
    positions, slots, slot_ok, expert, active = sorted_block(sorted_ptr, block_expert_ptr, num_padded_ptr,
                                                             NUM_SLOTS, BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, INTER * active, BLOCK_K):
        k_ok = (k0 + ks) < INTER
        a = tl.load(a_ptr + positions.to(tl.int64)[:, None] * stride_am + (k0 + ks)[None, :],
                    mask=slot_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w, s = _weight_tile(w_ptr, s_ptr, expert, cols, cols, ks, col_ok, k_ok, stride_we, stride_wn, stride_se,
                            stride_sn, k0, 0, FORMAT, GROUP)
        a = a.to(a_ptr.dtype.element_ty)
        if FORMAT == "fp8":
            a_s = tl.load(as_ptr + positions.to(tl.int64) * stride_asm + k0 // 128, mask=slot_ok, other=0.0).to(tl.float32)
            acc += tl.dot(a, w.to(a.dtype)) * a_s[:, None] * s[None, :]
        else:
            acc += tl.dot(a, w.to(a.dtype)) * s[None, :]
    acc = acc * tl.load(topk_w_ptr + slots, mask=slot_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + slots.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


def quantized_expert_config(num_slots: int, fmt: str, group: int = 128) -> dict:
    """BLOCK_K = 128 for FP8 (one scale block per K tile), a divisor of the group for INT4."""
    if num_slots <= 1024:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    cfg["BLOCK_K"] = 128 if fmt == "fp8" else min(cfg["BLOCK_K"], group)
    return cfg


def moe_experts_quantized(x, w13, s13, w2, s2, weights, ids, fmt: str, group: int = 128, emulate_fp8: bool = False):
    """Routed experts with quantized weights (layouts in the module docstring): y [N, k, H] in x.dtype.
    FP8 quantizes x and the SwiGLU output per row with fp8_act_quant (`emulate_fp8`: fp32 E4M3 values)."""
    import torch

    from qwen35c.backends.triton.gemm.fp8 import fp8_quantize_activations

    n, k = ids.shape
    hidden, inter = x.shape[1], w13.shape[1] // 2
    cfg = quantized_expert_config(n * k, fmt, group)
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    sorted_slots, block_expert, num_padded = moe_align(ids, w13.shape[0], cfg["BLOCK_M"])
    capacity = sorted_slots.numel()
    xq, xs = fp8_quantize_activations(x, emulate=emulate_fp8) if fmt == "fp8" else (x, x)
    act = torch.empty(capacity, inter, dtype=x.dtype, device=x.device)
    moe_gate_up_q_kernel[(capacity // cfg["BLOCK_M"], triton.cdiv(inter, cfg["BLOCK_N"]))](
        xq, xs, w13, s13, sorted_slots, block_expert, num_padded, act, hidden, inter, n * k, k,
        triton.cdiv(inter, 128), xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), s13.stride(0),
        s13.stride(1), act.stride(0), FORMAT=fmt, GROUP=group, **cfg, **launch)
    aq, as_ = fp8_quantize_activations(act, emulate=emulate_fp8) if fmt == "fp8" else (act, act)
    y = torch.empty(n * k, hidden, dtype=x.dtype, device=x.device)
    moe_down_q_kernel[(capacity // cfg["BLOCK_M"], triton.cdiv(hidden, cfg["BLOCK_N"]))](
        aq, as_, w2, s2, sorted_slots, block_expert, num_padded, weights.reshape(-1).contiguous(), y, hidden, inter,
        n * k, aq.stride(0), as_.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), y.stride(0),
        FORMAT=fmt, GROUP=group, **cfg, **launch)
    return y.view(n, k, hidden)


__all__ = ["moe_down_q_kernel", "moe_experts_quantized", "moe_gate_up_q_kernel", "quantized_expert_config"]
