"""fp32 torch twins of the gated attention kernels (same signatures)."""

from __future__ import annotations

import torch


def attention_prefill(q, k, v, gate, scale: float | None = None, q_start=None, kv_lens=None):
    """Causal GQA attention with the sigmoid output gate: out = softmax(q k^T * scale) v * sigmoid(gate).

    q, gate [B, T, Hq, D]; k, v [B, T, Hkv, D]; query head h uses kv head h // (Hq / Hkv).
    With q_start and kv_lens [B]: k, v are KV caches [B, Hkv, S, D] holding positions < kv_lens[b]
    (this step's keys included), query t of row b sits at position q_start[b] + t and attends to
    positions <= its own; a row with no keys gives zeros.
    Returns [B, T, Hq, D] in q.dtype. scale defaults to D^-0.5.
    """
    b, t, hq, d = q.shape
    if q_start is None:
        q_start, kv_lens = [0] * b, [t] * b
        k, v = k.transpose(1, 2), v.transpose(1, 2)                         # [B, Hkv, T, D]
    hkv = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, t, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        start, n = int(q_start[i]), int(kv_lens[i])
        if n == 0:
            continue
        qf = q[i].float().transpose(0, 1)                                   # [Hq, T, D]
        kf = k[i, :, :n].float().repeat_interleave(hq // hkv, dim=0)        # [Hq, n, D]
        vf = v[i, :, :n].float().repeat_interleave(hq // hkv, dim=0)
        scores = qf @ kf.transpose(-1, -2) * scale                          # [Hq, T, n]
        causal = torch.arange(n, device=q.device)[None, :] <= start + torch.arange(t, device=q.device)[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out[i] = (probs @ vf).transpose(0, 1)
    return (out * torch.sigmoid(gate.float())).to(q.dtype)


def attention_decode(q, k_cache, v_cache, kv_lens, gate, scale: float | None = None):
    """One query token per sequence over a KV cache, with the sigmoid output gate.

    q, gate [B, Hq, D]; k_cache, v_cache [B, Hkv, S_max, D]; kv_lens [B] int: sequence b attends to cache
    positions < kv_lens[b] (the new token already written). Returns [B, Hq, D] in q.dtype; a sequence
    with kv_lens 0 gives zeros.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(kv_lens[i])
        if n == 0:
            continue
        kf = k_cache[i, :, :n].float().repeat_interleave(hq // hkv, dim=0)   # [Hq, n, D]
        vf = v_cache[i, :, :n].float().repeat_interleave(hq // hkv, dim=0)
        probs = (kf @ q[i].float()[:, :, None]).squeeze(-1).mul(scale).softmax(-1)  # [Hq, n]
        out[i] = (probs[:, None, :] @ vf).squeeze(1)
    return (out * torch.sigmoid(gate.float())).to(q.dtype)
