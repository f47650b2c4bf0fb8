"""cpu-int4 lowerings (issue 16): sibling quantized linears fused by fuse-projections, the tied LM
head quantized, the target's pipeline order. Small graphs, fast."""

from __future__ import annotations

import torch

import qwen35c.passes.fuse_projections  # noqa: F401
import qwen35c.passes.quantize  # noqa: F401
from qwen35c.graph.interpreter import run
from qwen35c.graph.ir import Graph, TensorType
from qwen35c.passes.manager import PassManager
from qwen35c.passes.quantize import quantized_weight_source
from qwen35c.quant import parse_scheme

SIBS = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight"]


def _siblings():
    g = Graph()
    x = g.add_input("x", TensorType("f32", ("B", 256)))
    outs = []
    for i, name in enumerate(SIBS):
        n = 128 * (i + 1)
        w = g.add_node("weight", [], [TensorType("f32", (n, 256))], {"name": name})
        y = g.add_node("linear", [x], [TensorType("f32", ("B", n))], {}).output
        g.nodes[-1].inputs.append(w.output)
        outs.append(y)
    for y in outs:
        g.add_output(y)
    return g


def _table():
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(128 * (i + 1), 256, generator=gen) * 0.05 for i, n in enumerate(SIBS)}


def test_fuse_projections_concatenates_quantized_siblings_exactly():
    for acts in ("none", "int8"):
        g, ref = _siblings(), _siblings()
        quant = f"quantize{{scheme=int4-rtn group-size=64 activations={acts} include=*.self_attn.*}}"
        PassManager(quant + ",fuse-projections{which=siblings}").run(g)
        PassManager(quant).run(ref)
        ops = [n.op for n in g.nodes]
        assert ops.count("quantized_linear") == 1 and ops.count("split") == 1, ops
        fused = next(n for n in g.nodes if n.op == "quantized_linear")
        assert fused.attrs["out_features"] == 768 and fused.attrs["activations"] == acts
        table = _table()
        recipe = parse_scheme("int4-rtn", group_size=64, activations=acts, include=("*.self_attn.*",))
        source = quantized_weight_source(table.__getitem__, recipe)
        x = torch.randn(5, 256)
        got = list(run(g, {"x": x}, source).values())
        want = list(run(ref, {"x": x}, source).values())
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fuse_projections_keeps_awq_siblings_apart():
    g = _siblings()
    PassManager("quantize{scheme=int4-awq include=*.self_attn.*},fuse-projections{which=siblings}").run(g)
    assert [n.op for n in g.nodes].count("quantized_linear") == 3          # per-linear pre_scale: no concat


def _tied_graph():
    g = Graph()
    ids = g.add_input("ids", TensorType("i64", ("B",)))
    table = g.add_node("weight", [], [TensorType("f32", (512, 256))], {"name": "model.embed_tokens.weight"}).output
    h = g.add_node("embedding", [table, ids], [TensorType("f32", ("B", 256))], {}).output
    logits = g.add_node("linear", [h, table], [TensorType("f32", ("B", 512))], {}).output
    g.add_output(logits)
    return g


def test_tied_lm_head_is_planned_as_lm_head():
    g = _tied_graph()
    PassManager("quantize{scheme=int4-rtn activations=int8 fp32-activations=lm_head.weight include=lm_head.weight}").run(g)
    meta = g.metadata["quantization"]
    assert meta["quantized"] == ["lm_head.weight"]
    q = next(n for n in g.nodes if n.op == "quantized_linear")
    assert q.attrs["weight"] == "lm_head.weight" and q.attrs["activations"] == "none"   # fp32 x for the head
    assert any(n.op == "embedding" and n.inputs[0].producer.attrs["name"] == "model.embed_tokens.weight"
               for n in g.nodes)                                                       # lookup keeps fp32


def test_cpu_int4_pipeline_quantizes_before_the_match_passes():
    from qwen35c.targets import TARGETS

    text = TARGETS["cpu-int4"].full_pipeline()
    names = [p.split("{", 1)[0] for p in text.split(",")]
    # quantize sees each moe whole (quantized_moe) and the plain linears before the match passes fuse them
    assert names.index("quantize") + 1 == names.index("lower-moe") < names.index("fuse-projections")
    # pipelines without the match passes keep the position right after lower-moe (before insert-state)
    std = TARGETS["a100-int4"].full_pipeline().split(",")
    assert [p.split("{", 1)[0] for p in std].index("quantize") + 1 == [p.split("{", 1)[0] for p in std].index("insert-state")


def test_tied_embedding_shared_gathers_the_heads_codes():
    """tied-embedding=shared: the lookup reads the head's packed INT4 parts (the same weight nodes, placed
    before it), and the interpreter's rows are the head's dequantized rows exactly."""
    from qwen35c.quant.formats import Int4Weight

    g = _tied_graph()
    spec = "scheme=int4-rtn group-size=64 include=lm_head.weight tied-embedding=shared"
    PassManager(f"quantize{{{spec}}}").run(g)
    lookup = next(n for n in g.nodes if n.op == "quantized_embedding")
    head = next(n for n in g.nodes if n.op == "quantized_linear")
    assert lookup.inputs[1] is head.inputs[1] and lookup.inputs[2] is head.inputs[2]
    assert not any(n.op == "embedding" for n in g.nodes)
    assert g.nodes.index(lookup.inputs[1].producer) < g.nodes.index(lookup)      # defined before use
    assert g.metadata["quantization"]["embedding"].startswith("shared")
    table = torch.randn(512, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    recipe = parse_scheme("int4-rtn", group_size=64, include=("lm_head.weight",), tied_embedding="shared")
    source = quantized_weight_source({"model.embed_tokens.weight": table, "lm_head.weight": table}.__getitem__, recipe)
    ids = torch.tensor([0, 7, 511])
    logits = list(run(g, {"ids": ids}, source).values())[0]
    q = Int4Weight(source("lm_head.weight#qweight"), source("lm_head.weight#scales").float(), None, 64)
    rows = q.dequantize()[ids]
    assert torch.allclose(logits, rows @ q.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_tied_embedding_shared_refusals():
    import pytest

    from qwen35c.errors import QwenError

    with pytest.raises(QwenError, match="tied-embedding=shared"):
        parse_scheme("int4-awq", tied_embedding="shared")
    with pytest.raises(QwenError, match="tied-embedding=shared"):
        parse_scheme("fp8-block128", tied_embedding="shared")
    g = _tied_graph()                       # the head kept: nothing to share, the lookup keeps its table
    PassManager("quantize{scheme=int4-rtn tied-embedding=shared}").run(g)
    assert any(n.op == "embedding" for n in g.nodes)
    assert g.metadata["quantization"]["embedding"].startswith("kept")


def test_cpu_int4_globs_may_miss_a_cut_model_but_user_globs_may_not():
    """The target's globs name every projection of the family: a model without attention layers (cut to
    fewer layers than the full-attention interval) still builds; a user's glob that matches nothing is
    still a typo and an error."""
    import pytest

    from qwen35c.errors import QwenError
    from qwen35c.targets import TARGETS

    g = _tied_graph()                                        # no self_attn / linear_attn at all
    PassManager(f"quantize{{{TARGETS['cpu-int4'].quantize}}}").run(g)
    assert g.metadata["quantization"]["quantized"] == ["lm_head.weight"]
    with pytest.raises(QwenError, match="match no tensor name"):
        PassManager("quantize{scheme=int4-rtn include=*.self_attn.q_proj.weight}").run(_tied_graph())
