"""Gated delta rule (the Gated DeltaNet core): chunked prefill and recurrent decode kernels.

`naive.py` holds fp32 PyTorch twins with the same signatures:
  chunk_gated_delta_rule            <-> naive_chunk_gated_delta_rule
  fused_recurrent_gated_delta_rule  <-> naive_recurrent_gated_delta_rule
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.gated_delta_rule.chunk import (
    CHUNK_SIZE, FWD_DOT_PRECISION, FWD_H_NUM_WARPS, FWD_O_NUM_WARPS, PREP_BK, PREP_DOT_PRECISION, PREP_NUM_WARPS,
    chunk_block_sizes, chunk_gated_delta_rule, gdn_chunk_fwd_h_kernel, gdn_chunk_fwd_o_kernel, gdn_chunk_prep_kernel,
)
from qwen35c.backends.triton.gated_delta_rule.fused_recurrent import (
    RECURRENT_NUM_WARPS, fused_recurrent_gated_delta_rule, gdn_fused_recurrent_fwd_kernel, recurrent_block_sizes,
)
from qwen35c.backends.triton.gated_delta_rule.naive import (
    naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule,
)

__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "naive_chunk_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "aot_specs",
]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """The model's launches: bf16 q/k/v and raw a/b projections with gates, L2 norm fused; fp32 state.

    A_log and dt_bias are passed as fp32 [HV]. Prefill is the chunked trio (prep, fwd_h, fwd_o) on packed
    cu_seqlens; decode is the recurrent kernel without (decode) and with (speculative verify) per-step states.
    """
    H, HV = shapes.linear_num_key_heads, shapes.linear_num_value_heads
    K, V = shapes.linear_key_head_dim, shapes.linear_value_head_dim
    tag = shapes.name
    gates = dict(USE_L2NORM=True, USE_GATE=True, USE_DT_BIAS=True, USE_BETA_SIGMOID=True)

    BK, BV_h, BV_o = chunk_block_sizes(K, V)
    prep = make_spec(
        f"gdn_chunk_prep[{tag}]", gdn_chunk_prep_kernel,
        {"k": "*bf16", "g": "*bf16", "beta": "*bf16", "A_log": "*fp32", "dt_bias": "*fp32",
         "G_out": "*fp32", "beta_out": "*fp32", "Ainv": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32"},
        dict(H=H, HV=HV, K=K, BT=CHUNK_SIZE, BK=min(PREP_BK, BK), DOT_PRECISION=PREP_DOT_PRECISION, **gates),
        num_warps=PREP_NUM_WARPS, num_stages=1,
    )
    fwd_h = make_spec(
        f"gdn_chunk_fwd_h[{tag}]", gdn_chunk_fwd_h_kernel,
        {"k": "*bf16", "v": "*bf16", "G": "*fp32", "beta": "*fp32", "Ainv": "*fp32", "h": "*fp32",
         "v_new": "*fp32", "h0": "*fp32", "ht": "*fp32", "cu_seqlens": "*i32", "chunk_offsets": "*i32"},
        dict(H=H, HV=HV, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=BV_h, USE_L2NORM=True, USE_INITIAL_STATE=True,
             STORE_FINAL_STATE=True, DOT_PRECISION=FWD_DOT_PRECISION),
        num_warps=FWD_H_NUM_WARPS, num_stages=1,
    )
    fwd_o = make_spec(
        f"gdn_chunk_fwd_o[{tag}]", gdn_chunk_fwd_o_kernel,
        {"q": "*bf16", "k": "*bf16", "G": "*fp32", "h": "*fp32", "v_new": "*fp32", "o": "*bf16",
         "cu_seqlens": "*i32", "chunk_indices": "*i32", "scale": "fp32"},
        dict(H=H, HV=HV, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=BV_o, USE_L2NORM=True, DOT_PRECISION=FWD_DOT_PRECISION),
        num_warps=FWD_O_NUM_WARPS, num_stages=1,
    )
    BK, BV = recurrent_block_sizes(K, V)
    recurrent_args = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "g": "*bf16", "beta": "*bf16",
                      "A_log": "*fp32", "dt_bias": "*fp32", "o": "*bf16", "h0": "*fp32", "ht": "*fp32",
                      "hs": "*fp32", "cu_seqlens": "*i32", "scale": "fp32", "T": "i32"}
    recurrent = [
        make_spec(
            f"gdn_recurrent{suffix}[{tag}]", gdn_fused_recurrent_fwd_kernel, recurrent_args,
            dict(H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True,
                 STORE_STEP_STATES=steps, IS_VARLEN=False, **gates),
            num_warps=RECURRENT_NUM_WARPS, num_stages=1,
        )
        for suffix, steps in (("", False), ("_steps", True))
    ]
    return [prep, fwd_h, fwd_o, *recurrent]
