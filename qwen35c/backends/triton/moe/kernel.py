"""MoE kernels: routing, expert-sorted grouped GEMMs (gate|up with SwiGLU fused, down with the routing
weight fused) and the weighted combine with the shared expert.

Token permutation (`moe_align`) is a few torch ops on the device, with no host sync: the slots
(token n, choice j) -> flat id n*k + j are sorted by expert, each expert's segment is padded to a multiple
of BLOCK_M with the sentinel N*k, and `block_expert[b]` names the expert of row block b. The grid is
sized for the worst case; blocks past `num_padded` do no work. Experts with zero tokens get no blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35c.backends.triton.gemm.dense import linear


@triton.jit
def moe_route_kernel(
    logits_ptr, w_out_ptr, id_out_ptr, N, E, stride_l,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
):
    """ROWS tokens per program: p = softmax(logits) (fp32), top-k by repeated argmax, w = p_top / sum."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + rows[:, None] * stride_l + experts[None, :],
                     mask=row_ok[:, None] & (experts < E)[None, :], other=float("-inf")).to(tl.float32)
    logits = tl.where(row_ok[:, None], logits, 0.0)
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where((experts < E)[None, :], p, -1.0)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(p, axis=1)
        best_p = tl.max(p, axis=1)
        top_w = tl.where(slots[None, :] == j, best_p[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, best[:, None].to(tl.int32), top_i)
        p = tl.where(experts[None, :] == best[:, None], -1.0, p)
    top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out = rows[:, None] * TOP_K + slots[None, :]
    ok = row_ok[:, None] & (slots < TOP_K)[None, :]
    tl.store(w_out_ptr + out, top_w, mask=ok)
    tl.store(id_out_ptr + out, top_i, mask=ok)


@triton.jit
def sorted_block(sorted_ptr, block_expert_ptr, num_padded_ptr, NUM_SLOTS, BLOCK_M: tl.constexpr):
    """Program axis 0's block of expert-sorted positions (moe_align's layout): (positions, slots,
    slot_ok, expert, active); padding positions and blocks past num_padded are not ok / not active."""
    pid_m = tl.program_id(0)
    num_padded = tl.load(num_padded_ptr)
    active = (pid_m * BLOCK_M < num_padded).to(tl.int32)
    positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ptr + positions)
    slot_ok = (slots < NUM_SLOTS) & (positions < num_padded)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return positions, slots, slot_ok, expert, active


