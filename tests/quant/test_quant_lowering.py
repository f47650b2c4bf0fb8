"""The quantize pass (IR) and the ONNX lowering of quantized linears, checked numerically."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import qwen35c.passes.quantize  # noqa: F401  (registers the pass and the quantized_linear op)
from qwen35c.backends.onnx.quant import lower_quantized_linear
from qwen35c.graph.interpreter import run
from qwen35c.graph.ir import Graph, TensorType
from qwen35c.passes.manager import PassManager
from qwen35c.quant import calibrate, parse_scheme
from qwen35c.quant.algorithms import quantize_weight
from qwen35c.quant.formats import fake_quant_activations
from qwen35c.quant.model import QuantizedModel
from qwen35c.passes.quantize import quantized_weight_source

NAMES = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate.weight",
         "model.layers.3.self_attn.o_proj.weight"]


def _graph():
    g = Graph()
    x = g.add_input("x", TensorType("f32", ("B", 256)))
    out = x
    for i, name in enumerate(NAMES):
        shape = (4, 256) if "gate" in name else (256, 256)
        w = g.add_node("weight", [], [TensorType("f32", shape)], {"name": name})
        y = g.add_node("linear", [x], [TensorType("f32", ("B", shape[0]))], {}).output
        g.nodes[-1].inputs.append(w.output)
        if shape[0] == 256:
            out = y
    g.add_output(out)
    return g


def _weights():
    gen = torch.Generator().manual_seed(0)
    table = {n: torch.randn((4, 256) if "gate" in n else (256, 256), generator=gen) * 0.05 for n in NAMES}
    return table.__getitem__


@pytest.mark.parametrize("scheme", ["fp8-block128", "fp8-channel", "int4-rtn", "int4-awq"])
def test_quantize_pass_interprets_as_emulation(scheme):
    g = _graph()
    pipeline = f"quantize{{scheme={scheme} include=*.self_attn.*}}"
    result = PassManager(pipeline).run(g)
    meta = g.metadata["quantization"]
    assert meta["label"] == parse_scheme(scheme).label
    assert "model.layers.0.mlp.gate.weight" in meta["kept"]                        # router: exact name, kept
    assert set(meta["quantized"]) == {NAMES[0], NAMES[2]}
    assert [n.op for n in g.nodes].count("quantized_linear") == 2
    base = _weights()
    recipe = parse_scheme(scheme, include=("*.self_attn.*",))
    x = torch.randn(5, 256)
    quantized = None
    if recipe.needs_calibration:
        rows = torch.randn(64, 256) * torch.linspace(0.2, 4, 256)
        quantized = QuantizedModel(recipe, {n: quantize_weight(base(n), recipe, rows) for n in (NAMES[0], NAMES[2])})
    out = list(run(g, {"x": x}, quantized_weight_source(base, recipe, quantized)).values())[0]
    q = quantized.weights[NAMES[2]] if quantized else quantize_weight(base(NAMES[2]), recipe)
    xq = fake_quant_activations(x, q)
    if getattr(q, "pre_scale", None) is not None:
        xq = xq * q.pre_scale
    assert torch.allclose(out, xq @ q.dequantize().t(), rtol=1e-5, atol=1e-6)
    del result


class _MiniEmitter:
    """The subset of OnnxEmitter that lower_quantized_linear uses, writing inline initializers."""

    def __init__(self, tensors):
        self.nodes, self.inits, self.tensors, self.counter = [], [], tensors, 0

    def fresh(self, hint):
        self.counter += 1
        return f"{hint}__{self.counter}"

    def name(self, value):
        if value.producer is None:
            return value.name
        return self._init(self.evaluate(value), value.dtype)

    def evaluate(self, value):
        return self.tensors[value.producer.attrs["name"]]

    def session(self, out, rows, features):
        """An ORT session over the emitted nodes: x [rows, features] -> out."""
        model = helper.make_model(
            helper.make_graph(self.nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, features])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits),
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def initializer(self, value, transform=""):
        tensor = self.evaluate(value)
        return self._init(tensor.t() if transform == "t" else tensor, value.dtype)

    def _init(self, tensor, dtype):
        name = self.fresh("t")
        self.add_tensor(name, tensor, dtype)
        return name

    def reusable(self, key, hint, make):   # one graph: nothing to share
        tensor, dtype = make()
        name = self.fresh(hint)
        self.add_tensor(name, tensor, dtype)
        return name

    def add_tensor(self, name, tensor, dtype):
        codes = {"f32": TensorProto.FLOAT, "u8": TensorProto.UINT8, "i32": TensorProto.INT32,
                 "f8e4m3": TensorProto.FLOAT8E4M3FN}
        array = (tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor).contiguous().numpy()
        proto = helper.make_tensor(name, codes[dtype], list(array.shape), array.tobytes(), raw=True)
        self.inits.append(proto)

    def node(self, op, inputs, n_out=1, hint=None, domain="", outputs=None, **attrs):
        outs = outputs or [self.fresh(hint or op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, domain=domain or None, **attrs))
        return outs

    def const(self, array, hint="c"):
        name = self.fresh(hint)
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def i64(self, values):
        return self.const(np.asarray(values, dtype=np.int64))

    def f32(self, value):
        return self.const(np.asarray(value, dtype=np.float32))


@pytest.mark.parametrize("scheme,options", [("fp8-block128", {}), ("fp8-channel", {}), ("fp8-tensor", {}),
                                            ("int4-rtn", {}), ("int4-rtn", {"symmetric": False}),
                                            ("int4-rtn", {"scales": "mse"}), ("int4-gptq", {"scales": "mse"}),
                                            ("int4-awq", {}), ("int4-gptq", {"act_order": True, "static_groups": False})])
def test_onnx_lowering_matches_emulation(scheme, options):
    g = _graph()
    spelled = " ".join(f"{k.replace('_', '-')}={str(v).lower()}" for k, v in options.items())
    PassManager(f"quantize{{scheme={scheme} {spelled} include=*.self_attn.*}}").run(g)
    recipe = parse_scheme(scheme, include=("*.self_attn.*",), **options)
    base = _weights()
    rows = torch.randn(128, 256) * torch.linspace(0.2, 4, 256)
    amax = rows.abs().max()
    quantized = QuantizedModel(recipe, {n: quantize_weight(base(n), recipe, rows, amax) for n in (NAMES[0], NAMES[2])})
    source = quantized_weight_source(base, recipe, quantized)
    node = next(n for n in g.nodes if n.op == "quantized_linear" and n.attrs["weight"] == NAMES[2])
    tensors = {v.producer.attrs["name"]: source(v.producer.attrs["name"]) for v in node.inputs[1:]}
    emitter = _MiniEmitter(tensors)
    (out,) = lower_quantized_linear(emitter, node)
    session = emitter.session(out, "B", 256)
    x = torch.randn(6, 256) * torch.linspace(0.2, 4, 256)
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    q = quantized.weights[NAMES[2]]
    xq = fake_quant_activations(x, q)
    if getattr(q, "pre_scale", None) is not None:
        xq = xq * q.pre_scale
    want = xq @ q.dequantize().t()
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 4e-5, err   # measured worst 3.8e-6 (relative to max |want|) over the schemes


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_int8_activations_lowering_matches_emulation(group_size):
    """activations=int8 -> MatMulNBits accuracy_level=4: ORT's int8 GEMM input equals
    formats.int4_fake_quant_activations (per token per weight group, amax/127, RNE) to fp32
    accumulation order, for one token (GEMV path) and many (GEMM path)."""
    import dataclasses

    from qwen35c.quant.formats import gemm_input

    g = _graph()
    PassManager(f"quantize{{scheme=int4-gptq group-size={group_size} activations=int8 include=*.self_attn.*}}").run(g)
    assert g.metadata["quantization"]["label"] == f"int4-gptq-g{group_size}-a8"
    recipe = parse_scheme("int4-gptq", group_size=group_size, activations="int8", include=("*.self_attn.*",))
    base = _weights()
    rows = torch.randn(128, 256) * torch.linspace(0.2, 4, 256)
    quantized = QuantizedModel(recipe, {n: quantize_weight(base(n), recipe, rows) for n in (NAMES[0], NAMES[2])})
    source = quantized_weight_source(base, recipe, quantized)
    node = next(n for n in g.nodes if n.op == "quantized_linear" and n.attrs["weight"] == NAMES[2])
    assert node.attrs["activations"] == "int8"
    emitter = _MiniEmitter({v.producer.attrs["name"]: source(v.producer.attrs["name"]) for v in node.inputs[1:]})
    (out,) = lower_quantized_linear(emitter, node)
    assert [a.i for a in emitter.nodes[-1].attribute if a.name == "accuracy_level"] == [4]
    session = emitter.session(out, "B", 256)
    q = dataclasses.replace(quantized.weights[NAMES[2]], act_int8=True)
    gen = torch.Generator().manual_seed(1)
    for m in (1, 3, 64, 300):
        x = torch.randn(m, 256, generator=gen) * torch.linspace(0.2, 4, 256)
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        want = gemm_input(x, q) @ q.dequantize().t()
        scale = float(want.abs().max())
        err = float((got - want).abs().max()) / scale
        assert err < 5e-5, (m, err)    # measured <= 3e-6 relative (ORT 1.32, 2 threads)
        assert float((got - x @ q.dequantize().t()).abs().max()) / scale > 1e-3   # the int8 rounding is real
    # the interpreter (quantized_linear's twin) rounds the same way
    x = torch.randn(5, 256, generator=gen)
    interp = list(run(g, {"x": x}, source).values())[0]
    assert torch.allclose(interp, gemm_input(x, q) @ q.dequantize().t(), rtol=1e-5, atol=1e-6)


def test_eight_bit_shared_head_lowers_to_what_the_interpreter_computes():
    """head-bits=8 with tied-embedding=shared: the tied head is one 8-bit table [V, H] u8 read by
    MatMulNBits (bits 8, int8 activations) and by the lookup's GatherBlockQuantized (bits 8); ONNX
    Runtime computes what the interpreter (the dequantize twins) computes."""
    import dataclasses

    from qwen35c.backends.onnx.quant import lower_quantized_embedding
    from qwen35c.quant.formats import gemm_input

    g = Graph()
    ids = g.add_input("ids", TensorType("i64", ("B",)))
    table = g.add_node("weight", [], [TensorType("f32", (512, 256))], {"name": "model.embed_tokens.weight"}).output
    h = g.add_node("embedding", [table, ids], [TensorType("f32", ("B", 256))], {}).output
    h = g.add_node("mul", [h, h], [TensorType("f32", ("B", 256))], {}).output     # a nonlinearity between
    g.add_output(g.add_node("linear", [h, table], [TensorType("f32", ("B", 512))], {}).output)
    spec = "scheme=int4-rtn group-size=64 activations=int8 include=lm_head.weight tied-embedding=shared head-bits=8"
    PassManager(f"quantize{{{spec}}}").run(g)
    head = next(n for n in g.nodes if n.op == "quantized_linear")
    lookup = next(n for n in g.nodes if n.op == "quantized_embedding")
    assert head.attrs["bits"] == lookup.attrs["bits"] == 8 and head.inputs[1].type.shape == (512, 256)
    assert g.metadata["quantization"]["label"] == "int4-rtn-g64-h8-a8"
    assert g.metadata["quantization"]["embedding"] == "shared with lm_head.weight (8-bit codes)"
    weights = torch.randn(512, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    recipe = parse_scheme("int4-rtn", group_size=64, activations="int8", include=("lm_head.weight",),
                          tied_embedding="shared", head_bits=8)
    source = quantized_weight_source({"model.embed_tokens.weight": weights, "lm_head.weight": weights}.__getitem__,
                                     recipe)
    emitter = _MiniEmitter({v.producer.attrs["name"]: source(v.producer.attrs["name"]) for v in head.inputs[1:]})
    (rows,) = lower_quantized_embedding(emitter, lookup)
    squared = emitter.node("Mul", [rows, rows])[0]
    (out,) = lower_quantized_linear(emitter, head, squared)
    assert [n.op_type for n in emitter.nodes].count("MatMulNBits") == 1
    assert len([i for i in emitter.inits if i.data_type == TensorProto.UINT8]) == 1       # one table for both
    model = helper.make_model(
        helper.make_graph(emitter.nodes, "q", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], emitter.inits),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    token_ids = torch.tensor([0, 5, 511, 5])
    got = torch.from_numpy(session.run(None, {"ids": token_ids.numpy()})[0])
    want = list(run(g, {"ids": token_ids}, source).values())[0]
    q = quantize_weight(weights, recipe, bits=8)
    x = q.dequantize()[token_ids] ** 2
    assert torch.allclose(want, gemm_input(x, dataclasses.replace(q, act_int8=True)) @ q.dequantize().t(),
                          rtol=1e-5, atol=1e-6)
    assert float((got - want).abs().max()) / float(want.abs().max()) < 5e-5


def test_int4_int8_activations_recipe_rules():
    from qwen35c.errors import QwenError

    assert parse_scheme("int4-rtn").activations == "none"
    assert parse_scheme("int4-gptq", activations="int8").label == "int4-gptq-g128-a8"
    for bad in ({"scheme": "int4-awq", "activations": "int8"}, {"scheme": "fp8-block128", "activations": "int8"},
                {"scheme": "int4-gptq", "activations": "int8", "act_order": True, "static_groups": False},
                {"scheme": "int4-rtn", "activations": "static"},
                {"scheme": "int4-rtn", "head_bits": 6}, {"scheme": "int4-rtn", "head_bits": 8, "symmetric": False},
                {"scheme": "fp8-block128", "head_bits": 8}, {"scheme": "int4-awq", "scales": "mse"},
                {"scheme": "int4-rtn", "scales": "mse", "symmetric": False}, {"scheme": "int4-rtn", "scales": "max"},
                {"scheme": "int4-gptq", "head_bits": 8, "act_order": True, "static_groups": False}):
        with pytest.raises(QwenError):
            parse_scheme(bad.pop("scheme"), **bad)


# ---- routed experts: moe -> quantized_moe -> ONNX Runtime QMoE --------------------------------------

MOE = "model.layers.0.mlp"


def _moe_graph(e=8, h=64, i=32, top_k=2, norm=True):
    g = Graph()
    x = g.add_input("x", TensorType("f32", ("N", h)))
    shapes = {"gate.weight": (e, h), "experts.gate_up_proj": (e, 2 * i, h), "experts.down_proj": (e, h, i)}
    ws = [g.add_node("weight", [], [TensorType("f32", s)], {"name": f"{MOE}.{n}"}).output for n, s in shapes.items()]
    y = g.add_node("moe", [x, *ws], [TensorType("f32", ("N", h))], {"top_k": top_k, "norm_topk_prob": norm}).output
    g.add_output(y)
    gen = torch.Generator().manual_seed(0)
    table = {f"{MOE}.{n}": torch.randn(s, generator=gen) * (0.5 if "gate.weight" in n else 0.1) for n, s in shapes.items()}
    return g, table.__getitem__


def _moe_twin(x, base, group, top_k, norm):
    """Naive twin: each expert's gate / up / down quantized on its own (RTN), dequantized, reference moe."""
    from qwen35c.quant.formats import int4_quantize
    from reference.ops import moe_eager

    gu, down = base(f"{MOE}.experts.gate_up_proj"), base(f"{MOE}.experts.down_proj")
    i = gu.shape[1] // 2

    def dq(w):
        return int4_quantize(w, group, symmetric=True).dequantize()
    gu_q = torch.stack([torch.cat([dq(gu[e, :i]), dq(gu[e, i:])]) for e in range(gu.shape[0])])
    down_q = torch.stack([dq(down[e]) for e in range(down.shape[0])])
    return moe_eager(x, base(f"{MOE}.gate.weight"), gu_q, down_q, top_k, norm)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_quantized_moe_lowering_matches_twin(top_k, norm=True):
    """moe -> quantized_moe (INT4 RTN g16, every expert) -> QMoE: the interpreter and ONNX Runtime both equal
    the naive twin (experts quantized one by one, dequantized, reference moe) at 1, 63, 64, 65, 129 tokens."""
    from qwen35c.backends.onnx.quant import lower_quantized_moe

    g, base = _moe_graph(top_k=top_k, norm=norm)
    PassManager("quantize{scheme=int4-rtn group-size=16}").run(g)
    meta = g.metadata["quantization"]
    assert [n.op for n in g.nodes].count("quantized_moe") == 1 and not meta["not_lowered"]
    assert f"{MOE}.experts.7.down_proj.weight" in meta["quantized"] and len(meta["quantized"]) == 24
    recipe = parse_scheme("int4-rtn", group_size=16)
    source = quantized_weight_source(base, recipe)
    node = next(n for n in g.nodes if n.op == "quantized_moe")
    emitter = _MiniEmitter({v.producer.attrs["name"]: source(v.producer.attrs["name"]) for v in node.inputs[1:]})
    (out,) = lower_quantized_moe(emitter, node)
    session = emitter.session(out, "N", 64)
    gen = torch.Generator().manual_seed(2)
    for n in (1, 63, 64, 65, 129):
        x = torch.randn(n, 64, generator=gen)
        want = _moe_twin(x, base, 16, top_k, norm)
        interp = list(run(g, {"x": x}, source).values())[0]
        assert torch.allclose(interp, want, rtol=1e-5, atol=1e-6), n
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), n   # measured <= 3e-7 abs
        assert float((got - _moe_twin(x, base, 8, top_k, norm)).abs().max()) > 1e-4    # the codes matter


