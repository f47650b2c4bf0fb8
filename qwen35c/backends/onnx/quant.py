"""ONNX lowering of quantized linears (the emitter calls `lower_quantized_linear(emitter, node)`).

The node is a `quantized_linear` from the `quantize` pass (qwen35c/passes/quantize.py): inputs
[x, packed tensors...] whose layout is described by its attributes (`format`, `granularity`,
`activations`, `group_size`, `has_zeros`, `has_g_idx`, `has_pre_scale`).

  INT4  -> [Mul(x, pre_scale)] -> com.microsoft MatMulNBits(accuracy_level 0, or 4 for activations=int8,x, B [N, K/bs, bs/2] u8, scales [N, K/bs],
           zero_points u8 [N, ceil(K/bs/2)] (asymmetric only; absent = 8), g_idx (act-order only)).
           The internal qweight [N, K/2] is exactly B's bytes (low nibble = even k).
  8-bit (the LM head with head-bits=8) -> the same MatMulNBits with bits=8: B [N, K/bs, bs] u8, zero point 128.
  INT4 embedding (a tied head's codes, tied-embedding=shared) -> GatherBlockQuantized over the head's B
           (bits 4 or 8, as the head's).
  INT4 routed experts (quantized_moe) -> router MatMul + com.microsoft QMoE (expert_weight_bits 4,
           block_size = group, swiglu with swiglu_fusion 1, normalize_routing_weights = norm_topk_prob): ORT
           takes the router logits and does softmax, top-k and the renormalisation itself, dequantizes each
           picked expert to fp32 and runs fp32 GEMMs (measured ≤ 3e-7 from `moe_eager` over the dequantized
           experts); its fc1 wants the gate and up rows interleaved (g0, u0, g1, u1, ...), permuted here.
  FP8   -> W^T = DequantizeLinear(codes^T [K, N] e4m3, scale) (opset 21; blocked along K with
           block_size 128 for fp8-block, the 128-row scale grid expanded along N; per-axis for channel;
           scalar for tensor) then MatMul. When the recipe is dynamic, x is fake-quantized first per
           token per 128-channel group (per token for tensor/channel; a partial last group is zero-padded,
           as in the emulation): s = max(amax, 1e-10)/448,
           Cast(Clip(x/s, ±448) -> e4m3, saturating RNE) -> float * s — the same rounding as
           `qwen35c.quant.formats.fp8_fake_quant_activations`; static: the same with the calibrated scale.
Each lowering is the ONNX image of the dequantize twin in `qwen35c.quant.formats`, so artifact vs
emulating reference differs only by matmul accumulation order.
"""

from __future__ import annotations

import torch
from onnx import TensorProto

__all__ = ["lower_quantized_embedding", "lower_quantized_linear", "lower_quantized_moe", "FP8_OPSET"]

FP8_OPSET = 21          # DequantizeLinear with block_size and float8 inputs


def _static(emitter, value) -> torch.Tensor:
    return emitter.evaluate(value)


def _add(emitter, tensor: torch.Tensor, hint: str, dtype: str) -> str:
    name = emitter.fresh(hint)
    emitter.add_tensor(name, tensor.contiguous(), dtype)
    return name


def _weight_key(value, part: str) -> str | None:
    """The key under which a tensor derived from weight `value` alone is shared between the graphs
    of an artifact (`OnnxEmitter.reusable`); None for a value that is not a checkpoint weight."""
    producer = value.producer
    return f"{producer.attrs['name']}|{part}" if producer is not None and producer.op == "weight" else None


def lower_quantized_linear(emitter, node, x: str | None = None) -> list[str]:
    """`x` replaces the node's input (the LM head's gathered logit rows)."""
    attrs = node.attrs
    x = emitter.name(node.inputs[0]) if x is None else x
    hint = node.outputs[0].name
    if attrs["format"] == "int4":
        return _lower_int4(emitter, node, x, hint)
    if attrs["format"] == "fp8":
        return _lower_fp8(emitter, node, x, hint)
    raise ValueError(f"quantized_linear %{hint}: unknown format '{attrs['format']}'")


