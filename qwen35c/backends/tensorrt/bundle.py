"""Stage 1 of the tensorrt backend: the stateful IR as an ONNX graph in TensorRT's dialect.

The ONNX backend's emitter with a narrower vocabulary: opset 23, standard ops only (RMSNormalization,
RotaryEmbedding and Attention-23, which TensorRT >= 10.15 parses natively; the KV cache written by
ScatterElements) and, for what TensorRT has no op for, plugin nodes of the `qwen35c` domain
(`plugins.py`): the GDN's causal conv and its gated delta rule. No `com.microsoft` op appears; the
emitter refuses to write a graph that has one. Every plugin node carries `plugin_namespace` and
`aot = 1` (TensorRT's parser picks the plugin's ahead-of-time implementation), and its outputs carry
their shapes as value_info (the plugin schemas registered here give the ONNX checker their arity and
attributes; onnx cannot run a Python shape function).

State layouts (engine I/O, recorded in the manifest): conv state [B, C, W-1] (the IR's, which the
conv kernel reads), recurrent state fp32 [B, HV, K, V], KV caches [B, Hkv, S, D].

Precision: every GEMM runs in bf16 on bf16 weights (the embedding / tied LM head table, the linears'
weights and stacked experts are bf16 initializers: the checkpoint's values rounded to bf16, as the
triton pack stores them), its output cast back to fp32; the residual stream, norms, RoPE, attention and
the GDN plugins stay fp32 (the recurrent state fp32 as everywhere). INT4 weights are dequantized with
fp32 scales (the emulation's values) and cast to bf16 for the GEMM; the FP8 plugin takes fp32 x.
ONNX Runtime's CPU provider has no bf16 GEMM, so the CPU check runs the bundle with its bf16 widened
to fp32 (`widen_bf16`: bf16 casts become identities, bf16 initializers are cast once to fp32): fp32
activations on the bundle's own weights, as the triton backend's interpreter check runs.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qwen35c.backends.onnx.emit import OPSET, STREAM_BYTES, EmitError, OnnxEmitter, _np
from qwen35c.backends.tensorrt.plugins import NAMESPACE, model_dims, plugin_defs

DOMAINS = ("", NAMESPACE)


class TensorRTEmitter(OnnxEmitter):
    opset_imports = (("", OPSET), (NAMESPACE, 1))

    def __init__(self, graph, weights, out_dir, **kwargs):
        super().__init__(_without_commit(graph), weights, out_dir, **kwargs)
        gdn = next((n for n in self.graph.nodes if n.op == "gated_deltanet"), None)
        self.plugin_dims = None
        if gdn is not None:
            width = int(gdn.inputs[3].type.shape[-1])       # conv weight [C, 1, W]
            self.plugin_dims = model_dims(gdn.attrs, width)
        self.plugins = {d.op: d for d in plugin_defs(self.plugin_dims)}
        self.used: set[str] = set()
        self.plugin_shapes: dict[str, tuple] = {}
        self.notes: list[str] = []

    def conv_state_layout(self, shape: list) -> tuple[list, str]:
        return list(shape), "[B, C, W-1] the IR's (the conv plugin's) layout"

    def _residual_add(self, value):
        return None          # no SkipSimplifiedLayerNormalization: Add + RMSNormalization

    def _gqa_ok(self, node) -> bool:
        return False         # no GroupQueryAttention: ScatterElements into the cache + Attention-23

    # ---- bf16 GEMMs ---------------------------------------------------------------------------------

    def _bf16_weight(self, value, transform: str = "") -> str:
        """A weight as a bf16 initializer ('t': transposed to [in, out]); a large one is converted and
        written a row chunk at a time (the values are bf16-rounded already: the conversion is exact)."""
        key = (id(value), "bf16" + transform)
        if key not in self.init_cache:
            name = value.name + ".bf16" + (f".{transform}" if transform else "")
            source = self.weights(value.producer.attrs["name"]) if value.producer.op == "weight" else None
            if source is not None and not transform and source.numel() * 2 > STREAM_BYTES:
                rows = max(1, STREAM_BYTES // max(1, source[0].numel() * 2))
                chunks = (_np(source[r:r + rows].to(torch.bfloat16)) for r in range(0, source.shape[0], rows))
                self.initializers.append(self._external(name, "bf16", list(source.shape), *self.data.write_rows(chunks)))
            else:
                tensor = self.evaluate(value)
                self.add_tensor(name, (tensor.t() if transform == "t" else tensor).contiguous().to(torch.bfloat16),
                                "bf16")
            self._released(value)
            self.init_cache[key] = name
        return self.init_cache[key]

    def _cast(self, x: str, to: int) -> str:
        """x cast to `to` (a TensorProto type), one Cast per source tensor."""
        key = ("cast", x, to)
        if key not in self.shared:
            self.shared[key] = self.node("Cast", [x], to=to)[0]
        return self.shared[key]

    def _bf16_matmul(self, x: str, w16: str, hint: str) -> str:
        """fp32 x -> bf16 GEMM with a bf16 [K, N] weight -> fp32."""
        y = self.node("MatMul", [self._cast(x, TensorProto.BFLOAT16), w16])[0]
        return self.node("Cast", [y], to=TensorProto.FLOAT, hint=hint)[0]

    def op_embedding(self, node):
        rows = self.node("Gather", [self._bf16_weight(node.inputs[0]), self._x(node, 1)], axis=0)[0]
        return self.node("Cast", [rows], to=TensorProto.FLOAT, hint="embed")

    def op_linear(self, node):
        x, w = node.inputs[0], node.inputs[1]
        if node.outputs[0] is self.logits_value:
            return self._lm_head(node)
        if not self.is_static(w):
            return super().op_linear(node)
        out = self._bf16_matmul(self.name(x), self._bf16_weight(w, "t"), node.outputs[0].name)
        if len(node.inputs) == 3:
            out = self.node("Add", [out, self.name(node.inputs[2])])[0]
        return [out]

    def _lm_head(self, node):
        """Logits at `logit_positions` only; a tied head reads the embedding's bf16 table (Gemm transB)."""
        x, w = node.inputs[0], node.inputs[1]
        H, V = x.type.shape[-1], w.type.shape[0]
        picked = self._cast(self._logit_rows(x), TensorProto.BFLOAT16)                       # [B, P, H]
        if self.tied_lm_head and self.embedding_table is not None:
            flat = self.node("Reshape", [picked, self.i64([-1, H])])[0]
            out = self.node("Gemm", [flat, self._bf16_weight(self.embedding_table)], transB=1)[0]
            shape = self.node("Concat", [self.dim("B"), self.i64([-1]), self.i64([V])], axis=0)[0]
            out = self.node("Reshape", [out, shape])[0]
        else:
            out = self.node("MatMul", [picked, self._bf16_weight(w, "t")])[0]
        return self.node("Cast", [out], to=TensorProto.FLOAT, hint="logits_raw")

    def _expert_matvec(self, rows: str, experts: str, w16: str) -> list[str]:
        """Each slot's bf16 expert matrix [O, H] gathered and applied to its row: [N, k, O] fp32."""
        mats = self.node("Gather", [w16, experts], axis=0)[0]                                 # [N, k, O, H]
        col = self.node("Unsqueeze", [self._cast(rows, TensorProto.BFLOAT16), self.i64([-1])])[0]
        out = self.node("Squeeze", [self.node("MatMul", [mats, col])[0], self.i64([-1])])[0]
        return self.node("Cast", [out], to=TensorProto.FLOAT)

    def _plugin(self, op: str, inputs: list[str], hint: str, shapes: list[tuple]) -> list[str]:
        defn = self.plugins[op]
        self.used.add(op)
        outs = self.node(op, inputs, n_out=len(defn.outputs), hint=hint, domain=NAMESPACE,
                         plugin_namespace=NAMESPACE, aot=1, **defn.attrs)
        self.plugin_shapes.update(zip(outs, shapes))
        return outs

    def op_gated_deltanet(self, node):
        """conv plugin -> q, k, v -> gated delta rule plugin. Right padding (steps >= lengths[b]) never
        reaches a state: the conv plugin gathers its state at lengths[b], and the raw gates a, b of a
        padded step are -inf, which leaves the recurrent state as it is (see plugins.py)."""
        a = node.attrs
        H, HV, K, V, W = (self.plugin_dims[n] for n in ("H", "HV", "K", "V", "W"))
        if node.inputs[0].dtype != "f32":
            raise EmitError(f"%{node.outputs[0].name}: the TensorRT bundle lowers gated_deltanet in f32 only "
                            f"(got {node.inputs[0].dtype})")
        mixed, a_in, b_in = self._x(node, 0), self._x(node, 1), self._x(node, 2)
        conv_state, state, lengths = self._x(node, 6), self._x(node, 7), self._x(node, 8)
        C = 2 * H * K + HV * V
        weight = self.initializer(node.inputs[3], "conv_w",
                                  tensor=self.evaluate(node.inputs[3]).float().reshape(C, W).contiguous())
        layer = a["layer"]
        y, new_conv = self._plugin("CausalConv1d", [mixed, weight, conv_state, lengths], f"L{layer}.conv",
                                   [("B", "T", C), ("B", C, W - 1)])
        q, k, v = self.node("Split", [y, self.i64([H * K, H * K, HV * V])], n_out=3, axis=2)
        below = self._steps_below(lengths)
        never = self.f32(np.full((1,), -np.inf, np.float32))
        gates = [self.node("Where", [below, x, never])[0] for x in (a_in, b_in)]
        a_log = self.initializer(node.inputs[4], "A_log", tensor=self.evaluate(node.inputs[4]).float())
        dt_bias = self.initializer(node.inputs[5], "dt_bias", tensor=self.evaluate(node.inputs[5]).float())
        o, new_state = self._plugin("GatedDeltaRule", [q, k, v, *gates, a_log, dt_bias, state], f"L{layer}.gdn",
                                    [("B", "T", HV * V), ("B", HV, K, V)])
        self.known_shapes[o] = ("B", "T", HV * V)
        return [self.node("Reshape", [o, self.i64([0, 0, HV, V])])[0], new_conv, new_state]

    # ---- INT4 W4A16: blocked DequantizeLinear-21 of signed INT4 weights, then MatMul ----------------

    def _quantized(self, node) -> None:
        a = node.attrs
        x = self.name(node.inputs[0])
        if node.outputs[0] is self.logits_value:
            x = self._logit_rows(node.inputs[0])
        if a["format"] == "fp8" and a.get("granularity") == "block" and a.get("activations") == "dynamic":
            self.names[id(node.outputs[0])] = self._fp8_linear(node, x)
        elif a["format"] == "int4" and a.get("activations", "none") in ("none", None) and a.get("bits", 4) == 4:
            self.names[id(node.outputs[0])] = self._int4_linear(node, x)
        else:
            raise EmitError(f"%{node.outputs[0].name}: the TensorRT bundle lowers INT4 weight-only linears "
                            f"(W4A16) and FP8 block-128 with dynamic activations, not {a['format']}{' with 8-bit codes' if a.get('bits', 4) == 8 else ''} "
                            f"{a.get('granularity', '')} with {a.get('activations')} activations")

    def _int4_linear(self, node, x: str) -> str:
        """MatMul(x, DequantizeLinear(INT4 [K, N], scales [K/g, N], axis 0, block g))."""
        from qwen35c.quant.formats import int4_unpack_codes

        a = node.attrs
        parts = list(node.inputs[1:])
        codes, scales = self.evaluate(parts.pop(0)), self.evaluate(parts.pop(0)).float()
        zeros = self.evaluate(parts.pop(0)) if a["has_zeros"] else None
        g_idx = self.evaluate(parts.pop(0)) if a["has_g_idx"] else None
        if a["has_pre_scale"]:
            x = self.node("Mul", [x, self.name(parts.pop(0))])[0]
        codes = int4_unpack_codes(codes)                                           # [N, K] 0..15
        if g_idx is not None:       # act-order: permute K so that each group is contiguous (exact)
            perm = torch.argsort(g_idx.long(), stable=True)
            x = self.node("Gather", [x, self.i64(perm.tolist())], axis=-1)[0]
            codes = codes[:, perm]
        w = self._dequantized_int4(codes.t(), scales.t(), None if zeros is None else zeros.t(), 0, a["group_size"],
                                   node.outputs[0].name)                           # [K, N]
        return self._bf16_matmul(x, self.node("Cast", [w], to=TensorProto.BFLOAT16)[0], node.outputs[0].name)

    def _fp8_linear(self, node, x: str) -> str:
        """qwen35c::Fp8Linear on the [M, K] view of x: E4M3 weight bytes (uint8), fp32 block scales."""
        n, k = node.attrs["out_features"], node.attrs["in_features"]
        codes, scale = self.evaluate(node.inputs[1]), self.evaluate(node.inputs[2]).float()
        hint = node.outputs[0].name
        w = self._add(codes.contiguous().view(torch.uint8), hint + "_e4m3", "u8")
        s = self._add(scale.contiguous(), hint + "_wscale", "f32")
        lead = self.node("Shape", [x], end=-1)[0]
        flat = self.node("Reshape", [x, self.i64([-1, k])])[0]
        y = self._plugin("Fp8Linear", [flat, w, s], hint, [(f"{hint}_M", n)])[0]
        return self.node("Reshape", [y, self.node("Concat", [lead, self.i64([n])], axis=0)[0]], hint=hint)[0]

    def _fp8_experts(self, node, rows: str, experts: str, parts: dict, halves: int) -> str:
        """qwen35c::Fp8ExpertLinear over the [slots, H] rows with the pack's FP8 experts (E4M3 bytes, fp32
        block scales). gate_up holds two projections quantized on their own (`halves` = 2: gate rows,
        then up rows, each with its own 128-row scale blocks): one plugin each, outputs concatenated."""
        e, o, h = parts["weight"].shape
        k = node.inputs[2].type.shape[1]
        hint = node.outputs[0].name
        flat = self.node("Reshape", [rows, self.i64([-1, h])])[0]
        ids = self.node("Reshape", [experts, self.i64([-1])])[0]
        rows_per, blocks_per = o // halves, parts["scale"].shape[1] // halves
        outs = []
        for i in range(halves):
            codes = parts["weight"][:, i * rows_per:(i + 1) * rows_per]
            scale = parts["scale"][:, i * blocks_per:(i + 1) * blocks_per]
            w = self._add(codes.contiguous().view(torch.uint8), hint + "_e4m3", "u8")
            s = self._add(scale.float().contiguous(), hint + "_wscale", "f32")
            outs.append(self._plugin("Fp8ExpertLinear", [flat, ids, w, s], hint, [(f"{hint}_S", rows_per)])[0])
        y = outs[0] if halves == 1 else self.node("Concat", outs, axis=1)[0]
        return self.node("Reshape", [y, self.i64([-1, k, o])], hint=hint)[0]

    def _dequantized_int4(self, codes, scales, zeros, axis: int, group: int, hint: str) -> str:
        """DequantizeLinear(codes - 8 as INT4, scales[, zeros - 8], axis, block_size=group): TensorRT's
        weight-only INT4 form; the same values as `qwen35c.quant.formats`' dequantization."""
        w = self._int4_tensor(codes, hint + "_q4")
        inputs = [w, self._add(scales.float().contiguous(), hint + "_scales", "f32")]
        if zeros is not None:
            inputs.append(self._int4_tensor(zeros, hint + "_zp"))
        return self.node("DequantizeLinear", inputs, axis=axis, block_size=group, hint=hint + "_w")[0]

    def _int4_tensor(self, codes: torch.Tensor, hint: str) -> str:
        """Unsigned 4-bit codes (zero point 8) as an ONNX INT4 initializer: two values a byte, low nibble first."""
        flat = ((codes.to(torch.int16) - 8) & 0xF).to(torch.uint8).contiguous().reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        packed = (flat[0::2] | (flat[1::2] << 4)).numpy()
        name = self.fresh(hint)
        self.initializers.append(self._external(name, "i4", list(codes.shape), *self.data.write(packed)))
        return name

    def _add(self, tensor: torch.Tensor, hint: str, dtype: str) -> str:
        name = self.fresh(hint)
        self.add_tensor(name, tensor, dtype)
        return name

    def op_grouped_linear(self, node):
        """Stacked experts [E, O, H]: the triton pack's INT4 experts (RTN, `experts.py`) when the recipe
        quantizes them (`not_lowered`), dequantized along H by DequantizeLinear; else as stored."""
        weight = node.inputs[1].producer.attrs["name"] if node.inputs[1].producer.op == "weight" else None
        record = self.graph.metadata.get("quantization") or {}
        rows, experts = self._x(node, 0), self._x(node, 2)
        if weight is None or weight not in record.get("not_lowered", []):
            return self._expert_matvec(rows, experts, self._bf16_weight(node.inputs[1]))
        from qwen35c.backends.triton.experts import expert_format, quantize_stacked, why_not

        fmt = expert_format(record.get("recipe"))
        stacked = self.evaluate(node.inputs[1])
        hidden, inter = (stacked.shape[2], stacked.shape[1] // 2) if weight.endswith("gate_up_proj") else \
            (stacked.shape[1], stacked.shape[2])
        reason = why_not(fmt, hidden, inter)
        if reason is not None:          # as the triton pack (and so the emulating reference): kept as stored
            self.notes.append(f"{weight}: routed experts kept high precision ({reason})")
            return self._expert_matvec(rows, experts, self._bf16_weight(node.inputs[1]))
        gate_up = weight.endswith("gate_up_proj")
        parts, _ = quantize_stacked(stacked, fmt, "gate_up" if gate_up else "down")
        if fmt[0] == "fp8":
            self._released(node.inputs[1])
            return [self._fp8_experts(node, rows, experts, parts, 2 if gate_up else 1)]
        from qwen35c.quant.formats import int4_unpack_codes

        e, o, h = stacked.shape
        codes = int4_unpack_codes(parts["qweight"].reshape(e * o, h // 2)).reshape(e, o, h)
        w = self._dequantized_int4(codes, parts["scales"], None, 2, fmt[1], node.outputs[0].name)
        self._released(node.inputs[1])
        return self._expert_matvec(rows, experts, self.node("Cast", [w], to=TensorProto.BFLOAT16)[0])

    def op_quantized_embedding(self, node):
        raise EmitError(f"%{node.outputs[0].name}: the TensorRT bundle has no quantized embedding lookup "
                        f"(an INT4 target keeps the embedding high precision)")

    op_quantized_moe = op_quantized_embedding

    def emit(self):
        result = super().emit()
        model = onnx.load(str(self.model_file), load_external_data=False)
        foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in DOMAINS})
        if foreign:
            raise EmitError(f"the TensorRT bundle has ops outside the standard and {NAMESPACE} domains: "
                            f"{', '.join(foreign)}")
        produced = {o for n in model.graph.node for o in n.output}
        outputs = {o.name for o in model.graph.output}
        for name, dims in self.plugin_shapes.items():
            if name in produced and name not in outputs:
                model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)))
        self.model_file.write_bytes(model.SerializeToString(deterministic=True))
        return result


