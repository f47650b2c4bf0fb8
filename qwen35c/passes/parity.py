"""Per-pass parity: interpret the IR after every pass and compare with the reference model.

`check_each_pass(graph, pipeline, model)` runs the pipeline with an `after_pass` hook that
interprets the current graph on seeded inputs and compares the logits with the reference model's:
max abs error and top-1 agreement per pass. The first pass whose error exceeds the tolerance is
named, with the case that showed it.

The inputs are a grid of cases (`DEFAULT_CASES`), each a prompt per row followed by decode steps,
so a pass that breaks only past the 64-token GDN chunk, only for right-padded rows or only in
decode is caught here and not blamed on the backend:
  * a stateful graph (after `insert-state`) runs through `GraphSession` like a decoding session:
    one prefill step with the rows' lengths, then one step per decode token (T = 1, q_start > 0);
  * a stateless graph (before `insert-state`) runs each row's whole sequence (prompt + the decode
    tokens) right-padded in one forward: causal, so the padding never reaches a compared position.
The reference logits come from the model run the same way: its own prefill + decode with a cache
(`model.new_cache`) for a stateful graph, one forward over the same sequences for a stateless one
(the two differ by fp32 rounding, ~1e-5 on a random tiny model: too much to mix within 1e-4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from qwen35c.graph.interpreter import run
from qwen35c.graph.ir import Graph
from qwen35c.graph.session import GraphSession
from qwen35c.passes.manager import PassManager, PassStat


@dataclass(frozen=True)
class ParityCase:
    """Rows with these prompt lengths (right-padded to the longest), then `decode_steps` tokens."""

    lengths: tuple[int, ...]
    decode_steps: int = 3

    @property
    def name(self) -> str:
        prompt = "/".join(map(str, self.lengths)) if len(set(self.lengths)) > 1 else str(self.lengths[0])
        return f"B={len(self.lengths)} T={prompt}"


# Lengths 1 (the single-token prefill), 65 and 129 (one and two tokens past the 64-token chunk);
# the right-padded batch mixes all three in one step. Every case continues with 3 decode steps.
DEFAULT_CASES: tuple[ParityCase, ...] = (ParityCase((1, 1)), ParityCase((65, 65)), ParityCase((129,)),
                                         ParityCase((129, 65, 1)))


@dataclass
class PassParity:
    name: str
    max_abs_err: float
    top1_agreement: float
    ok: bool
    num_matches: int = 0
    seconds: float = 0.0
    worst_case: str = ""   # where max_abs_err was seen: "B=2 T=65 prefill", "B=1 T=129 decode 2", ...


@dataclass
class ParityReport:
    tolerance: float
    passes: list[PassParity] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)

    @property
    def first_broken(self) -> str | None:
        return next((p.name for p in self.passes if not p.ok), None)

    def to_json(self) -> dict:
        return {"tolerance": self.tolerance, "first_broken_pass": self.first_broken, "cases": self.cases,
                "passes": [asdict(p) for p in self.passes]}


@dataclass
class _Inputs:
    """One case's token ids and the reference logits for it."""

    case: ParityCase
    prompt: torch.Tensor          # [B, Tmax] right-padded
    lengths: torch.Tensor         # [B]
    tokens: list[torch.Tensor]    # decode_steps x [B, 1]
    want_prefill: torch.Tensor    # [B, Tmax, V] (valid where t < lengths[b])
    want_decode: list[torch.Tensor]  # decode_steps x [B, 1, V]
    whole: torch.Tensor           # [B, Tmax + decode_steps]: row b's prompt then its decode tokens
    want_whole: torch.Tensor      # the reference's one forward over `whole` (no cache)