def _lower_int4(emitter, node, x: str, hint: str) -> list[str]:
    a = node.attrs
    n, k, bs, bits = a["out_features"], a["in_features"], a["group_size"], a.get("bits", 4)
    inputs = list(node.inputs[1:])
    qweight_value, scales_value = inputs.pop(0), inputs.pop(0)
    qweight = _static(emitter, qweight_value) if a["has_g_idx"] else None
    zeros = _static(emitter, inputs.pop(0)) if a["has_zeros"] else None
    g_idx = _static(emitter, inputs.pop(0)) if a["has_g_idx"] else None
    pre = inputs.pop(0) if a["has_pre_scale"] else None
    if pre is not None:
        x = emitter.node("Mul", [x, emitter.name(pre)], hint=hint + "_awq")[0]
    perm = None
    if g_idx is not None:
        # why: ORT 1.32's MatMulNBits g_idx input did not reproduce act-order groups in our test;
        # permuting K so each group is contiguous is exact: x[:, perm] @ W[:, perm]^T == x @ W^T
        from qwen35c.quant.formats import int4_pack_codes, int4_unpack_codes
        perm = torch.argsort(g_idx.long(), stable=True)
        x = emitter.node("Gather", [x, emitter.i64(perm.tolist())], axis=-1, hint=hint + "_perm")[0]
        qweight = int4_pack_codes(int4_unpack_codes(qweight)[:, perm])
        g_idx = None
    act_dtype = node.inputs[0].dtype
    if perm is None:
        b = _int4_table(emitter, node.inputs[1], n, k, bs, qweight, bits)   # shared with a tied embedding's lookup
    else:
        b = _add(emitter, qweight.view(n, k // bs, bs // 2), hint + "_B", "u8")
    s = emitter.reusable(_weight_key(scales_value, f"scales-{act_dtype}"), hint + "_scales",
                       lambda: (_static(emitter, scales_value).to(node.inputs[0].type.torch_dtype), act_dtype))
    names = [x, b, s]
    if zeros is not None or g_idx is not None:
        if zeros is not None:
            z = zeros.to(torch.uint8)
            if z.shape[1] % 2:
                z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
            names.append(_add(emitter, (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous(), hint + "_zp", "u8"))
        else:
            names.append("")
        if g_idx is not None:
            names.append(_add(emitter, g_idx.to(torch.int32), hint + "_gidx", "i32"))
    # accuracy_level 4: MLAS quantizes x to int8 per token per `bs` block (amax/127, round half even) and
    # runs an int8 GEMM; the emulation rounds identically (formats.int4_fake_quant_activations). 0 = fp32.
    level = 4 if a.get("activations") == "int8" else 0
    return emitter.node("MatMulNBits", names, hint=hint, domain="com.microsoft", K=k, N=n, bits=bits, block_size=bs,
                        accuracy_level=level)


def _int4_table(emitter, value, n: int, k: int, bs: int, qweight: torch.Tensor | None = None, bits: int = 4) -> str:
    """The MatMulNBits B initializer [N, K/bs, bs*bits/8] u8 of a packed INT4 (8-bit) weight value, made
    once: a tied head and its shared embedding (GatherBlockQuantized) read the same bytes."""
    tables = emitter.__dict__.setdefault("int4_tables", {})      # per emitter, i.e. per graph
    if id(value) not in tables:
        def make():
            codes = _static(emitter, value) if qweight is None else qweight
            return codes.view(n, k // bs, bs * bits // 8), "u8"

        key = _weight_key(value, "int4-B") if qweight is None else None   # given codes are not the weight's
        tables[id(value)] = emitter.reusable(key, value.name + "_B", make)
    return tables[id(value)]


def lower_quantized_embedding(emitter, node) -> list[str]:
    """quantized_embedding(ids, qweight, scales) -> com.microsoft GatherBlockQuantized over the same B
    initializer as the tied head's MatMulNBits (data [V, H/bs, bs*bits/8] u8, zero point 8 / 128; scales
    [V, H/bs, 1] in the activation dtype; quantize_axis 2), reshaped to [..., H]."""
    a = node.attrs
    n, k, bs, bits = a["out_features"], a["in_features"], a["group_size"], a.get("bits", 4)
    ids, qweight, scales = node.inputs
    table = _int4_table(emitter, qweight, n, k, bs, bits=bits)
    s = _add(emitter, _static(emitter, scales).to(node.outputs[0].type.torch_dtype).reshape(n, k // bs, 1),
             node.outputs[0].name + "_scales", node.outputs[0].dtype)
    rows = emitter.node("GatherBlockQuantized", [table, emitter.name(ids), s], domain="com.microsoft",
                        gather_axis=0, quantize_axis=2, block_size=bs, bits=bits)[0]    # [..., H/bs, bs]
    shape = emitter.i64([0] * len(ids.type.shape) + [k])
    return emitter.node("Reshape", [rows, shape], hint=node.outputs[0].name)


def lower_quantized_moe(emitter, node) -> list[str]:
    x, router, gu_q, gu_s, down_q, down_s = node.inputs
    a, hint = node.attrs, node.outputs[0].name
    if x.dtype != "f32":
        raise ValueError(f"quantized_moe %{hint}: the ONNX lowering takes fp32 activations, not {x.dtype}")
    logits = emitter.node("MatMul", [emitter.name(x), emitter.initializer(router, "t")], hint=hint + "_router")[0]

    def interleaved(t: torch.Tensor) -> torch.Tensor:       # [E, 2I, c]: gate rows, then up -> g0, u0, g1, u1, ...
        e, rows, c = t.shape
        return t.view(e, 2, rows // 2, c).transpose(1, 2).reshape(e, rows, c)

    w1 = _add(emitter, interleaved(_static(emitter, gu_q)), hint + "_fc1", "u8")
    s1 = _add(emitter, interleaved(_static(emitter, gu_s).float()), hint + "_fc1_scales", "f32")
    w2 = _add(emitter, _static(emitter, down_q), hint + "_fc2", "u8")
    s2 = _add(emitter, _static(emitter, down_s).float(), hint + "_fc2_scales", "f32")
    return emitter.node("QMoE", [emitter.name(x), logits, w1, s1, "", w2, s2, ""], hint=hint, domain="com.microsoft",
                        k=a["top_k"], activation_type="swiglu", swiglu_fusion=1, expert_weight_bits=4,
                        block_size=a["group_size"], normalize_routing_weights=int(bool(a["norm_topk_prob"])),
                        activation_alpha=1.0, activation_beta=0.0)


def _fake_quant_fp8(emitter, x: str, k: int, group: int | None, scale: str | None, hint: str) -> str:
    """x [..., K] -> quantize-dequantize through E4M3 (see the module docstring)."""
    f8 = TensorProto.FLOAT8E4M3FN
    if scale is not None:                                 # static: one calibrated scale
        q = emitter.node("Clip", [emitter.node("Div", [x, scale])[0], emitter.f32(-448.0), emitter.f32(448.0)])[0]
        back = emitter.node("Cast", [emitter.node("Cast", [q], to=f8)[0]], to=TensorProto.FLOAT)[0]
        return emitter.node("Mul", [back, scale], hint=hint + "_xq")[0]
    width = k if group is None else group
    groups, pad = -(-k // width), (-k) % width
    shape_in = emitter.node("Shape", [x])[0]
    flat = emitter.node("Reshape", [x, emitter.i64([-1, k])])[0]
    if pad:   # a partial last group: zero-padded like fp8_quantize_activations (zeros never raise amax)
        flat = emitter.node("Pad", [flat, emitter.i64([0, 0, 0, pad])])[0]
    grouped = emitter.node("Reshape", [flat, emitter.i64([-1, groups, width])])[0]
    amax = emitter.node("ReduceMax", [emitter.node("Abs", [grouped])[0], emitter.i64([-1])], keepdims=1)[0]
    s = emitter.node("Div", [emitter.node("Max", [amax, emitter.f32(1e-10)])[0], emitter.f32(448.0)])[0]
    q = emitter.node("Clip", [emitter.node("Div", [grouped, s])[0], emitter.f32(-448.0), emitter.f32(448.0)])[0]
    back = emitter.node("Cast", [emitter.node("Cast", [q], to=f8)[0]], to=TensorProto.FLOAT)[0]
    back = emitter.node("Mul", [back, s])[0]
    if pad:
        back = emitter.node("Reshape", [back, emitter.i64([-1, groups * width])])[0]
        back = emitter.node("Slice", [back, emitter.i64([0]), emitter.i64([k]), emitter.i64([1])])[0]
    return emitter.node("Reshape", [back, shape_in], hint=hint + "_xq")[0]


def _lower_fp8(emitter, node, x: str, hint: str) -> list[str]:
    a = node.attrs
    n, k = a["out_features"], a["in_features"]
    inputs = list(node.inputs[1:])
    codes, scale = _static(emitter, inputs.pop(0)), _static(emitter, inputs.pop(0)).float()
    input_scale = inputs.pop(0) if a["activations"] == "static" else None
    xdtype = node.inputs[0].dtype
    if xdtype != "f32":
        x = emitter.node("Cast", [x], to=TensorProto.FLOAT)[0]
    if a["activations"] == "dynamic":
        x = _fake_quant_fp8(emitter, x, k, 128 if a["granularity"] == "block" else None, None, hint)
    elif input_scale is not None:
        x = _fake_quant_fp8(emitter, x, k, None, emitter.name(input_scale), hint)
    # the raw E4M3 bytes (numpy has no float8; the initializer's data type says FLOAT8E4M3FN)
    codes_t = _add(emitter, codes.t().contiguous().view(torch.uint8), hint + "_w8", "f8e4m3")   # [K, N]
    if a["granularity"] == "block":
        grid = scale.repeat_interleave(128, dim=0)[:n].t().contiguous()              # [ceil(K/128), N]
        s = _add(emitter, grid, hint + "_wscale", "f32")
        w = emitter.node("DequantizeLinear", [codes_t, s], axis=0, block_size=128)[0]
    elif a["granularity"] == "channel":
        s = _add(emitter, scale.reshape(n), hint + "_wscale", "f32")
        w = emitter.node("DequantizeLinear", [codes_t, s], axis=1)[0]
    else:
        s = emitter.f32(float(scale.reshape(())))
        w = emitter.node("DequantizeLinear", [codes_t, s])[0]
    out = emitter.node("MatMul", [x, w], hint=hint)[0]
    if xdtype != "f32":
        out = emitter.node("Cast", [out], to={"f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[xdtype])[0]
    return [out]