@pytest.mark.parametrize("pipeline,reason", [
    ("quantize{scheme=fp8-block128}", "INT4 only"),
    ("quantize{scheme=int4-rtn group-size=16 symmetric=false}", "symmetric INT4"),
    ("quantize{scheme=int4-rtn group-size=16 activations=int8}", "fp32-activations"),
    ("quantize{scheme=int4-rtn group-size=64}", "not a multiple of group 64"),
    ("quantize{scheme=int4-rtn group-size=16 exclude=*.experts.3.*}", "all together or not at all"),
    ("quantize{scheme=int4-rtn group-size=16} norm=false", "norm_topk_prob false")])
def test_moe_experts_not_lowered_say_why(pipeline, reason):
    """A layer's experts that cannot all be one symmetric-INT4 quantized_moe stay high precision, listed
    under not_lowered with the reason; nothing of them is listed as quantized."""
    pipeline, _, norm = pipeline.partition(" norm=")
    g, _ = _moe_graph(norm=norm != "false")
    PassManager(pipeline).run(g)
    meta = g.metadata["quantization"]
    assert [n.op for n in g.nodes].count("moe") == 1
    assert meta["not_lowered"] == [f"{MOE}.experts.down_proj", f"{MOE}.experts.gate_up_proj"]
    assert reason in meta["not_lowered_reason"] and not any(".experts." in n for n in meta["quantized"])
