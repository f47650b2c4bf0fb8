"""Causal depthwise conv1d + SiLU over the GDN q/k/v channels: prefill and in-place decode update.

`naive.py` holds fp32 PyTorch twins with the same signatures:
  causal_conv1d         <-> naive_causal_conv1d
  causal_conv1d_update  <-> naive_causal_conv1d_update
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.causal_conv1d.kernel import (
    CONV_NUM_WARPS, causal_conv1d, causal_conv1d_fwd_kernel, causal_conv1d_update, conv_block_sizes,
)
from qwen35c.backends.triton.causal_conv1d.naive import naive_causal_conv1d, naive_causal_conv1d_update

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "naive_causal_conv1d",
    "naive_causal_conv1d_update",
    "aot_specs",
]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """bf16 x/weight/state, SiLU, no bias: prefill (state in and out, per-row lengths) and decode update."""
    H, HV = shapes.linear_num_key_heads, shapes.linear_num_value_heads
    C = 2 * H * shapes.linear_key_head_dim + HV * shapes.linear_value_head_dim
    W = shapes.linear_conv_kernel_dim
    args = {"x": "*bf16", "weight": "*bf16", "bias": "*bf16", "h0": "*bf16", "ht": "*bf16",
            "lengths": "*i32", "y": "*bf16", "T": "i32", "C": "i32"}
    specs = []
    for name, T, has_lengths in (("causal_conv1d", 4096, True), ("causal_conv1d_update", 1, False)):
        BT, BC, BS = conv_block_sizes(T, C, W)
        specs.append(make_spec(
            f"{name}[{shapes.name}]", causal_conv1d_fwd_kernel, args,
            dict(W=W, BT=BT, BC=BC, BS=BS, HAS_BIAS=False, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True,
                 HAS_LENGTHS=has_lengths, USE_SILU=True),
            num_warps=CONV_NUM_WARPS, num_stages=1, aligned=("C",),
        ))
    return specs