def _without_commit(graph):
    """The graph without its speculative `commit` input (the bundle has no verify step yet): the GDN
    states come back after all `lengths` tokens, as for an ordinary step."""
    commit = next((v for v in graph.inputs if v.name == "commit"), None)
    if commit is None:
        return graph
    graph = graph.clone()
    index = next(i for i, v in enumerate(graph.inputs) if v.name == "commit")
    commit = graph.inputs.pop(index)
    graph.input_attrs.pop(index)
    for node in graph.nodes:
        node.inputs = [v for v in node.inputs if v is not commit]
    graph.metadata["commit"] = False
    return graph


def widen_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The bundle with its bf16 widened to fp32, for ONNX Runtime's CPU provider (no bf16 GEMM): a
    Cast to bf16 becomes an Identity, a bf16 initializer is cast to fp32 once (exact), bf16
    value_info is dropped. Every value is then what the bundle computes with fp32 activations."""
    graph = model.graph
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to == TensorProto.BFLOAT16:
            node.op_type = "Identity"
            del node.attribute[:]
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            wide = tensor.name
            tensor.name = wide + "__bf16"
            casts.append(helper.make_node("Cast", [tensor.name], [wide], to=TensorProto.FLOAT, name=wide + "__widen"))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.type.tensor_type.elem_type != TensorProto.BFLOAT16]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model


_registered_schemas = False


def register_schemas() -> None:
    """The plugin ops' schemas, registered with onnx (once per process) so the checker knows them."""
    global _registered_schemas
    if _registered_schemas:
        return
    from onnx.defs import OpSchema, register_schema

    elem = {"f32": "tensor(float)", "i64": "tensor(int64)", "e4m3": "tensor(uint8)"}
    for defn in plugin_defs({"H": 1, "HV": 1, "K": 16, "V": 16, "W": 4}):     # ports and attribute names
        types = sorted({p.dtype for p in defn.inputs + defn.outputs})
        param = {t: f"T_{t}" for t in types}
        attributes = [OpSchema.Attribute(n, OpSchema.AttrType.INT, "per-model constant") for n in defn.attrs]
        attributes += [OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                       OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: the ahead-of-time implementation")]
        register_schema(OpSchema(
            defn.op, NAMESPACE, 1, defn.doc,
            inputs=[OpSchema.FormalParameter(p.name, param[p.dtype]) for p in defn.inputs],
            outputs=[OpSchema.FormalParameter(p.name, param[p.dtype]) for p in defn.outputs],
            type_constraints=[(param[t], [elem[t]], "") for t in types], attributes=attributes))
    _registered_schemas = True


def check_bundle(model_file) -> None:
    """The ONNX checker (full, with the plugin schemas) and strict shape inference on the bundle."""
    register_schemas()
    onnx.checker.check_model(str(model_file))          # by path: external data is checked where it lives
    model = onnx.load(str(model_file), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


__all__ = ["DOMAINS", "TensorRTEmitter", "check_bundle", "register_schemas", "widen_bf16"]
