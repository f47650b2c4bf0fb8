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

Activations are fp32 in this first bundle (weights stored fp32 from the checkpoint's values): the
graph is strongly typed as emitted, and the CPU check runs it unchanged. A bf16-typed graph (casts
around the GEMMs, bf16 KV caches) and the quantized GEMMs (FP8 block-128 plugin, INT4 blocked
DequantizeLinear) are the next steps; quantized targets are refused until then.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen35c.backends.onnx.emit import OPSET, EmitError, OnnxEmitter
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
        self.plugin_shapes: dict[str, tuple] = {}

    def conv_state_layout(self, shape: list) -> tuple[list, str]:
        return list(shape), "[B, C, W-1] the IR's (the conv plugin's) layout"

    def _residual_add(self, value):
        return None          # no SkipSimplifiedLayerNormalization: Add + RMSNormalization

    def _gqa_ok(self, node) -> bool:
        return False         # no GroupQueryAttention: ScatterElements into the cache + Attention-23

    def _plugin(self, op: str, inputs: list[str], hint: str, shapes: list[tuple]) -> list[str]:
        defn = self.plugins[op]
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

    def op_quantized_embedding(self, node):
        raise EmitError("the TensorRT bundle does not lower quantized weights yet (build an unquantized target)")

    op_quantized_moe = op_quantized_embedding

    def _quantized(self, node) -> None:
        self.op_quantized_embedding(node)

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


_registered_schemas = False


def register_schemas() -> None:
    """The plugin ops' schemas, registered with onnx (once per process) so the checker knows them."""
    global _registered_schemas
    if _registered_schemas:
        return
    from onnx.defs import OpSchema, register_schema

    elem = {"f32": "tensor(float)", "i64": "tensor(int64)"}
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


__all__ = ["DOMAINS", "TensorRTEmitter", "check_bundle", "register_schemas"]
