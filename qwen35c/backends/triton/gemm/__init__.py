"""GEMM kernels: dense (bf16/fp16/fp32), FP8 block-128 and INT4 weight-only group-128.

All take the nn.Linear layout: activations x [M, K] (row-major, unit stride along K), weight [N, K],
output y [M, N] = x @ W.T, accumulated in fp32 and rounded once at the store.

FP8 block-128 (the official Qwen "fine-grained FP8" checkpoint layout, DeepSeek-V3 recipe):
  * weight            float8_e4m3fn [N, K]
  * weight_scale_inv  fp32 [ceil(N/128), ceil(K/128)]; tile (i, j) covers rows 128i.., cols 128j..;
                      W ~= weight * weight_scale_inv (multiply; amax/448 of the tile)
  * activations       quantized at run time per token per contiguous 128-channel group by
                      `fp8_quantize_activations` (a separate one-pass kernel): s = max(amax, 1e-10)/448,
                      x_fp8 = clamp(x/s, -448, 448) -> (x_fp8 [M, K] e4m3, x_scale [M, ceil(K/128)] fp32)
  * GEMM: acc += dot(x_fp8, w_fp8)[kblock] * x_scale[m, kb] * weight_scale_inv[n // 128, kb].
  Needs sm_89+ (fp8 MMA).

INT4 weight-only, group 128 along K (W4A16):
  * qweight  uint8 [N, K/2]: two 4-bit codes per byte along K; byte (n, j) holds k = 2j in its low
             nibble (bits 0-3) and k = 2j+1 in its high nibble (bits 4-7). This is ONNX Runtime
             MatMulNBits' byte order flattened per row (ORT: [N, K/bs, bs/2]).
  * scales   [N, K/group] in the activation dtype (or fp32)
  * zeros    optional uint8 [N, K/group], one unpacked code 0..15 per group (asymmetric AWQ/GPTQ-v2
             style after unpacking); absent = symmetric, zero point 8 (code = signed value + 8)
  * W[n, k] = (code[n, k] - zero[n, k // group]) * scale[n, k // group]
  Importers of AutoAWQ/GPTQ/compressed-tensors repack into this (their packings are in
  /work/shared/notes/quantization.md §3.2).
"""

from __future__ import annotations

from qwen35c.backends.triton.aot import KernelSpec, ModelShapes, make_spec
from qwen35c.backends.triton.gemm.dense import gemm_config, gemm_kernel, linear
from qwen35c.backends.triton.gemm.fp8 import (
    ACT_QUANT_ROWS, fp8_act_quant_kernel, fp8_block_gemm_kernel, fp8_dynamic_expert_gemv_kernel, fp8_dynamic_gemm_kernel, fp8_block_linear, fp8_gemm_config, fp8_linear,
    fp8_quantize_activations,
)
from qwen35c.backends.triton.gemm.int4 import int4_gemm_config, int4_gemm_kernel, int4_linear

__all__ = ["linear", "fp8_quantize_activations", "fp8_block_linear", "fp8_linear", "int4_linear", "aot_specs"]

_DECODE_M, _PREFILL_M = 1, 4096


def _launch_options(cfg: dict) -> tuple[dict, dict]:
    cfg = dict(cfg)
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}, \
        {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def aot_specs(shapes: ModelShapes) -> list[KernelSpec]:
    """One dense, FP8 and INT4 GEMM config per phase (decode M<=32, prefill); bf16 activations."""
    specs: list[KernelSpec] = []
    dense_args = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                  "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    fp8_args = {"a_ptr": "*fp8e4nv", "a_s_ptr": "*fp32", "w_ptr": "*fp8e4nv", "w_s_ptr": "*fp32",
                "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_asm": "i32",
                "stride_wn": "i32", "stride_wsn": "i32", "stride_ym": "i32"}
    int4_args = {"x_ptr": "*bf16", "qw_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "y_ptr": "*bf16",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32",
                 "stride_zn": "i32", "stride_ym": "i32"}
    aligned = ("K", "stride_xm", "stride_wn", "stride_ym", "stride_am", "stride_qn")
    for phase, m in (("decode", _DECODE_M), ("prefill", _PREFILL_M)):
        const, launch = _launch_options(gemm_config(m))
        specs.append(make_spec(f"gemm_bf16_{phase}[{shapes.name}]", gemm_kernel, dense_args, const,
                               aligned=tuple(a for a in aligned if a in dense_args), **launch))
        const, launch = _launch_options(fp8_gemm_config(m))
        specs.append(make_spec(f"gemm_fp8_block_{phase}[{shapes.name}]", fp8_block_gemm_kernel, fp8_args, const,
                               min_sm=89, aligned=tuple(a for a in aligned if a in fp8_args), **launch))
        const, launch = _launch_options(int4_gemm_config(m))
        const.update(GROUP_SIZE=128, HAS_ZERO=False)
        specs.append(make_spec(f"gemm_int4_g128_{phase}[{shapes.name}]", int4_gemm_kernel, int4_args, const,
                               aligned=tuple(a for a in aligned if a in int4_args), **launch))
    specs.append(make_spec(f"gemm_fp8_dynamic_decode[{shapes.name}]", fp8_dynamic_gemm_kernel,
                           {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_s_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32",
                            "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_wsn": "i32",
                            "stride_ym": "i32"},
                           {**_launch_options(fp8_gemm_config(_DECODE_M))[0], "EMULATE_E4M3": False}, min_sm=89,
                           aligned=("K", "stride_xm", "stride_wn", "stride_ym"),
                           **_launch_options(fp8_gemm_config(_DECODE_M))[1]))
    specs.append(make_spec(f"fp8_expert_gemv[{shapes.name}]", fp8_dynamic_expert_gemv_kernel,
                           {"x_ptr": "*bf16", "e_ptr": "*i64", "w_ptr": "*fp8e4nv", "w_s_ptr": "*fp32",
                            "y_ptr": "*bf16", "N": "i32", "K": "i32"},
                           {"BLOCK_N": 64, "EMULATE_E4M3": False}, min_sm=89, aligned=("K",)))
    specs.append(make_spec(f"fp8_act_quant[{shapes.name}]", fp8_act_quant_kernel,
                           {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32",
                            "stride_xm": "i32", "stride_qm": "i32", "stride_sm": "i32"},
                           {"GROUP": 128, "ROWS": ACT_QUANT_ROWS, "EMULATE_E4M3": False}, num_warps=8, num_stages=1,
                           min_sm=89))
    return specs
