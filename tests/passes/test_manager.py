"""The pass manager: pipeline text, typed options, verification after each pass, statistics."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import pytest

from qwen35c.graph.text import parse_graph
from qwen35c.passes.manager import (PASSES, Pass, PassFailure, PassManager, PassResult,
                                    PipelineError, describe_pass, parse_pipeline,
                                    pipeline_to_text, register_pass)

GRAPH = """\
graph @g(%x: f32[B, 4]) -> (f32[B, 4]) {
  %a = sigmoid(%x) : f32[B, 4]
  %b = sigmoid(%x) : f32[B, 4]
  %dead = exp(%x) : f32[B, 4]
  %c = add(%a, %b) : f32[B, 4]
  return %c
}
"""


@dataclass
class _ToyOptions:
    mode: Literal["fast", "exact"] = field(default="exact", metadata={"help": "how"})
    chunk_size: int = field(default=64, metadata={"help": "tokens per chunk"})
    enabled: bool = True


@register_pass
class _Toy(Pass):
    """test-toy: does nothing; exists to test option parsing."""

    name = "test-toy"
    Options = _ToyOptions

    def run(self, graph):
        return PassResult(graph, False, 0)


@register_pass
class _Breaker(Pass):
    """test-breaker: a deliberately broken pass that declares a wrong result type."""

    name = "test-breaker"

    def run(self, graph):
        node = graph.find("add")[0]
        node.outputs[0].type = node.outputs[0].type.with_dtype("f16")
        return PassResult(graph, True, 1)


def test_pipeline_text_parses_options_with_types():
    [toy] = parse_pipeline("test-toy{mode=fast chunk-size=32,enabled=false}")
    assert toy.options == _ToyOptions(mode="fast", chunk_size=32, enabled=False)
    assert pipeline_to_text([toy]) == "test-toy{mode=fast chunk-size=32 enabled=false}"
    assert parse_pipeline(pipeline_to_text([toy]))[0].options == toy.options


@pytest.mark.parametrize("text, message", [
    ("nope", "unknown pass 'nope'; known passes:"),
    ("test-toy{mode=slow}", "option 'mode' must be one of fast, exact; got 'slow'"),
    ("test-toy{chunk-size=big}", "option 'chunk-size' expects int, got 'big'"),
    ("test-toy{chunksize=3}", "unknown option 'chunksize'; valid options: chunk-size, enabled, mode"),
    ("test-toy{mode}", "option 'mode' needs the form key=value"),
    ("test-toy{mode=fast mode=exact}", "option 'mode' given twice"),
    ("dce,", "pipeline ends with ','"),
    ("dce cse", "expected ',' between passes"),
])
def test_pipeline_errors_are_clear(text, message):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert message in str(info.value)


def test_named_pipeline_expands():
    names = [p.name for p in parse_pipeline("standard")]
    assert names[0] == "cleanup" and names[-1] == "cleanup"


def test_manager_runs_records_stats_and_prints_ir():
    stream = io.StringIO()
    graph = parse_graph(GRAPH)
    result = PassManager("cse,dce", print_ir_after=["dce"], stream=stream, log=True).run(graph)
    assert [(s.name, s.num_matches, s.changed) for s in result.stats] == [("cse", 1, True),
                                                                          ("dce", 1, True)]
    assert result.stats[1].nodes_after == 2
    out = stream.getvalue()
    assert "[pass=cse] num_matches=1 changed=True" in out
    assert "# ----- IR after dce -----" in out and "%c = add(%a, %a)" in out


def test_manager_names_the_pass_that_breaks_the_ir():
    graph = parse_graph(GRAPH)
    with pytest.raises(PassFailure) as info:
        PassManager("cse,test-breaker,dce").run(graph)
    message = str(info.value)
    assert "after pass 'test-breaker'" in message
    assert "passes run before it: cse" in message
    assert "declared f16[B, 4], the type rule gives f32[B, 4]" in message


def test_manager_verifies_the_input_graph():
    graph = parse_graph(GRAPH)
    graph.nodes.reverse()
    with pytest.raises(PassFailure, match="before the pipeline"):
        PassManager("dce").run(graph)


def test_every_registered_pass_has_a_contract():
    parse_pipeline("cleanup")  # loads the built-in passes
    for name, cls in PASSES.items():
        if name.startswith("test-"):
            continue
        doc = cls.__doc__ or ""
        assert doc.startswith(f"{name}: "), f"{name}: docstring must start with '{name}: summary'"
        assert "Contract:" in doc, f"{name}: docstring needs a Contract: paragraph"
        assert describe_pass(cls).startswith(name)
