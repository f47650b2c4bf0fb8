"""Gated full attention: causal GQA prefill (flash-style online softmax; from position 0 or on top
of a KV cache) and split-KV decode over a KV cache [B, Hkv, S_max, D] with per-sequence lengths;
out * sigmoid(gate) fused; scale D^-0.5.

Twins: `naive.py`.
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.attention.kernel import (
    attention_decode, attention_prefill, attn_decode_combine_kernel, attn_decode_split_kernel,
    attn_prefill_kernel, decode_config, prefill_config,
)

__all__ = ["attention_prefill", "attention_decode", "aot_specs"]


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    d = shapes.head_dim
    group = shapes.num_attention_heads // shapes.num_key_value_heads
    strides = [f"stride_{t}{s}" for t in "qkvgo" for s in "bth"]
    args = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "g_ptr": "*bf16", "o_ptr": "*bf16",
            "start_ptr": "*i32", "kv_lens_ptr": "*i32", "T": "i32", "HQ": "i32", "GROUP": "i32", **{s: "i32" for s in strides}, "qk_scale": "fp32"}
    cfg = prefill_config(d)
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    specs = [make_spec(f"attn_prefill[{shapes.name}]", attn_prefill_kernel, args, dict(cfg, HEAD_DIM=d),
                       aligned=tuple(strides), **launch)]
    dstrides = ["stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh", "stride_vs"]
    args = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "lens_ptr": "*i32", "part_o_ptr": "*fp32",
            "part_lse_ptr": "*fp32", "HKV": "i32", "GROUP": "i32", "NUM_SPLITS": "i32",
            **{s: ("i64" if s in ("stride_kb", "stride_vb") else "i32") for s in dstrides}, "qk_scale": "fp32"}
    cfg = decode_config(group)
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    specs.append(make_spec(f"attn_decode_split[{shapes.name}]", attn_decode_split_kernel, args,
                           dict(cfg, HEAD_DIM=d), aligned=tuple(dstrides), **launch))
    args = {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "g_ptr": "*bf16", "o_ptr": "*bf16", "HQ": "i32",
            "NUM_SPLITS": "i32", "stride_gb": "i32", "stride_gh": "i32", "stride_ob": "i32", "stride_oh": "i32"}
    specs.append(make_spec(f"attn_decode_combine[{shapes.name}]", attn_decode_combine_kernel, args,
                           {"HEAD_DIM": d, "BLOCK_S": 64}, num_warps=4, num_stages=1,
                           aligned=("stride_gb", "stride_gh", "stride_ob", "stride_oh")))
    return specs
