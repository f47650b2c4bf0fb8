"""Small elementwise kernels the model needs between the big ones: SwiGLU of two projections (dense
MLPs and the shared expert, whatever the GEMM's weight format) and the KV-cache write of new
positions (per-row start, positions past a row's length never written). Twins: `naive.py`.
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.elementwise.kernel import (
    kv_cache_write, kv_cache_write_config, kv_cache_write_kernel, swiglu, swiglu_config, swiglu_kernel,
)

__all__ = ["swiglu", "kv_cache_write", "aot_specs"]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """bf16 SwiGLU over the MLP width and the bf16 KV-cache write over [Hkv, head_dim]."""
    width = shapes.intermediate_size or shapes.shared_expert_intermediate_size
    cfg = swiglu_config(width)
    warps = cfg.pop("num_warps")
    specs = [make_spec(f"swiglu[{shapes.name}]", swiglu_kernel,
                       {"g_ptr": "*bf16", "u_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "stride_g": "i32",
                        "stride_u": "i32", "stride_y": "i32"}, cfg, num_warps=warps, num_stages=1,
                       aligned=("N", "stride_g", "stride_u", "stride_y"))]
    cfg = kv_cache_write_config(shapes.num_key_value_heads, shapes.head_dim)
    warps = cfg.pop("num_warps")
    specs.append(make_spec(f"kv_cache_write[{shapes.name}]", kv_cache_write_kernel,
                           {"src_ptr": "*bf16", "cache_ptr": "*bf16", "q_start_ptr": "*i32", "lengths_ptr": "*i32",
                            "T": "i32", "H": "i32", "stride_st": "i32", "stride_sh": "i32", "stride_cb": "i64",
                            "stride_ch": "i32", "stride_cs": "i32"}, cfg, num_warps=warps, num_stages=1,
                           aligned=("stride_st", "stride_sh", "stride_ch", "stride_cs")))
    return specs
