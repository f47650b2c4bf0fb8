"""The IR's text form, serialized form, verifier and interpreter."""

from __future__ import annotations

import math
import re

import pytest
import torch

from qwen35c.graph import interpreter, serialize
from qwen35c.graph.ir import Graph, IRError, TensorType
from qwen35c.graph.text import ParseError, parse_graph, print_graph
from qwen35c.graph.verify import VerificationError, collect_errors, verify

SAMPLE = """\
graph @sample(%ids: i64[B, T] {high = 16}, %conv: f32[B, 6, 3] {state = "layers.0.conv"}) -> (f32[B, T, 16], f32[B, 6, 3] {state = "layers.0.conv"})
    attributes {preset = "tiny", eps = 1e-06, sizes = [1, 2.5, "x", true, none], nested = {a = -inf, "odd key" = nan}} {
  %emb = weight {name = "model.embed_tokens.weight"} : f32[16, 8]
  %h = embedding(%emb, %ids) : f32[B, T, 8]
  %nw = weight {name = "model.norm.weight"} : f32[8]
  %n = rms_norm(%h, %nw) {eps = 1e-06, offset = 1.0} : f32[B, T, 8]
  %lo, %hi = split(%n) {dim = 2, sizes = [3, 5]} : f32[B, T, 3], f32[B, T, 5]
  %c = constant {value = dense<bf16[2, 2]>[1.0, -0.5, 0.0078125, 3.0]} : bf16[2, 2]
  %cat = concat(%lo, %hi) {dim = -1} : f32[B, T, 8]
  %logits = linear(%cat, %emb) : f32[B, T, 16]
  return %logits, %conv
}
"""


def test_text_round_trips_exactly():
    graph = parse_graph(SAMPLE)
    assert print_graph(graph) == SAMPLE
    assert print_graph(parse_graph(print_graph(graph))) == SAMPLE


def test_parsed_graph_has_types_attrs_and_state():
    graph = parse_graph(SAMPLE)
    assert graph.value("h").type == TensorType("f32", ("B", "T", 8))
    assert graph.metadata["nested"]["a"] == -math.inf
    assert math.isnan(graph.metadata["nested"]["odd key"])
    const = graph.find("constant")[0].attrs["value"]
    assert const.dtype == torch.bfloat16 and const.shape == (2, 2)
    [(key, state_in, state_out)] = graph.state_pairs()
    assert key == "layers.0.conv" and state_in is state_out
    verify(graph)


def test_serialized_form_round_trips(tmp_path):
    graph = parse_graph(SAMPLE)
    serialize.save(graph, tmp_path)
    assert (tmp_path / "constants.safetensors").exists()
    assert "model.embed_tokens.weight" in (tmp_path / "graph.json").read_text()
    assert print_graph(serialize.load(tmp_path)) == SAMPLE


@pytest.mark.parametrize("text, message", [
    ("graph @g(%x: f32[B]) -> (f32[B]) {\n  return %y\n}", "undefined value %y"),
    ("graph @g(%x: f33[B]) -> (f32[B]) {\n  return %x\n}", "unknown dtype 'f33'"),
    ("graph @g(%x: f32[B]) -> (f32[B]) {\n  %y = exp(%z) : f32[B]\n  return %y\n}",
     "use of undefined value %z"),
    ("graph @g(%x: f32[B]) -> (f32[B]) {\n  %x = exp(%x) : f32[B]\n  return %x\n}",
     "defined twice"),
    ("graph @g(%x: f32[B]) -> (f32[B], f32[B]) {\n  return %x\n}", "declares 2 outputs"),
    ("graph @g(%x: f32[B]) -> (f32[4]) {\n  return %x\n}", "signature says f32[4]"),
    ("graph @g(%x: f32[B]) -> (f32[B]) {\n  %y = exp(%x) {a = 1, a = 2} : f32[B]\n  return %y\n}",
     "given twice"),
])
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ParseError, match=re.escape(message)):
        parse_graph(text)


def test_parse_error_has_line_and_column():
    with pytest.raises(ParseError, match=r"line 2, column 12"):
        parse_graph("graph @g(%x: f32[B]) -> (f32[B]) {\n  %y = exp(%q) : f32[B]\n  return %y\n}")