@triton.jit
def moe_gate_up_kernel(
    x_ptr, w_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, y_ptr,
    H, INTER, NUM_SLOTS, TOP_K,
    stride_xm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, column block of I): y[p, c] = SiLU(x_t W_gate[e, c]) * (x_t W_up[e, c]) for the
    padded sorted position p holding slot s (token t = s // TOP_K) of expert e."""
    positions, slots, slot_ok, expert, active = sorted_block(sorted_ptr, block_expert_ptr, num_padded_ptr,
                                                             NUM_SLOTS, BLOCK_M)
    pid_n = tl.program_id(1)
    tokens = (slots // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens[:, None] * stride_xm
    w_gate = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn
    w_up = w_gate + INTER * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = H * active
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + ks) < H
        a = tl.load(x_rows + (k0 + ks)[None, :], mask=slot_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        wg = tl.load(w_gate + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        wu = tl.load(w_up + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        a = a.to(x_ptr.dtype.element_ty)
        acc_gate = tl.dot(a, wg.to(x_ptr.dtype.element_ty), acc_gate)  # MMA in the activation dtype
        acc_up = tl.dot(a, wu.to(x_ptr.dtype.element_ty), acc_up)
    y = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out = y_ptr + positions.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def moe_down_kernel(
    a_ptr, w_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, topk_w_ptr, y_ptr,
    H, INTER, NUM_SLOTS,
    stride_am, stride_we, stride_wn, stride_ym,
    HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, column block of H): y[s, c] = w_s * sum_i a[p, i] W_down[e, c, i], scattered back
    to slot order (s = sorted[p])."""
    positions, slots, slot_ok, expert, active = sorted_block(sorted_ptr, block_expert_ptr, num_padded_ptr,
                                                             NUM_SLOTS, BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + positions.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = INTER * active
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + ks) < INTER
        a = tl.load(a_rows + (k0 + ks)[None, :], mask=slot_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(w_cols + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a.to(a_ptr.dtype.element_ty), b.to(a_ptr.dtype.element_ty), acc)
    if HAS_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + slots, mask=slot_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + slots.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def moe_combine_kernel(
    y_ptr, shared_ptr, gate_ptr, out_ptr, H, stride_gate,
    TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (token, column block): out = sum_j y[n*k + j] (+ sigmoid(gate[n]) * shared[n]), fp32 sum."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (n * TOP_K + j) * H + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHARED:
        g = tl.load(gate_ptr + n * stride_gate).to(tl.float32)
        acc += tl.sigmoid(g) * tl.load(shared_ptr + n * H + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def route_config(num_experts: int, top_k: int) -> dict:
    block_e = triton.next_power_of_2(num_experts)
    return dict(BLOCK_K=max(2, triton.next_power_of_2(top_k)), BLOCK_E=block_e, ROWS=max(1, 1024 // block_e),
                num_warps=4)


def expert_gemm_config(num_slots: int) -> dict:
    if num_slots <= 1024:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def moe_route(logits: torch.Tensor, top_k: int):
    """See naive.moe_route. logits [N, E] -> (weights [N, k] fp32, ids [N, k] int32)."""
    n, e = logits.shape
    assert logits.stride(1) == 1 and top_k <= e
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=logits.device)
    cfg = route_config(e, top_k)
    moe_route_kernel[(triton.cdiv(n, cfg["ROWS"]),)](logits, weights, ids, n, e, logits.stride(0), TOP_K=top_k, **cfg)
    return weights, ids


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort slots by expert and pad each expert to block_m rows (device ops only, no host sync).

    ids [N, k] -> (sorted_slots [P] int32 with sentinel N*k in padding, block_expert [P/block_m] int32,
    num_padded [1] int32), P = the worst-case padded length for these shapes.
    """
    flat = ids.reshape(-1).to(torch.int64)
    num_slots = flat.numel()
    device = ids.device
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    count_start = torch.cumsum(counts, 0) - counts
    dest = (padded_end - padded)[expert_of] + torch.arange(num_slots, device=device) - count_start[expert_of]
    capacity = triton.cdiv(num_slots + min(num_experts, num_slots) * (block_m - 1), block_m) * block_m
    sorted_slots = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[dest] = order.to(torch.int32)
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).clamp_max(num_experts - 1)
    return sorted_slots, block_expert.to(torch.int32), padded_end[-1:].to(torch.int32)


def _expert_mlp(x, w13, w2, sorted_slots, block_expert, num_padded, top_k, topk_weights, out_dtype):
    """Grouped gate|up (SwiGLU) then down over expert-sorted rows; returns y_slots [N*k, H]."""
    num_slots = x.shape[0] * top_k
    hidden = x.shape[1]
    inter = w2.shape[2]
    cfg = expert_gemm_config(num_slots)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    capacity = sorted_slots.numel()
    act = torch.empty(capacity, inter, dtype=x.dtype, device=x.device)
    grid = (capacity // cfg["BLOCK_M"], triton.cdiv(inter, cfg["BLOCK_N"]))
    moe_gate_up_kernel[grid](x, w13, sorted_slots, block_expert, num_padded, act, hidden, inter, num_slots, top_k,
                             x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), **tiles, **launch)
    y = torch.empty(num_slots, hidden, dtype=out_dtype, device=x.device)
    grid = (capacity // cfg["BLOCK_M"], triton.cdiv(hidden, cfg["BLOCK_N"]))
    weights = topk_weights.reshape(-1) if topk_weights is not None else act
    moe_down_kernel[grid](act, w2, sorted_slots, block_expert, num_padded, weights, y, hidden, inter, num_slots,
                          act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
                          HAS_WEIGHT=topk_weights is not None, **tiles, **launch)
    return y


def moe_experts(x, w13, w2, weights, ids):
    """See naive.moe_experts; returns y [N, k, H] in x.dtype (weighted expert outputs per slot)."""
    n, k = ids.shape
    assert w13.shape[0] == w2.shape[0] and w13.shape[1] == 2 * w2.shape[2] and w13.shape[2] == x.shape[1]
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    cfg = expert_gemm_config(n * k)
    sorted_slots, block_expert, num_padded = moe_align(ids, w13.shape[0], cfg["BLOCK_M"])
    y = _expert_mlp(x, w13, w2, sorted_slots, block_expert, num_padded, k, weights.contiguous(), x.dtype)
    return y.view(n, k, x.shape[1])


def shared_expert(x, w13, w2):
    """See naive.shared_expert: the same grouped kernels with one expert and every token routed to it."""
    n = x.shape[0]
    cfg = expert_gemm_config(n)
    capacity = triton.cdiv(n, cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    sorted_slots = torch.full((capacity,), n, dtype=torch.int32, device=x.device)
    sorted_slots[:n] = torch.arange(n, dtype=torch.int32, device=x.device)
    block_expert = torch.zeros(capacity // cfg["BLOCK_M"], dtype=torch.int32, device=x.device)
    num_padded = torch.tensor([capacity], dtype=torch.int32, device=x.device)
    return _expert_mlp(x, w13[None], w2[None], sorted_slots, block_expert, num_padded, 1, None, x.dtype)


def moe_combine(y_slots, shared=None, shared_gate_logit=None):
    """See naive.moe_combine. y_slots [N, k, H] contiguous."""
    n, k, h = y_slots.shape
    y_slots = y_slots.contiguous()
    out_dtype = shared.dtype if shared is not None else y_slots.dtype
    out = torch.empty(n, h, dtype=out_dtype, device=y_slots.device)
    has_shared = shared is not None
    gate = shared_gate_logit.reshape(n, -1) if has_shared else y_slots.view(n, -1)
    block_h = min(1024, triton.next_power_of_2(h))
    moe_combine_kernel[(n, triton.cdiv(h, block_h))](
        y_slots, shared.contiguous() if has_shared else y_slots, gate, out, h, gate.stride(0),
        TOP_K=k, HAS_SHARED=has_shared, BLOCK_H=block_h, num_warps=4)
    return out


def moe_forward(x, router_w, w13, w2, top_k, shared_w13=None, shared_w2=None, shared_gate_w=None):
    """See naive.moe_forward: router GEMM, routing, experts, shared expert + gate, combine."""
    logits = linear(x, router_w)
    weights, ids = moe_route(logits, top_k)
    y = moe_experts(x, w13, w2, weights, ids)
    if shared_w13 is None:
        return moe_combine(y)
    shared = shared_expert(x, shared_w13, shared_w2)
    gate = linear(x, shared_gate_w)
    return moe_combine(y, shared, gate)
