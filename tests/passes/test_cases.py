"""Runs every case in tests/passes/cases/*.ir: the pipeline, the FileCheck lines, the match count,
and a numeric comparison of the graph before and after by interpretation (two shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen35c.errors import QwenError
from qwen35c.graph.interpreter import random_inputs, random_weights_for, run
from qwen35c.graph.text import parse_graph, print_graph
from qwen35c.passes.filecheck import filecheck, read_cases
from qwen35c.passes.manager import PassManager

CASE_DIR = Path(__file__).parent / "cases"
# Two symbol bindings: the second differs in every symbol, so a pass that specialised a shape fails.
SIZES = [{"B": 2, "T": 5, "S": 7, "N": 6}, {"B": 3, "T": 4, "S": 9, "N": 5}]
TOLERANCE = {"f32": 1e-5, "f64": 1e-10, "bf16": 1e-2, "f16": 1e-3}


def _cases():
    for path in sorted(CASE_DIR.glob("*.ir")):
        for case in read_cases(path.read_text()):
            yield pytest.param(case, id=f"{path.stem}:{case.line}")


@pytest.mark.parametrize("case", list(_cases()))
def test_case(case):
    graph = parse_graph(case.source)
    before = graph.clone()
    if case.error:
        with pytest.raises(QwenError) as info:
            PassManager(case.pipeline, verify_each=True).run(graph)
        assert case.error in str(info.value)
        return
    result = PassManager(case.pipeline, verify_each=True).run(graph)
    text = print_graph(result.graph)
    filecheck(text, case.checks)
    if case.matches is not None:
        assert result.stats[0].num_matches == case.matches, text
    assert print_graph(parse_graph(text)) == text
    if case.numeric:
        weights = random_weights_for(before, seed=1)
        for sizes in SIZES:
            inputs = random_inputs(before, sizes, seed=3)
            want = run(before, inputs, weights)
            got = run(result.graph, inputs, weights)
            for (name, a), b in zip(want.items(), got.values()):
                tol = TOLERANCE.get(str(a.dtype).replace("torch.float", "f").replace("torch.bfloat16", "bf16"), 0)
                torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=f"output {name}")
