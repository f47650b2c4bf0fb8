"""fp32 torch twins of the RoPE kernels (same signatures)."""

from __future__ import annotations

import torch


def inv_freq(theta: float, rotary_dim: int, device=None) -> torch.Tensor:
    """theta^(-2j/R) for j < R/2, computed exactly as HF does (fp32)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (theta ** exponent)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Partial rotate-half RoPE over the first `rotary_dim` dims of each head.

    x [..., H, D] with positions [...] (int, one per token). Dim i < R/2 pairs with i + R/2:
    y_i = x_i cos - x_{i+R/2} sin, y_{i+R/2} = x_{i+R/2} cos + x_i sin, angle = pos * theta^(-2i/R).
    Dims >= R pass through. fp32 math, one rounding to x.dtype.
    """
    half = rotary_dim // 2
    xf = x.float()
    angle = positions.float()[..., None] * inv_freq(theta, rotary_dim, x.device)  # [..., R/2]
    cos = torch.cos(angle)[..., None, :]
    sin = torch.sin(angle)[..., None, :]
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return y.to(x.dtype)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, theta: float,
                 rotary_dim: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-head zero-centred RMSNorm over D (y = x rstd (1 + w)) followed by `rope`, in fp32, one rounding."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    return rope(normed, positions, theta, rotary_dim).to(x.dtype)