@pytest.mark.parametrize("body, message", [
    ("%y = linear(%x, %w) : f32[B, 5]", "declared f32[B, 5], the type rule gives f32[B, 3]"),
    ("%y = add(%x, %i) : f32[B, 4]", "operands must share one dtype"),
    ("%y = frobnicate(%x) : f32[B, 4]", "unknown op 'frobnicate'"),
    ("%y = softmax(%x) : f32[B, 4]", "missing attribute(s) dim"),
    ("%y = exp(%x, %x) : f32[B, 4]", "takes 1 inputs, got 2"),
    ("%y = reshape(%x) {shape = [\"B\", 5]} : f32[B, 5]", "reshape changes the element count"),
    ("%a, %b = split(%x) {dim = 1, sizes = [1, 2]} : f32[B, 1], f32[B, 2]", "do not add up"),
])
def test_verifier_rejects_bad_nodes(body, message):
    text = ("graph @g(%x: f32[B, 4], %i: i64[B, 4]) -> (f32[B, 4]) {\n"
            "  %w = weight {name = \"w\"} : f32[3, 4]\n"
            f"  {body}\n  return %x\n}}\n")
    graph = parse_graph(text)
    with pytest.raises(VerificationError) as info:
        verify(graph)
    assert message in str(info.value)
    assert "%x: f32[B, 4]" in str(info.value) or "frobnicate" in str(info.value)


def test_verifier_checks_state_pairing():
    graph = parse_graph("graph @g(%x: f32[B, 4], %s: f32[B, 2] {state = \"k\"}) -> (f32[B, 4]) {\n"
                        "  return %x\n}\n")
    assert any("has no paired state output" in e for e in collect_errors(graph))
    graph = parse_graph("graph @g(%x: f32[B, 4], %s: f32[B, 2] {state = \"k\"}) -> "
                        "(f32[B, 4] {state = \"k\"}) {\n  return %x\n}\n")
    assert any("input %s is f32[B, 2] but output %x is f32[B, 4]" in e for e in collect_errors(graph))
    graph = parse_graph("graph @g(%x: f32[B, 4]) -> (f32[B, 4] {state = \"k\"}) {\n  return %x\n}\n")
    assert any("has no paired state input" in e for e in collect_errors(graph))


def test_verifier_finds_dangling_values():
    graph = parse_graph("graph @g(%x: f32[4]) -> (f32[4]) {\n  %a = exp(%x) : f32[4]\n"
                        "  %b = neg(%a) : f32[4]\n  return %b\n}\n")
    graph.nodes.reverse()  # use before definition
    assert any("not defined before use" in e for e in collect_errors(graph))
    graph.nodes = []
    assert any("graph output %b is not defined" in e for e in collect_errors(graph))


def test_graph_api_edits():
    graph = Graph("edit")
    x = graph.add_input("x", TensorType("f32", ("N", 4)))
    a = graph.add_node("exp", [x], [x.type]).output
    b = graph.add_node("neg", [a], [x.type], before=a.producer)
    assert graph.nodes[0] is b  # inserted first: the order is now broken
    with pytest.raises(VerificationError):
        verify(graph)
    graph.topo_sort()
    graph.add_output(b.output)
    verify(graph)
    with pytest.raises(IRError, match="defined twice"):
        graph.add_input("x", x.type)
    assert graph.fresh_name("exp") != "exp"


def test_interpreter_runs_and_checks_types():
    graph = parse_graph(SAMPLE)
    weights = interpreter.random_weights_for(graph, seed=0)
    inputs = interpreter.random_inputs(graph, {"B": 2, "T": 3}, seed=0)
    out = interpreter.run(graph, inputs, weights)
    table = weights("model.embed_tokens.weight")
    norm = weights("model.norm.weight")
    h = table[inputs["ids"]]
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm)
    torch.testing.assert_close(out["logits"], n @ table.T, rtol=1e-5, atol=1e-5)
    assert out["conv"] is inputs["conv"]
    with pytest.raises(interpreter.InterpreterError, match="symbol B is 2 elsewhere but 3"):
        interpreter.run(graph, {"ids": inputs["ids"], "conv": torch.zeros(3, 6, 3)}, weights)
    with pytest.raises(interpreter.InterpreterError, match="missing graph input"):
        interpreter.run(graph, {"ids": inputs["ids"]}, weights)


def test_interpreter_names_a_node_whose_result_disagrees_with_its_type():
    graph = parse_graph("graph @g(%x: f32[4]) -> (f32[4]) {\n  %w = weight {name = \"w\"} : f32[4]\n"
                        "  %y = add(%x, %w) : f32[4]\n  return %y\n}\n")
    with pytest.raises(interpreter.InterpreterError, match="got shape"):
        interpreter.run(graph, {"x": torch.zeros(4)}, lambda name: torch.zeros(5))


def test_interpreter_casts_weights_to_the_declared_dtype(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    graph = parse_graph("graph @g(%x: f32[4]) -> (f32[4]) {\n  %w = weight {name = \"w\"} : f32[4]\n"
                        "  %y = add(%x, %w) : f32[4]\n  return %y\n}\n")
    out = interpreter.run(graph, {"x": torch.zeros(4)}, interpreter.SafetensorsWeights(tmp_path))
    assert out["y"].dtype == torch.float32 and out["y"].sum() == 4