def _reference(model, case: ParityCase, gen: torch.Generator) -> _Inputs:
    lengths = torch.tensor(case.lengths, dtype=torch.long)
    batch, longest = len(case.lengths), max(case.lengths)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, longest), generator=gen)
    prompt[torch.arange(longest) >= lengths.unsqueeze(1)] = 0
    tokens = [torch.randint(0, vocab, (batch, 1), generator=gen) for _ in range(case.decode_steps)]
    cache = model.new_cache(batch, longest + case.decode_steps)
    want_prefill = model(prompt, cache, lengths).float()
    want_decode = [model(token, cache).float() for token in tokens]
    whole = torch.zeros(batch, longest + case.decode_steps, dtype=torch.long)
    for b, n in enumerate(case.lengths):
        whole[b, :n] = prompt[b, :n]
        for s, token in enumerate(tokens):
            whole[b, n + s] = token[b, 0]
    return _Inputs(case, prompt, lengths, tokens, want_prefill, want_decode, whole, model(whole).float())


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int, int]:
    """(max abs error, top-1 agreements, positions) over matching [N, V] logits."""
    if got.numel() == 0:
        return 0.0, 0, 0
    err = float((got - want).abs().max())
    return err, int((got.argmax(-1) == want.argmax(-1)).sum()), got.shape[0]


def _measure_case(graph: Graph, weights, inp: _Inputs) -> list[tuple[str, float, int, int]]:
    """[(phase, max abs error, top-1 agreements, positions)] for the prefill and each decode step."""
    batch, longest = inp.prompt.shape
    steps = len(inp.tokens)
    valid = torch.arange(longest) < inp.lengths.unsqueeze(1)              # [B, Tmax]
    results = []
    if graph.state_pairs():
        session = GraphSession(graph, weights, batch, longest + steps)
        ragged = bool((inp.lengths != longest).any())
        got = session.step(inp.prompt, inp.lengths if ragged else None).float()
        results.append(("prefill", *_compare(got[valid], inp.want_prefill[valid])))
        for s, token in enumerate(inp.tokens):
            got = session.step(token).float()
            results.append((f"decode {s + 1}", *_compare(got[:, 0], inp.want_decode[s][:, 0])))
        return results
    # Stateless: one forward over each row's prompt + decode tokens, against the reference's.
    got = run(graph, {"input_ids": inp.whole}, weights)[graph.outputs[0].name].float()
    want = inp.want_whole
    results.append(("prefill", *_compare(got[:, :longest][valid], want[:, :longest][valid])))
    rows = torch.arange(batch)
    for s in range(steps):
        results.append((f"decode {s + 1}", *_compare(got[rows, inp.lengths + s], want[rows, inp.lengths + s])))
    return results


def check_each_pass(graph: Graph, pipeline: str, model, *, seed: int = 0,
                    cases: tuple[ParityCase, ...] = DEFAULT_CASES, tolerance: float = 1e-4,
                    verify_each: bool = True):
    """Returns (final graph, pass stats, ParityReport)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if "lm_head.weight" not in params:
        params["lm_head.weight"] = model.lm_head.weight

    def weights(name: str) -> torch.Tensor:
        return params[name].detach()

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inputs = [_reference(model, case, gen) for case in cases]
    report = ParityReport(tolerance, cases=[c.name for c in cases])

    def measure(name: str, g: Graph, stat: PassStat | None) -> None:
        worst, where, agree, total = 0.0, "", 0, 0
        with torch.no_grad():
            for inp in inputs:
                for phase, err, hits, count in _measure_case(g, weights, inp):
                    agree, total = agree + hits, total + count
                    if err > worst or not where or err != err:  # NaN counts as the worst
                        worst, where = err, f"{inp.case.name} {phase}"
        ok = worst <= tolerance  # False for NaN
        report.passes.append(PassParity(name, worst, agree / max(total, 1), ok,
                                        stat.num_matches if stat else 0, stat.seconds if stat else 0.0, where))

    measure("trace", graph, None)
    result = PassManager(pipeline, verify_each=verify_each,
                         after_pass=lambda p, g, stat: measure(p.to_text(), g, stat)).run(graph)
    return result.graph, result.stats, report


__all__ = ["DEFAULT_CASES", "ParityCase", "ParityReport", "PassParity", "check_each_pass"]
