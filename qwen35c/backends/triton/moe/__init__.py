"""Sparse MoE: routing (fp32 softmax over E, top-k, renormalise), expert sort, grouped GEMMs over stacked
experts (w13 [E, 2I, H] gate rows then up rows, SwiGLU fused; w2 [E, H, I], routing weight fused),
weighted combine with the shared expert and its sigmoid gate. Twins: `naive.py`.
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.moe.kernel import (
    expert_gemm_config, moe_align, moe_combine, moe_combine_kernel, moe_down_kernel, moe_experts, moe_forward,
    moe_gate_up_kernel, moe_route, moe_route_kernel, route_config, shared_expert,
)

__all__ = ["moe_route", "moe_align", "moe_experts", "shared_expert", "moe_combine", "moe_forward", "aot_specs"]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """Only MoE models ship these: routing, gate|up and down for decode and prefill tiles, combine."""
    if not shapes.num_experts:
        return []
    specs = []
    cfg = route_config(shapes.num_experts, shapes.num_experts_per_tok)
    warps = cfg.pop("num_warps")
    specs.append(make_spec(f"moe_route[{shapes.name}]", moe_route_kernel,
                           {"logits_ptr": "*bf16", "w_out_ptr": "*fp32", "id_out_ptr": "*i32", "N": "i32", "E": "i32",
                            "stride_l": "i32"}, dict(cfg, TOP_K=shapes.num_experts_per_tok),
                           num_warps=warps, num_stages=1))
    gate_up_args = {"x_ptr": "*bf16", "w_ptr": "*bf16", "sorted_ptr": "*i32", "block_expert_ptr": "*i32",
                    "num_padded_ptr": "*i32", "y_ptr": "*bf16", "H": "i32", "INTER": "i32", "NUM_SLOTS": "i32",
                    "TOP_K": "i32", "stride_xm": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    down_args = {"a_ptr": "*bf16", "w_ptr": "*bf16", "sorted_ptr": "*i32", "block_expert_ptr": "*i32",
                 "num_padded_ptr": "*i32", "topk_w_ptr": "*fp32", "y_ptr": "*bf16", "H": "i32", "INTER": "i32",
                 "NUM_SLOTS": "i32", "stride_am": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    aligned = ("H", "INTER", "stride_xm", "stride_we", "stride_wn", "stride_ym", "stride_am")
    for phase, slots in (("decode", 8), ("prefill", 4096 * 8)):
        cfg = expert_gemm_config(slots)
        launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        specs.append(make_spec(f"moe_gate_up_{phase}[{shapes.name}]", moe_gate_up_kernel, gate_up_args, cfg,
                               aligned=tuple(a for a in aligned if a in gate_up_args), **launch))
        specs.append(make_spec(f"moe_down_{phase}[{shapes.name}]", moe_down_kernel, down_args,
                               dict(cfg, HAS_WEIGHT=True), aligned=tuple(a for a in aligned if a in down_args),
                               **launch))
    specs.append(make_spec(f"moe_combine_shared[{shapes.name}]", moe_combine_kernel,
                           {"y_ptr": "*bf16", "shared_ptr": "*bf16", "gate_ptr": "*bf16", "out_ptr": "*bf16",
                            "H": "i32", "stride_gate": "i32"},
                           {"TOP_K": shapes.num_experts_per_tok, "HAS_SHARED": True,
                            "BLOCK_H": min(1024, shapes.hidden_size)}, num_warps=4, num_stages=1, aligned=("H",)))
    return specs
