"""Per-pass parity: interpret the IR after every pass and compare with the reference model.

`check_each_pass(graph, pipeline, model)` runs the pipeline with an `after_pass` hook that
interprets the current graph on seeded inputs (a stateless graph directly, a stateful one through
`GraphSession` as one prefill step) and compares the logits with `model(input_ids)`: max abs error
and top-1 agreement per pass. The first pass whose error exceeds the tolerance is named.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from qwen35c.graph.interpreter import run
from qwen35c.graph.ir import Graph
from qwen35c.graph.session import GraphSession
from qwen35c.passes.manager import PassManager, PassStat


@dataclass
class PassParity:
    name: str
    max_abs_err: float
    top1_agreement: float
    ok: bool
    num_matches: int = 0
    seconds: float = 0.0


@dataclass
class ParityReport:
    tolerance: float
    passes: list[PassParity] = field(default_factory=list)

    @property
    def first_broken(self) -> str | None:
        return next((p.name for p in self.passes if not p.ok), None)

    def to_json(self) -> dict:
        return {"tolerance": self.tolerance, "first_broken_pass": self.first_broken,
                "passes": [asdict(p) for p in self.passes]}


def _logits(graph: Graph, ids: torch.Tensor, weights) -> torch.Tensor:
    if graph.state_pairs():
        session = GraphSession(graph, weights, ids.shape[0], ids.shape[1])
        return session.step(ids)
    return run(graph, {"input_ids": ids}, weights)[graph.outputs[0].name]


def check_each_pass(graph: Graph, pipeline: str, model, *, seed: int = 0, batch: int = 2,
                    length: int = 9, tolerance: float = 1e-4, verify_each: bool = True):
    """Returns (final graph, pass stats, ParityReport)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if "lm_head.weight" not in params:
        params["lm_head.weight"] = model.lm_head.weight

    def weights(name: str) -> torch.Tensor:
        return params[name].detach()

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    with torch.no_grad():
        want = model(ids).float()
    report = ParityReport(tolerance)

    def measure(name: str, g: Graph, stat: PassStat | None) -> None:
        with torch.no_grad():
            got = _logits(g, ids, weights).float()
        err = float((got - want).abs().max())
        top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        report.passes.append(PassParity(name, err, top1, err <= tolerance,
                                        stat.num_matches if stat else 0, stat.seconds if stat else 0.0))

    measure("trace", graph, None)
    result = PassManager(pipeline, verify_each=verify_each,
                         after_pass=lambda p, g, stat: measure(p.to_text(), g, stat)).run(graph)
    return result.graph, result.stats, report


__all__ = ["ParityReport", "PassParity", "check_each_pass"]
