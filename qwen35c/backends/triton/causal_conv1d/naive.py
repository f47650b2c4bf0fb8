"""fp32 PyTorch twins of the causal depthwise conv1d (+ SiLU) kernels, with the same signatures.

    y[b, t, c] = act( bias[c] + sum_{j<W} weight[c, j] * x[b, t - (W-1) + j, c] )

Positions before the start read the conv state (the last W-1 inputs of the previous call, oldest
first), or zeros without one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _state_after(xs: torch.Tensor, W: int, length: int) -> torch.Tensor:
    """The last W-1 columns of the [C, W-1+T] history ending before position `length` of x."""
    return xs[:, length: length + W - 1]


def naive_causal_conv1d(x, weight, bias=None, initial_state=None, output_final_state=False, lengths=None,
                        activation="silu"):
    """Reference of `causal_conv1d`: returns (y [B, T, C] in x.dtype, final_state [B, C, W-1] or None)."""
    B, T, C = x.shape
    W = weight.shape[1]
    if initial_state is None:
        history = torch.zeros(B, C, W - 1)
    else:
        history = initial_state.float()
    xs = torch.cat([history, x.float().transpose(1, 2)], dim=2)          # [B, C, W-1+T]
    y = torch.zeros(B, T, C)
    for j in range(W):
        y += weight[:, j].float() * xs[:, :, j: j + T].transpose(1, 2)
    if bias is not None:
        y += bias.float()
    if activation == "silu":
        y = y * torch.sigmoid(y)
    final = None
    if output_final_state:
        ends = [T] * B if lengths is None else [int(n) for n in lengths]
        final = torch.stack([_state_after(xs[b], W, ends[b]) for b in range(B)]).to(x.dtype)
    return y.to(x.dtype), final


def naive_causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    """Reference of `causal_conv1d_update`: x [B, C] or [B, T, C]; conv_state [B, C, W-1] updated in place."""
    squeeze = x.dim() == 2
    x3 = x[:, None] if squeeze else x
    y, final = naive_causal_conv1d(x3, weight, bias, conv_state, output_final_state=True, activation=activation)
    conv_state.copy_(final)
    return y[:, 0] if squeeze else y
