"""Gated softmax attention: flash-style causal GQA prefill, and split-KV decode over a KV cache.

Softmax is online in base 2 (scores * scale * log2 e, exp2). MMA operands are the storage dtype
(q, k, v exactly as loaded; the probabilities rounded to it, as HF's eager path does); the
accumulator, max and sum are fp32. The output gate out * sigmoid(gate) is applied before the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attn_prefill_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, start_ptr, kv_lens_ptr,
    T, HQ, GROUP,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_gb, stride_gt, stride_gh,
    stride_ob, stride_ot, stride_oh, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (query block, batch*q-head). qk_scale = D^-0.5 * log2(e).

    Query t of row b sits at position start[b] + t and attends to key positions <= its own and
    < kv_lens[b] (k/v hold positions 0.. of the row: a KV cache with this step's keys written, or
    this step's keys alone with start = 0). A row with no keys writes zeros.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = h // GROUP
    start = tl.load(start_ptr + b).to(tl.int32)
    n_kv = tl.load(kv_lens_ptr + b).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < T
    q_rows = q_ptr + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qt + dims[None, :]
    q = tl.load(q_rows, mask=row_ok[:, None], other=0.0).to(tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    hi = tl.minimum(n_kv, start + (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_kv
        k = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kt + dims[:, None], mask=col_ok[None, :],
                    other=0.0).to(tl.float32)                                              # [D, BLOCK_N]
        s = tl.dot(q.to(q_ptr.dtype.element_ty), k.to(k_ptr.dtype.element_ty)) * qk_scale
        allowed = (cols[None, :] <= start + rows[:, None]) & col_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vt + dims[None, :], mask=col_ok[:, None],
                    other=0.0).to(tl.float32)                                              # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v_ptr.dtype.element_ty), v.to(v_ptr.dtype.element_ty))
        m_i = m_new
    gate = tl.load(g_ptr + b * stride_gb + h * stride_gh + rows.to(tl.int64)[:, None] * stride_gt + dims[None, :],
                   mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * tl.sigmoid(gate)
    o_rows = o_ptr + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_ot + dims[None, :]
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def attn_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, part_o_ptr, part_lse_ptr,
    HKV, GROUP, NUM_SPLITS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (batch*kv-head, split): the GROUP query heads of one kv head over one slice of the cache.

    Writes the normalised partial output [B, Hq, NUM_SPLITS, D] and its log2-sum-exp [B, Hq, NUM_SPLITS]
    (fp32); an empty slice writes o = 0, lse = -inf.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = pid % HKV
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    heads = hk * GROUP + g
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads.to(tl.int64)[:, None] * stride_qh + dims[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32)
    n_kv = tl.load(lens_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(n_kv, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(n_kv, lo + per_split)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_ks + dims[:, None], mask=col_ok[None, :],
                    other=0.0).to(tl.float32)
        s = tl.dot(q.to(q_ptr.dtype.element_ty), k.to(k_ptr.dtype.element_ty)) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None],
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_ptr.dtype.element_ty), v.to(v_ptr.dtype.element_ty))
        m_i = m_new
    nonempty = l_i > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = (b * HKV * GROUP + heads.to(tl.int64)) * NUM_SPLITS + split
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=g_ok[:, None])
    tl.store(part_lse_ptr + row, lse, mask=g_ok)


@triton.jit
def attn_decode_combine_kernel(
    part_o_ptr, part_lse_ptr, g_ptr, o_ptr,
    HQ, NUM_SPLITS, stride_gb, stride_gh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (batch*q-head): merge the splits by their log-sum-exp, then apply the sigmoid gate."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    top = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        lse = tl.load(part_lse_ptr + bh * NUM_SPLITS + s0 + splits, mask=s0 + splits < NUM_SPLITS,
                      other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, lse)
    top_all = tl.max(top, axis=0)
    top_all = tl.where(top_all == float("-inf"), 0.0, top_all)
    total = 0.0
    out = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        w = tl.exp2(tl.load(part_lse_ptr + bh * NUM_SPLITS + split).to(tl.float32) - top_all)
        total += w
        out += w * tl.load(part_o_ptr + (bh * NUM_SPLITS + split) * HEAD_DIM + dims).to(tl.float32)
    out = out / tl.where(total > 0, total, 1.0)
    gate = tl.load(g_ptr + b * stride_gb + h * stride_gh + dims).to(tl.float32)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + dims, (out * tl.sigmoid(gate)).to(o_ptr.dtype.element_ty))


def prefill_config(head_dim: int) -> dict:
    # sm_90, D=256: 186 registers, no spills (BLOCK_M=128 or 4 warps spill)
    return dict(BLOCK_M=64, BLOCK_N=32 if head_dim > 128 else 64, num_warps=8, num_stages=2)


def decode_config(group: int) -> dict:
    return dict(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=64, num_warps=4, num_stages=2)


def decode_num_splits(batch: int, kv_heads: int, max_len: int, block_n: int = 64, target_programs: int = 256) -> int:
    """Enough splits to fill the GPU (about `target_programs` programs) without slices under one block."""
    by_work = triton.cdiv(max_len, block_n)
    by_occupancy = triton.cdiv(target_programs, batch * kv_heads)
    return max(1, min(by_work, by_occupancy, 64))


def attention_prefill(q, k, v, gate, scale: float | None = None, q_start=None, kv_lens=None):
    """See naive.attention_prefill. Last dims must be unit-stride; q/gate may be views into one projection.
    Without q_start, k/v are this step's [B, T, Hkv, D]; with q_start and kv_lens (int tensors on q's
    device), KV caches [B, Hkv, S, D] already holding this step's keys."""
    b, t, hq, d = q.shape
    cached = q_start is not None
    hkv = k.shape[1] if cached else k.shape[2]
    assert hq % hkv == 0 and k.shape == v.shape and gate.shape == q.shape
    assert (k.shape[0], k.shape[3]) == (b, d) if cached else k.shape == (b, t, hkv, d)
    assert d == triton.next_power_of_2(d) and all(x.stride(-1) == 1 for x in (q, k, v, gate))
    if not cached:
        q_start = torch.zeros(b, dtype=torch.int32, device=q.device)
        kv_lens = torch.full((b,), t, dtype=torch.int32, device=q.device)
    # (b, t, h) strides of k / v: a cache is [B, Hkv, S, D]
    ks = (k.stride(0), k.stride(2), k.stride(1)) if cached else (k.stride(0), k.stride(1), k.stride(2))
    vs = (v.stride(0), v.stride(2), v.stride(1)) if cached else (v.stride(0), v.stride(1), v.stride(2))
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    cfg = prefill_config(d)
    grid = (triton.cdiv(t, cfg["BLOCK_M"]), b * hq)
    attn_prefill_kernel[grid](
        q, k, v, gate, out, q_start, kv_lens, t, hq, hq // hkv,
        q.stride(0), q.stride(1), q.stride(2), *ks, *vs, gate.stride(0), gate.stride(1), gate.stride(2),
        out.stride(0), out.stride(1), out.stride(2), scale * LOG2E, HEAD_DIM=d, **cfg)
    return out


def attention_decode(q, k_cache, v_cache, kv_lens, gate, scale: float | None = None, num_splits: int | None = None):
    """See naive.attention_decode. kv_lens is an int tensor on q's device (no host sync)."""
    b, hq, d = q.shape
    _, hkv, s_max, _ = k_cache.shape
    assert hq % hkv == 0 and v_cache.shape == k_cache.shape and gate.shape == q.shape and kv_lens.shape == (b,)
    assert all(x.stride(-1) == 1 for x in (q, k_cache, v_cache, gate))
    scale = d ** -0.5 if scale is None else scale
    group = hq // hkv
    cfg = decode_config(group)
    splits = num_splits or decode_num_splits(b, hkv, s_max, cfg["BLOCK_N"])
    part_o = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    attn_decode_split_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, kv_lens, part_o, part_lse, hkv, group, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), scale * LOG2E, HEAD_DIM=d, **cfg)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    attn_decode_combine_kernel[(b * hq,)](
        part_o, part_lse, gate, out, hq, splits, gate.stride(0), gate.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_S=64, num_warps=4)
    return out
