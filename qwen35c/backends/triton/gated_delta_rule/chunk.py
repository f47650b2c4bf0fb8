"""Chunked (prefill) gated delta rule in Triton: chunk 64, WY/UT transform, state carried across chunks.

Three kernels, read in call order:
  1. `gdn_chunk_prep_kernel`, parallel over (chunk, value head): activates the gates, takes the
     chunk-local cumsum gamma of g, builds L = strict_lower(beta_r (k_r . k_s) exp(gamma_r - gamma_s))
     and stores T = (I + L)^-1 (the UT transform, by forward substitution) for the chunk.
  2. `gdn_chunk_fwd_h_kernel`, one program per (sequence, value head, V block), sequential over the
     chunks of its sequence: stores the state S entering each chunk, then with the WY pair
     W = T (beta e^gamma K), U = T (beta V) forms V' = U - W S = T (beta V - (beta e^gamma K) S)
     and advances S <- e^gamma_C S + (K e^(gamma_C - gamma))^T V'.
  3. `gdn_chunk_fwd_o_kernel`, parallel over (chunk, value head, V block):
     O = (Q e^gamma) S + ((Q K^T) * Gamma) V'.
The output is a separate kernel because fusing it into (2) spills registers on sm_90 at K = 128.

Interpreter-safe by construction: every load is widened to fp32 at once, no libdevice, no block
pointers, no autotune, no cross-program waits (see notes/kernels-and-runtimes.md section 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_SIZE = 64
# fp32 operands on tensor cores (the interpreter computes every dot in full fp32). The prep kernel's
# k k^T feeds the triangular solve and gets tf32x3 (~fp32); the state/output dots get tf32, still finer
# than the bf16 operands FLA uses, because tf32x3 there spills registers on sm_90.
PREP_DOT_PRECISION = "tf32x3"
FWD_DOT_PRECISION = "tf32"


@triton.jit
def gdn_chunk_prep_kernel(
    k, g, beta, A_log, dt_bias,            # inputs: k [T_all, H, K]; g, beta [T_all, HV] (raw when activated here)
    G_out, beta_out, Ainv,                 # outputs fp32: gamma, beta [T_all, HV]; T = (I+L)^-1 [T_all, HV, BT]
    cu_seqlens, chunk_indices,             # [N+1]; [NC, 2] = (sequence, chunk within it)
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
    USE_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, USE_DT_BIAS: tl.constexpr,
    USE_BETA_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT

    o_t = tl.arange(0, BT)
    m_t = t0 + o_t < eos

    # gates: padded rows get g = 0 and beta = 0, so they touch neither outputs nor state
    b_g = tl.load(g + (t0 + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)
    if USE_GATE:
        if USE_DT_BIAS:
            b_g = b_g + tl.load(dt_bias + i_hv).to(tl.float32)
        b_softplus = tl.maximum(b_g, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b_g)))
        b_g = -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * b_softplus
        b_g = tl.where(m_t, b_g, 0.0)
    b_b = tl.load(beta + (t0 + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)
    if USE_BETA_SIGMOID:
        b_b = tl.where(m_t, tl.sigmoid(b_b), 0.0)
    b_G = tl.cumsum(b_g, axis=0)
    tl.store(G_out + (t0 + o_t) * HV + i_hv, b_G, mask=m_t)
    tl.store(beta_out + (t0 + o_t) * HV + i_hv, b_b, mask=m_t)

    # k k^T over key blocks of BK, so one [BT, BK] tile is live at a time (BK < K keeps the tf32x3
    # dot's split operands in registers on sm_80/89/100); the L2 norm scales rows and columns after.
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_ss = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        p_k = k + ((t0 + o_t) * H + i_h)[:, None] * K + o_k[None, :]
        b_k = tl.load(p_k, mask=m_t[:, None] & (o_k < K)[None, :], other=0).to(tl.float32)
        b_ss += tl.sum(b_k * b_k, axis=1)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    if USE_L2NORM:
        b_inv = tl.rsqrt(b_ss + 1e-6)
        b_kk = b_kk * b_inv[:, None] * b_inv[None, :]

    # L transposed: b_LT[s, r] = L[r, s] = beta_r (k_r . k_s) exp(gamma_r - gamma_s) for r > s.
    # Holding L^T lets each substitution step read row r of L as a column, with no layout change.
    m_upper = o_t[None, :] > o_t[:, None]
    b_decay = tl.exp(tl.where(m_upper, b_G[None, :] - b_G[:, None], 0.0))
    b_LT = tl.where(m_upper, b_b[None, :] * b_kk * b_decay, 0.0)

    # forward substitution, row by row: X[r, :] = e_r - sum_{s<r} L[r, s] X[s, :]
    b_X = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for r in range(1, BT):
        b_l = tl.sum(tl.where(o_t[None, :] == r, b_LT, 0.0), axis=1)       # L[r, s], indexed by s
        b_row = -tl.sum(b_l[:, None] * b_X, axis=0)                       # indexed by column
        b_row = b_row + tl.where(o_t == r, 1.0, 0.0)
        b_X = tl.where(o_t[:, None] == r, b_row[None, :], b_X)

    p_A = Ainv + ((t0 + o_t) * HV + i_hv)[:, None] * BT + o_t[None, :]
    tl.store(p_A, b_X, mask=m_t[:, None])


@triton.jit
def gdn_chunk_fwd_h_kernel(
    k, v, G, beta, Ainv,                   # k [T_all, H, K]; v [T_all, HV, V]; G, beta, Ainv from the prep kernel
    h, v_new, h0, ht,                      # h [NC, HV, K, V] state entering each chunk; v_new [T_all, HV, V]; h0, ht [N, HV, K, V]
    cu_seqlens, chunk_offsets,             # [N+1] token and chunk offsets of each sequence
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    NT = tl.cdiv(eos - bos, BT)
    c_off = tl.load(chunk_offsets + i_n).to(tl.int64)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V

    p_state = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
    m_state = m_k[:, None] & m_v[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S = tl.load(h0 + p_state, mask=m_state, other=0).to(tl.float32)

    for i_t in range(0, NT):
        t0 = bos + i_t * BT
        m_t = t0 + o_t < eos

        tl.store(h + ((c_off + i_t) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :], b_S, mask=m_state)

        p_k = k + ((t0 + o_t) * H + i_h)[:, None] * K + o_k[None, :]
        b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0).to(tl.float32)
        if USE_L2NORM:
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)[:, None]
        b_G = tl.load(G + (t0 + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)
        b_b = tl.load(beta + (t0 + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)
        p_A = Ainv + ((t0 + o_t) * HV + i_hv)[:, None] * BT + o_t[None, :]
        b_A = tl.load(p_A, mask=m_t[:, None], other=0).to(tl.float32)

        # WY form: v_new = U - W S with U = T (beta V), W = T (beta e^gamma K); applied as
        # T (beta V - (beta e^gamma K) S) so W [BT, BK] is never formed. v_new is the u_t of the recurrence.
        p_v = ((t0 + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0).to(tl.float32)
        b_kS = tl.dot(b_k * (b_b * tl.exp(b_G))[:, None], b_S, input_precision=DOT_PRECISION)
        b_vn = tl.dot(b_A, b_v * b_b[:, None] - b_kS, input_precision=DOT_PRECISION)
        tl.store(v_new + p_v, b_vn, mask=m_tv)

        # state update to the end of the chunk
        last = tl.minimum(eos - t0, BT) - 1
        b_G_last = tl.sum(tl.where(o_t == last, b_G, 0.0), axis=0)
        b_k_decayed = b_k * tl.exp(b_G_last - b_G)[:, None]
        b_S = b_S * tl.exp(b_G_last)
        b_S += tl.dot(tl.trans(b_k_decayed), b_vn, input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        tl.store(ht + p_state, b_S, mask=m_state)


@triton.jit
def gdn_chunk_fwd_o_kernel(
    q, k, G, h, v_new, o,                  # q, k [T_all, H, K]; G [T_all, HV]; h [NC, HV, K, V]; v_new, o [T_all, HV, V]
    cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    t0 = bos + i_t * BT

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = t0 + o_t < eos
    m_k = o_k < K
    m_v = o_v < V
    m_causal = o_t[:, None] >= o_t[None, :]

    p_qk = ((t0 + o_t) * H + i_h)[:, None] * K + o_k[None, :]
    m_qk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_qk, other=0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_qk, other=0).to(tl.float32)
    if USE_L2NORM:
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, axis=1) + 1e-6)[:, None]
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)[:, None]
    b_q = b_q * scale
    b_G = tl.load(G + (t0 + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)

    # intra-chunk causal part (diagonal included) + inter-chunk read of the state entering the chunk
    b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    m_P = m_causal & m_t[:, None]   # padded rows hold gamma = 0: keep their exp from overflowing
    b_P = tl.where(m_P, b_qk * tl.exp(tl.where(m_P, b_G[:, None] - b_G[None, :], 0.0)), 0.0)
    p_v = ((t0 + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_vn = tl.load(v_new + p_v, mask=m_tv, other=0).to(tl.float32)
    b_o = tl.dot(b_P, b_vn, input_precision=DOT_PRECISION)
    b_h = tl.load(h + (i_c * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0).to(tl.float32)
    b_o += tl.dot(b_q * tl.exp(b_G)[:, None], b_h, input_precision=DOT_PRECISION)
    tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)


# launch configs, chosen so that no kernel spills on sm_80/89/90/100 at K = V = 128 (see aot_specs)
PREP_NUM_WARPS = 4
# The prep kernel's key block: 16 (8 dots at K = 128) takes sm_80/89/90/100 to 148/168/152/179
# registers, no spill; the whole key dim in one block (BK = 128) spilled 360-1072 bytes on
# sm_80/89/100 with tf32x3, 32 left sm_80 at exactly 255.
PREP_BK = 16
FWD_H_NUM_WARPS = 8
FWD_O_NUM_WARPS = 8


def chunk_block_sizes(K: int, V: int) -> tuple[int, int, int]:
    """(BK, BV_h, BV_o): the whole key dim in one block (tl.dot needs >= 16); V blocks of 16 for the
    sequential state kernel (registers, and more programs), 32 for the output kernel."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, 16, max(16, min(32, triton.next_power_of_2(V)))


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk_indices [NC, 2] int32 rows (sequence, chunk within it), chunk_offsets [N+1] int32).

    Reads cu_seqlens on the host (one sync per call).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [triton.cdiv(length, chunk_size) for length in lengths]
    rows = [(n, c) for n, count in enumerate(counts) for c in range(count)]
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    device = cu_seqlens.device
    return (torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 2),
            torch.tensor(offsets, dtype=torch.int32, device=device))


