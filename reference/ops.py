"""The four operations the compiler must see whole, as `torch.library` custom ops.

Each op has an eager implementation (plain PyTorch, following HF's torch fallback op for op, so the
reference stays bit-faithful in bf16) and a fake implementation (shapes only), so `torch.export`
keeps it as one node with a dynamic sequence length. A Python chunk loop traced directly would
silently specialise the length (notes/kernels-and-runtimes.md §5).

    qwen35::causal_conv1d     depthwise causal conv + SiLU, with carried state
    qwen35::gated_delta_rule  the GDN core: head repeat, L2 norm, q scaling, delta rule
    qwen35::attention         causal GQA softmax attention over a (cached) key range
    qwen35::moe               router softmax -> top-k -> renormalise -> experts -> combine

The plain functions (`*_eager`) are differentiable and are what training calls: custom ops carry
no autograd formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "l2norm", "causal_conv1d_eager", "chunk_gated_delta_rule", "recurrent_gated_delta_rule",
    "gated_delta_rule_eager", "attention_eager", "moe_route", "moe_eager",
    "causal_conv1d", "gated_delta_rule", "attention", "moe",
]

L2NORM_EPS = 1e-6
CHUNK_SIZE = 64


# ---- causal conv ------------------------------------------------------------------------------
def causal_conv1d_eager(x: Tensor, weight: Tensor, state: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """y_t = SiLU(sum_j w[c, j] * x_{t-K+1+j}[c]), past inputs taken from `state`.

    x [B, T, C], weight [C, K], state [B, C, K-1] (the last K-1 raw inputs), lengths [B] int64:
    the valid prefix of each row. Returns y [B, T, C] (x.dtype) and the new state [B, C, K-1]:
    the K-1 inputs just before position lengths[b], so right padding never enters the state.
    Computed in the weight dtype and cast back, like HF.
    """
    batch, length, channels = x.shape
    window = weight.shape[1] - 1
    history = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    # why: an explicit fp32 window sum rounded once equals HF's F.conv1d (fp32 accumulation) and
    # avoids oneDNN's per-shape primitive setup, which costs ~30 ms per decode step on CPU
    taps = history.to(weight.dtype).float().unfold(2, window + 1, 1)       # [B, C, T, K]
    y = (taps * weight.float().unsqueeze(1)).sum(-1).to(weight.dtype)       # [B, C, T]
    y = F.silu(y).to(x.dtype).transpose(1, 2).contiguous()
    # history column j holds input position j-(K-1): keep positions lengths-K+1 .. lengths-1
    index = lengths.view(batch, 1, 1) + torch.arange(window, device=x.device).view(1, 1, window)
    new_state = history.gather(2, index.expand(batch, channels, window))
    return y, new_state


# ---- gated delta rule -------------------------------------------------------------------------
def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (FLA's and HF's formula)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare_qkv(q, k, v, g, beta):
    """Repeat key heads for grouped values, move heads first, cast to fp32, L2-normalise q and k."""
    ratio = v.shape[2] // k.shape[2]
    if ratio > 1:  # value head j reads key head j // ratio (repeat_interleave, not tiling)
        q, k = q.repeat_interleave(ratio, dim=2), k.repeat_interleave(ratio, dim=2)
    q, k, v, beta, g = [t.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for t in (q, k, v, beta, g)]  # [B, Hv, T, D] / [B, Hv, T]
    return l2norm(q), l2norm(k), v, g, beta


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state) -> tuple[Tensor, Tensor]:
    """Token-by-token delta rule: S = a S; u = b (v - S^T k); S += k u^T; o = S^T q  (fp32 state).

    q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g [B, T, Hv] log-decay (fp32); beta [B, T, Hv];
    initial_state [B, Hv, dk, dv] fp32. Returns o [B, T, Hv, dv] in q.dtype and the final state.
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare_qkv(q, k, v, g, beta)
    q = q / (q.shape[-1] ** 0.5)  # HF's recurrent path divides; the chunked path multiplies
    state = initial_state.to(v)
    out = torch.zeros_like(v)
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        memory = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)              # S^T k  [B, Hv, dv]
        delta = (v[:, :, t] - memory) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)       # S += k u^T
        out[:, :, t] = (state * q[:, :, t].unsqueeze(-1)).sum(dim=-2)         # S^T q
    return out.transpose(1, 2).contiguous().to(out_dtype), state


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state, chunk_size: int = CHUNK_SIZE):
    """The same recurrence in chunks of 64 with the WY/UT transform (HF's op order, for bf16 parity).

    Per chunk, with gamma the chunk-local cumsum of g and Gamma_rs = exp(gamma_r - gamma_s) (s <= r):
      T = (I + tril_strict((beta K) K^T * Gamma))^-1,  U = T (beta V),  W = T (beta e^gamma K)
      V' = U - W S;  O = (Q e^gamma) S + ((Q K^T) * Gamma) V';  S = e^gamma_C S + (K e^(gamma_C-gamma))^T V'
    Same arguments and results as `recurrent_gated_delta_rule`.
    """
    out_dtype = q.dtype
    batch, length = q.shape[:2]
    q, k, v, g, beta = _prepare_qkv(q, k, v, g, beta)
    q = q * q.shape[-1] ** -0.5
    pad = (chunk_size - length % chunk_size) % chunk_size  # padded steps: g = beta = k = 0, no effect
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    heads, dv = v.shape[1], v.shape[-1]
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    # [B, Hv, N, C, D]: N chunks of C positions
    q, k, k_beta, v_beta = (t.reshape(batch, heads, -1, chunk_size, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    gamma = g.reshape(batch, heads, -1, chunk_size).cumsum(dim=-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # Gamma
    system = (k_beta @ k.transpose(-1, -2)) * decay  # solve ignores its diagonal (unitriangular)
    intra = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * gamma.exp().unsqueeze(-1), upper=False, unitriangular=True)
    q = q * gamma.exp().unsqueeze(-1)
    k = k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)
    chunk_decay = gamma[..., -1].exp()[..., None, None]
    state = initial_state.to(u)
    out = torch.zeros_like(u)
    for n in range(u.shape[2]):
        v_new = u[:, :, n] - w[:, :, n] @ state
        out[:, :, n] = q[:, :, n] @ state + intra[:, :, n] @ v_new
        state = state * chunk_decay[:, :, n] + k[:, :, n].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, -1, dv)[:, :, :length]
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), state


