"""Partial rotate-half RoPE (first R = head_dim * partial_rotary_factor dims, dim i paired with i + R/2),
positions per token, theta as an argument; optionally fused after the per-head q/k zero-centred RMSNorm.

cos/sin are computed in fp32 inside the kernel from HF's fp32 inv_freq (HF rounds them to the model
dtype before use; the difference is below one bf16 ulp of the output). Twins: `naive.py`.
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.rope.kernel import qk_norm_rope, rope, rope_config, rope_kernel

__all__ = ["rope", "qk_norm_rope", "aot_specs"]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """q (nq heads, strided inside the q|gate projection) and k (nkv heads), fused with their norms."""
    rotary = int(shapes.head_dim * shapes.partial_rotary_factor)
    args = {"x_ptr": "*bf16", "w_ptr": "*bf16", "pos_ptr": "*i32", "inv_freq_ptr": "*fp32", "y_ptr": "*bf16",
            "H": "i32", "D": "i32", "stride_xt": "i32", "stride_xh": "i32", "eps": "fp32"}
    specs = []
    for which, heads in (("q", shapes.num_attention_heads), ("k", shapes.num_key_value_heads)):
        cfg = rope_config(heads, shapes.head_dim)
        warps = cfg.pop("num_warps")
        specs.append(make_spec(f"qk_norm_rope_{which}[{shapes.name}]", rope_kernel, args,
                               dict(cfg, ROTARY_DIM=rotary, HAS_NORM=True), num_warps=warps, num_stages=1,
                               aligned=("D", "stride_xt", "stride_xh")))
    return specs