def check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log):
    """Shape validation shared by the chunked and recurrent entry points; returns (N, H, HV, K, V)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B, T = {B}, {T}, got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    if HV % H:
        raise ValueError(f"value heads ({HV}) must be a multiple of key heads ({H}): head j reads q/k head j // (HV // H)")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}, got {tuple(x.shape)}")
    if K > 256 or V > 256:
        raise ValueError(f"head dims up to 256 are supported, got K={K}, V={V}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with batch size 1, got B={B}; flatten the batch first")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None and initial_state.shape != (N, HV, K, V):
        raise ValueError(f"initial_state must be [N, HV, K, V] = {(N, HV, K, V)} (one row per sequence), "
                         f"got {tuple(initial_state.shape)}")
    if use_gate_in_kernel and A_log is None:
        raise ValueError("use_gate_in_kernel=True needs A_log [HV] (g then holds the raw `a` projection)")
    return N, H, HV, K, V


def chunk_gated_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences (prefill), chunked by 64.

    Args:
        q, k: [B, T, H, K]. Value head j reads q/k head j // (HV // H) (repeat_interleave order).
        v: [B, T, HV, V].
        g: [B, T, HV] log-decay (<= 0), fp32. With use_gate_in_kernel it is the raw `a` projection
            and g = -exp(A_log) * softplus(a + dt_bias) is computed in the kernel.
        beta: [B, T, HV]; with use_beta_sigmoid_in_kernel the raw `b`, and beta = sigmoid(b).
        scale: query scale, default K ** -0.5.
        initial_state: [N, HV, K, V] fp32, N = B or the number of packed sequences. Not modified.
        output_final_state: also return the state after the last token, [N, HV, K, V] fp32.
        use_qk_l2norm_in_kernel: q, k <- x * rsqrt(sum(x^2) + 1e-6) before use.
        cu_seqlens: [N+1] int32/int64 cumulative lengths of sequences packed in a batch of 1.
        A_log, dt_bias: [HV], used only with use_gate_in_kernel.
    Returns:
        (o [B, T, HV, V] in v.dtype, final_state [N, HV, K, V] fp32 or None)
    """
    N, H, HV, K, V = check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log)
    B, T = q.shape[:2]
    BT = CHUNK_SIZE
    BK, BV_h, BV_o = chunk_block_sizes(K, V)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    device = q.device

    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
        nt = triton.cdiv(T, BT)
        chunk_indices = torch.stack([torch.arange(B, dtype=torch.int32, device=device).repeat_interleave(nt),
                                     torch.arange(nt, dtype=torch.int32, device=device).repeat(B)], dim=1)
        chunk_offsets = torch.arange(0, (B + 1) * nt, nt, dtype=torch.int32, device=device)
    else:
        chunk_indices, chunk_offsets = prepare_chunk_indices(cu_seqlens, BT)
    NC = chunk_indices.shape[0]
    common = dict(H=H, HV=HV, K=K, BT=BT, BK=BK, USE_L2NORM=use_qk_l2norm_in_kernel)

    G = torch.empty(B, T, HV, dtype=torch.float32, device=device)
    beta_act = torch.empty(B, T, HV, dtype=torch.float32, device=device)
    Ainv = torch.empty(B, T, HV, BT, dtype=torch.float32, device=device)
    if NC > 0:
        gdn_chunk_prep_kernel[(NC, HV)](
            k, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g,
            G, beta_act, Ainv, cu_seqlens, chunk_indices,
            USE_GATE=use_gate_in_kernel, USE_DT_BIAS=dt_bias is not None,
            USE_BETA_SIGMOID=use_beta_sigmoid_in_kernel, DOT_PRECISION=PREP_DOT_PRECISION,
            **{**common, "BK": min(PREP_BK, BK)},
            num_warps=PREP_NUM_WARPS, num_stages=1,
        )

    h = torch.empty(NC, HV, K, V, dtype=torch.float32, device=device)
    v_new = torch.empty(B, T, HV, V, dtype=torch.float32, device=device)
    final_state = torch.empty(N, HV, K, V, dtype=torch.float32, device=device) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    gdn_chunk_fwd_h_kernel[(triton.cdiv(V, BV_h), N * HV)](
        k, v, G, beta_act, Ainv, h, v_new,
        h0 if h0 is not None else h, final_state if final_state is not None else h,
        cu_seqlens, chunk_offsets,
        V=V, BV=BV_h, USE_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=final_state is not None,
        DOT_PRECISION=FWD_DOT_PRECISION, **common,
        num_warps=FWD_H_NUM_WARPS, num_stages=1,
    )
    o = torch.empty_like(v)
    if NC > 0:
        gdn_chunk_fwd_o_kernel[(triton.cdiv(V, BV_o), NC, HV)](
            q, k, G, h, v_new, o, cu_seqlens, chunk_indices, scale,
            V=V, BV=BV_o, DOT_PRECISION=FWD_DOT_PRECISION, **common,
            num_warps=FWD_O_NUM_WARPS, num_stages=1,
        )
    return o, final_state