def gated_delta_rule_eager(q, k, v, g, beta, initial_state) -> tuple[Tensor, Tensor]:
    """Recurrent form for one token (decode), chunked form otherwise (prefill), as HF dispatches."""
    if q.shape[1] == 1:
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state)
    return chunk_gated_delta_rule(q, k, v, g, beta, initial_state)


# ---- attention --------------------------------------------------------------------------------
def attention_eager(q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, kv_len: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v with GQA; query t of row b sits at position q_start[b] + t.

    q [B, Hq, T, hd]; k, v [B, Hkv, S, hd]; key j is visible iff j <= q_start[b] + t and j < kv_len[b].
    The unmasked full-sequence case is exactly HF's SDPA call (is_causal, enable_gqa), bit for bit.
    """
    batch, _, length, head_dim = q.shape
    keys = k.shape[2]
    scale = head_dim**-0.5
    if length == keys and bool((q_start == 0).all()) and bool((kv_len == keys).all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    position = q_start.view(batch, 1, 1) + torch.arange(length, device=q.device).view(1, length, 1)
    key_index = torch.arange(keys, device=q.device).view(1, 1, keys)
    visible = (key_index <= position) & (key_index < kv_len.view(batch, 1, 1))  # [B, T, S]
    # why: a row with no visible key (an empty padded row) would give NaN, which padding must not leak
    visible[..., 0] |= ~visible.any(dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible.unsqueeze(1), scale=scale, enable_gqa=True)


# ---- mixture of experts -----------------------------------------------------------------------
def moe_route(x: Tensor, router_weight: Tensor, top_k: int, norm_topk_prob: bool) -> tuple[Tensor, Tensor]:
    """Router: logits = x W^T (model dtype), softmax in fp32, top-k, renormalise, cast back.

    Returns (weights [N, k] in x.dtype, expert indices [N, k]).
    """
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


def moe_eager(x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
              top_k: int, norm_topk_prob: bool) -> Tensor:
    """Routed experts: sum_k w_k * down_e(SiLU(gate_e x) * up_e x), grouped by expert like HF's grouped_mm.

    x [N, H]; router_weight [E, H]; gate_up_proj [E, 2I, H] (gate rows, then up rows); down_proj [E, H, I].
    The k weighted outputs are summed in one fp32-accumulated reduction and rounded once.
    """
    num_tokens = x.shape[0]
    weights, experts = moe_route(x, router_weight, top_k, norm_topk_prob)
    flat_experts, order = torch.sort(experts.reshape(-1), stable=True)  # slot s = token * k + j
    rows = x[order // top_k]
    counts = torch.bincount(flat_experts, minlength=router_weight.shape[0]).tolist()
    outputs = []
    for expert, chunk in zip(range(len(counts)), rows.split(counts)):
        if chunk.shape[0]:
            gate, up = F.linear(chunk, gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down_proj[expert]))
    routed = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(routed).index_copy(0, order, routed)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


# ---- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("qwen35::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, state: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """See `causal_conv1d_eager`. x [B,T,C], weight [C,K], state [B,C,K-1], lengths [B] int64."""
    return causal_conv1d_eager(x, weight, state, lengths)


@causal_conv1d.register_fake
def _(x, weight, state, lengths):
    return torch.empty_like(x), torch.empty_like(state, dtype=x.dtype)


@torch.library.custom_op("qwen35::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """See `gated_delta_rule_eager`. Returns (o [B,T,Hv,dv] in q.dtype, final_state [B,Hv,dk,dv] fp32)."""
    return gated_delta_rule_eager(q, k, v, g, beta, initial_state)


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state):
    out = v.new_empty(v.shape, dtype=q.dtype)
    return out, initial_state.new_empty(initial_state.shape, dtype=torch.float32)


@torch.library.custom_op("qwen35::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, kv_len: Tensor) -> Tensor:
    """See `attention_eager`. q [B,Hq,T,hd], k/v [B,Hkv,S,hd], q_start/kv_len [B] int64 -> [B,Hq,T,hd]."""
    return attention_eager(q, k, v, q_start, kv_len)


@attention.register_fake
def _(q, k, v, q_start, kv_len):
    return torch.empty_like(q)


@torch.library.custom_op("qwen35::moe", mutates_args=())
def moe(x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
        top_k: int, norm_topk_prob: bool) -> Tensor:
    """See `moe_eager`. x [N,H] -> [N,H]."""
    return moe_eager(x, router_weight, gate_up_proj, down_proj, top_k, norm_topk_prob)


@moe.register_fake
def _(x, router_weight, gate_up_proj, down_proj, top_k, norm_topk_prob):
    return torch.empty_like(x)
