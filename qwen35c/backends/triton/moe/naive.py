"""fp32 torch twins of the MoE kernels (same signatures)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route(logits: torch.Tensor, top_k: int):
    """softmax over E in fp32, top-k, renormalise. logits [N, E] -> (weights [N, k] fp32, ids [N, k] int32)."""
    probs = logits.float().softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def moe_experts(x, w13, w2, weights, ids):
    """Routed experts, weighted: y [N, k, H] with y[n, j] = weights[n, j] * down_e(SiLU(gate_e x) * up_e x).

    x [N, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; weights [N, k]; ids [N, k].
    fp32, returned in fp32 (the combine rounds once).
    """
    n, k = ids.shape
    inter = w2.shape[2]
    out = torch.zeros(n, k, x.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = xf[tok] @ w13[e].float().t()                                   # [n_e, 2I]
        act = F.silu(h[:, :inter]) * h[:, inter:]
        out[tok, slot] = (act @ w2[e].float().t()) * weights[tok, slot].float()[:, None]
    return out


def moe_combine(y_slots, shared=None, shared_gate_logit=None):
    """out [N, H] = sum_j y_slots[:, j] (+ sigmoid(shared_gate_logit) * shared), fp32, rounded once.

    y_slots [N, k, H]; shared [N, H]; shared_gate_logit [N] (or [N, 1]). Output dtype: shared's, else y's.
    """
    out = y_slots.float().sum(1)
    if shared is not None:
        out = out + torch.sigmoid(shared_gate_logit.float().reshape(-1, 1)) * shared.float()
    return out.to(shared.dtype if shared is not None else y_slots.dtype)


def shared_expert(x, w13, w2):
    """down(SiLU(gate x) * up x) for one expert: w13 [2I, H], w2 [H, I]. fp32, returned in x.dtype."""
    inter = w2.shape[1]
    h = x.float() @ w13.float().t()
    return ((F.silu(h[:, :inter]) * h[:, inter:]) @ w2.float().t()).to(x.dtype)


def moe_forward(x, router_w, w13, w2, top_k, shared_w13=None, shared_w2=None, shared_gate_w=None):
    """Full sparse MoE block. x [N, H]; router_w [E, H]; shared_gate_w [1, H]. Returns [N, H] in x.dtype.

    Roundings: the router logits and the shared-expert output and gate logit are rounded to x.dtype
    (they are GEMM outputs), the rest is fp32 with one final rounding.
    """
    logits = (x.float() @ router_w.float().t()).to(x.dtype)
    weights, ids = moe_route(logits, top_k)
    y = moe_experts(x, w13, w2, weights, ids)
    if shared_w13 is None:
        return y.sum(1).to(x.dtype)
    shared = shared_expert(x, shared_w13, shared_w2)
    gate = (x.float() @ shared_gate_w.float().t()).to(x.dtype)
    return moe_combine(y, shared, gate)


def moe_experts_dequantized(x, w13, w2, weights, ids, act_quant=None):
    """Twin of moe_experts_quantized: moe_experts on the dequantized fp32 weights w13 [E, 2I, H],
    w2 [E, H, I], with `act_quant` (fp32 -> fp32 fake quantization) applied to x and to the SwiGLU
    output before the down projection (FP8 dynamic activations). Returns y [N, k, H] fp32."""
    q = act_quant or (lambda t: t)
    n, k = ids.shape
    inter = w2.shape[2]
    out = torch.zeros(n, k, x.shape[1], dtype=torch.float32, device=x.device)
    xf = q(x.float())
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = xf[tok] @ w13[e].float().t()
        act = q(F.silu(h[:, :inter]) * h[:, inter:])
        out[tok, slot] = (act @ w2[e].float().t()) * weights[tok, slot].float()[:, None]
    return out
