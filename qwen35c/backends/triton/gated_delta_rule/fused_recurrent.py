"""Token-by-token gated delta rule in Triton, for decode (T = 1) and short speculative runs.

One program per (sequence, value head, V block) keeps its [K, BV] slice of the state in registers
for the whole run and writes it back in place at the end; optionally it also stores the state after
every token so a speculative verifier can roll back to any accepted prefix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import check_gdn_inputs


@triton.jit
def gdn_fused_recurrent_fwd_kernel(
    q, k, v, g, beta, A_log, dt_bias,      # q, k [T_all, H, K]; v [T_all, HV, V]; g, beta [T_all, HV]
    o, h0, ht, hs,                         # o [T_all, HV, V]; h0, ht [N, HV, K, V] fp32; hs [T_all, HV, K, V]
    cu_seqlens, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_DT_BIAS: tl.constexpr,
    USE_BETA_SIGMOID: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    STORE_STEP_STATES: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_state = o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S = tl.load(h0 + i_nh * K * V + p_state, mask=m_state, other=0).to(tl.float32)
    if USE_GATE:
        b_neg_A = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if USE_DT_BIAS:
            b_dt = tl.load(dt_bias + i_hv).to(tl.float32)

    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (t * HV + i_hv) * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_g = tl.load(g + t * HV + i_hv).to(tl.float32)
        b_b = tl.load(beta + t * HV + i_hv).to(tl.float32)
        if USE_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, axis=0) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, axis=0) + 1e-6)
        b_q = b_q * scale
        if USE_GATE:
            if USE_DT_BIAS:
                b_g = b_g + b_dt
            b_g = b_neg_A * (tl.maximum(b_g, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b_g))))
        if USE_BETA_SIGMOID:
            b_b = tl.sigmoid(b_b)

        b_S = b_S * tl.exp(b_g)
        b_u = b_b * (b_v - tl.sum(b_S * b_k[:, None], axis=0))      # the delta: target minus prediction
        b_S = b_S + b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_S * b_q[:, None], axis=0)                    # read after the update
        tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_STEP_STATES:
            tl.store(hs + (t * HV + i_hv) * K * V + p_state, b_S, mask=m_state)

    if STORE_FINAL_STATE:
        tl.store(ht + i_nh * K * V + p_state, b_S, mask=m_state)


RECURRENT_NUM_WARPS = 4


def recurrent_block_sizes(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): the whole key dim per program, V in blocks of up to 32 (more programs for small decode batches)."""
    return triton.next_power_of_2(K), min(32, triton.next_power_of_2(V))


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    inplace_final_state: bool = True,
    output_step_states: bool = False,
):
    """Gated delta rule token by token (decode, speculative verification), state updated in place.

    Arguments as `chunk_gated_delta_rule`, plus:
        inplace_final_state: when initial_state is given (it must then be contiguous fp32), write the
            final state into it and return it as final_state. Otherwise final_state is a new tensor,
            returned only when output_final_state.
        output_step_states: also return step_states [B, T, HV, K, V] fp32, the state after each token
            (token-aligned like the inputs; with cu_seqlens B = 1 and T is the packed length), for rollback.
    Returns:
        (o [B, T, HV, V] in v.dtype, final_state [N, HV, K, V] fp32 or None), with step_states appended
        when output_step_states.
    """
    N, H, HV, K, V = check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log)
    B, T = q.shape[:2]
    BK, BV = recurrent_block_sizes(K, V)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))

    in_place = initial_state is not None and inplace_final_state
    if in_place:
        if initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError("an in-place state must be contiguous fp32; pass inplace_final_state=False otherwise")
        h0 = final_state = initial_state
    else:
        h0 = initial_state.contiguous() if initial_state is not None else None
        final_state = (torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device)
                       if output_final_state else None)
    o = torch.empty_like(v)
    step_states = (torch.empty(B, T, HV, K, V, dtype=torch.float32, device=q.device)
                   if output_step_states else None)
    gdn_fused_recurrent_fwd_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, v, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g,
        o, h0 if h0 is not None else o, final_state if final_state is not None else o,
        step_states if step_states is not None else o,
        cu_seqlens if cu_seqlens is not None else g, scale, T,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
        USE_L2NORM=use_qk_l2norm_in_kernel, USE_GATE=use_gate_in_kernel, USE_DT_BIAS=dt_bias is not None,
        USE_BETA_SIGMOID=use_beta_sigmoid_in_kernel, USE_INITIAL_STATE=h0 is not None,
        STORE_FINAL_STATE=final_state is not None, STORE_STEP_STATES=step_states is not None,
        IS_VARLEN=cu_seqlens is not None,
        num_warps=RECURRENT_NUM_WARPS, num_stages=1,
    )
    if output_step_states:
        return o, final_state, step_states
    return o, final_state
