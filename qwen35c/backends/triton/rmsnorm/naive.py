"""fp32 torch twins of the RMSNorm kernels (same signatures)."""

from __future__ import annotations

import torch


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Zero-centred RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * (1 + w).

    With `residual`: h = x + residual (rounded to x.dtype, as it is stored), y = norm(h);
    returns (y, h). Without: returns y. Output dtype = x.dtype.
    """
    h = x.float()
    if residual is not None:
        h = (h + residual.float()).to(x.dtype).float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    y = y.to(x.dtype)
    return (y, h.to(x.dtype)) if residual is not None else y


def gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """GDN output norm, per head over the last dim dv: y = x * rsqrt(mean(x^2) + eps) * w * SiLU(gate).

    x, gate [..., dv]; weight [dv] (plain weight, not 1 + w). fp32 throughout, one rounding to x.dtype
    (HF rounds twice more in bf16, after the normalisation and after the weight multiply).
    """
    h = x.float()
    z = gate.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float() * (z * torch.sigmoid(z))
    return y.to(x.dtype)
