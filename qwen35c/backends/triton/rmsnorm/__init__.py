"""RMSNorm kernels: zero-centred `(1 + w)` (optionally fused with the residual add) and the GDN gated norm.

Twins of the same signatures are in `naive.py`.
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.rmsnorm.kernel import (
    gated_rmsnorm, gated_rmsnorm_config, gated_rmsnorm_kernel, rmsnorm, rmsnorm_config, rmsnorm_kernel,
)

__all__ = ["rmsnorm", "gated_rmsnorm", "aot_specs"]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """Hidden-size norm with and without the fused residual; the GDN gated norm over dv."""
    specs = []
    args = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "res_out_ptr": "*bf16",
            "N": "i32", "stride_x": "i32", "stride_res": "i32", "stride_y": "i32", "stride_res_out": "i32",
            "eps": "fp32"}
    cfg = rmsnorm_config(shapes.hidden_size)
    warps = cfg.pop("num_warps")
    for fused in (False, True):
        name = "rmsnorm_residual" if fused else "rmsnorm"
        specs.append(make_spec(f"{name}[{shapes.name}]", rmsnorm_kernel, args,
                               dict(cfg, HAS_RESIDUAL=fused), num_warps=warps, num_stages=1,
                               aligned=("N", "stride_x", "stride_res", "stride_y", "stride_res_out")))
    cfg = gated_rmsnorm_config(shapes.linear_value_head_dim)
    warps = cfg.pop("num_warps")
    specs.append(make_spec(f"gated_rmsnorm[{shapes.name}]", gated_rmsnorm_kernel,
                           {"x_ptr": "*bf16", "z_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16",
                            "ROWS": "i32", "N": "i32", "eps": "fp32"},
                           cfg, num_warps=warps, num_stages=1, aligned=("N",)))
    return specs
