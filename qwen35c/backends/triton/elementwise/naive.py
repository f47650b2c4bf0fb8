"""fp32 torch twins of the elementwise kernels (same signatures)."""

from __future__ import annotations

import torch


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def kv_cache_write(src: torch.Tensor, cache: torch.Tensor, q_start: torch.Tensor, lengths: torch.Tensor) -> None:
    for b in range(src.shape[0]):
        n, p = int(lengths[b]), int(q_start[b])
        cache[b, :, p:p + n] = src[b, :n].transpose(0, 1).to(cache.dtype)
