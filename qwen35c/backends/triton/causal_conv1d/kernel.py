"""Causal depthwise conv1d (+ SiLU) in Triton: prefill with conv state in/out, and the decode update.

One kernel serves both. A program owns a [BT, BC] tile of y and reads the W shifted input tiles
(from x, or from the initial state for positions before 0). The program holding the first time tile
also writes the final state: the last W-1 inputs before position lengths[b] (or T), which may still
come from the initial state when the row is shorter than W-1. Those values are loaded, then a
barrier, then stored, so the state may be updated in place (decode). Needs BT >= W-1, so only the
first tile ever reads the initial state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def causal_conv1d_fwd_kernel(
    x, weight, bias, h0, ht, lengths, y,   # x, y [B, T, C]; weight [C, W]; h0, ht [B, C, W-1]; lengths [B]
    T, C,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, USE_SILU: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C

    b_y = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        b_y += tl.load(bias + o_c, mask=m_c, other=0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        o_src = o_t - (W - 1) + j                                     # input position read by tap j
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0).to(tl.float32)
        m_x = (o_src >= 0) & m_t
        b_x = tl.load(x + (i_b * T + o_src)[:, None] * C + o_c[None, :],
                      mask=m_x[:, None] & m_c[None, :], other=0).to(tl.float32)
        if USE_INITIAL_STATE:
            m_h = (o_src < 0) & m_t
            p_h = h0 + (i_b * C + o_c)[None, :] * (W - 1) + (o_src + W - 1)[:, None]
            b_x += tl.load(p_h, mask=m_h[:, None] & m_c[None, :], other=0).to(tl.float32)
        b_y += b_w[None, :] * b_x
    if USE_SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + (i_b * T + o_t)[:, None] * C + o_c[None, :], b_y.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])

    if STORE_FINAL_STATE:
        if i_t == 0:
            if HAS_LENGTHS:
                end = tl.load(lengths + i_b).to(tl.int64)
            else:
                end = i_b * 0 + T                                     # int64 even when T is specialised to 1
            o_s = tl.arange(0, BS)                                    # state column, oldest first
            m_s = o_s < W - 1
            o_keep = end - (W - 1) + o_s                              # input position kept in column s
            m_keep = (o_keep >= 0) & m_s
            b_s = tl.load(x + (i_b * T + o_keep)[:, None] * C + o_c[None, :],
                          mask=m_keep[:, None] & m_c[None, :], other=0).to(tl.float32)
            if USE_INITIAL_STATE:
                m_old = (o_keep < 0) & m_s
                p_old = h0 + (i_b * C + o_c)[None, :] * (W - 1) + (o_keep + W - 1)[:, None]
                b_s += tl.load(p_old, mask=m_old[:, None] & m_c[None, :], other=0).to(tl.float32)
            tl.debug_barrier()                                        # every read of h0 before any write to ht
            p_s = ht + (i_b * C + o_c)[None, :] * (W - 1) + o_s[:, None]
            tl.store(p_s, b_s.to(ht.dtype.element_ty), mask=m_s[:, None] & m_c[None, :])


CONV_NUM_WARPS = 4


def conv_block_sizes(T: int, C: int, W: int) -> tuple[int, int, int]:
    """(BT, BC, BS). 32 x 64 tiles: larger ones spill on sm_90 (the W shifted int64 pointer tiles dominate)."""
    BT = max(16, min(32, triton.next_power_of_2(T)), triton.next_power_of_2(W - 1))
    BC = min(64, max(16, triton.next_power_of_2(C)))
    BS = max(2, triton.next_power_of_2(W - 1))
    return BT, BC, BS


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    lengths: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv1d over time, then SiLU (prefill).

    Args:
        x: [B, T, C] (channels last, the projection output as it is laid out).
        weight: [C, W] (HF's conv1d weight [C, 1, W] squeezed). bias: optional [C].
        initial_state: optional [B, C, W-1], the previous W-1 inputs, oldest first. Not modified.
        output_final_state: also return the state after the call, [B, C, W-1] in x.dtype.
        lengths: optional [B] valid lengths of right-padded rows: the final state of row b is the last
            W-1 inputs before position lengths[b] (reaching into initial_state when lengths[b] < W-1).
            Outputs past lengths[b] are computed but meaningless.
        activation: "silu" or None.
    Returns:
        (y [B, T, C] in x.dtype, final_state [B, C, W-1] or None)
    """
    final_state = None
    if output_final_state:
        final_state = torch.empty(x.shape[0], x.shape[2], weight.shape[1] - 1, dtype=x.dtype, device=x.device)
    y = _launch(x, weight, bias, initial_state, final_state, lengths, activation)
    return y, final_state


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One decode step (or a few tokens): x [B, C] or [B, T, C]; conv_state [B, C, W-1] is updated in place.

    Returns y with the shape and dtype of x.
    """
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous to be updated in place")
    squeeze = x.dim() == 2
    x3 = x[:, None] if squeeze else x
    y = _launch(x3, weight, bias, conv_state, conv_state, None, activation)
    return y[:, 0] if squeeze else y


def _launch(x, weight, bias, initial_state, final_state, lengths, activation):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got {tuple(x.shape)}")
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be [C, W] = [{C}, W], got {tuple(weight.shape)}; squeeze HF's [C, 1, W]")
    W = weight.shape[1]
    for name, s in (("initial_state", initial_state), ("final_state", final_state)):
        if s is not None and s.shape != (B, C, W - 1):
            raise ValueError(f"{name} must be [B, C, W-1] = {(B, C, W - 1)}, got {tuple(s.shape)}")
    if lengths is not None and lengths.shape != (B,):
        raise ValueError(f"lengths must be [B] = [{B}], got {tuple(lengths.shape)}")
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    x, weight = x.contiguous(), weight.contiguous()
    if initial_state is not None and initial_state is not final_state:
        initial_state = initial_state.contiguous()
    y = torch.empty_like(x)
    BT, BC, BS = conv_block_sizes(T, C, W)
    dummy = y
    causal_conv1d_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC), B)](
        x, weight, bias if bias is not None else dummy,
        initial_state if initial_state is not None else dummy,
        final_state if final_state is not None else dummy,
        lengths if lengths is not None else dummy, y,
        T, C,
        W=W, BT=BT, BC=BC, BS=BS,
        HAS_BIAS=bias is not None, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None, HAS_LENGTHS=lengths is not None,
        USE_SILU=activation == "silu",
        num_warps=CONV_NUM_WARPS, num_stages=1,
    )
    return y
