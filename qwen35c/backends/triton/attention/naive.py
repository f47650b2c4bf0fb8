"""fp32 torch twins of the gated attention kernels (same signatures)."""

from __future__ import annotations

import torch


def attention_prefill(q, k, v, gate, scale: float | None = None):
    """Causal GQA attention with the sigmoid output gate: out = softmax(q k^T * scale) v * sigmoid(gate).

    q, gate [B, T, Hq, D]; k, v [B, T, Hkv, D]; query head h uses kv head h // (Hq / Hkv).
    Returns [B, T, Hq, D] in q.dtype. scale defaults to D^-0.5.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qf = q.float().transpose(1, 2)                                          # [B, Hq, T, D]
    kf = k.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)      # [B, Hq, T, D]
    vf = v.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale                              # [B, Hq, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = (probs @ vf).transpose(1, 2)                                      # [B, T, Hq, D]
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
