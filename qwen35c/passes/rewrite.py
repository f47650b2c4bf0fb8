"""Declarative rewrite rules: an anchor op, a `match` that returns bindings or a failure reason,
and a `rewrite` that edits the graph from those bindings only.

    class CastNoop(Rule):
        "Replaces `cast(x) {dtype = x.dtype}` by `x`."
        anchor = "cast"
        def match(self, graph, node):
            if node.attrs["dtype"] != node.inputs[0].dtype:
                return fail("cast changes the dtype", node)
            return {"x": node.inputs[0]}
        def rewrite(self, graph, node, x):
            graph.replace_all_uses(node.output, x)

`match` never stores state on `self` for `rewrite` to read (the bindings dict is the only channel).
Rule sets are plain lists and compose with `+`. `apply_rules` sweeps the graph until nothing
matches; a rewritten node whose results end up unused is removed at once (other nodes the
rewrite orphaned are left for `dce`). A `MatchTracer` records why each candidate failed,
which `qwen35c ir --explain PASS` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from qwen35c.graph.ir import Graph, Node


@dataclass
class MatchFailure:
    reason: str
    node: Node | None = None


def fail(reason: str, node: Node | None = None) -> MatchFailure:
    return MatchFailure(reason, node)


class Rule:
    anchor: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return type(self).__name__

    def match(self, graph: Graph, node: Node) -> dict[str, Any] | MatchFailure:  # pragma: no cover
        raise NotImplementedError

    def rewrite(self, graph: Graph, node: Node, **bindings: Any) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class MatchTracer:
    """Per-rule match counts (always) and, when `record_failures`, why each candidate failed.

    A candidate tried again in a later sweep is recorded once (failures are keyed by rule and node).
    """

    record_failures: bool = True
    failures: list[tuple[str, str, str]] = field(default_factory=list)   # (rule, node, reason)
    matches: dict[str, int] = field(default_factory=dict)
    _seen: set = field(default_factory=set, repr=False)

    def record_failure(self, rule: str, where: str, reason: str) -> None:
        if not self.record_failures or (rule, where) in self._seen:
            return
        self._seen.add((rule, where))
        self.failures.append((rule, where, reason))

    def report(self, limit_per_reason: int = 5) -> str:
        """Match counts per rule, then failures grouped by (rule, reason) with a few nodes each."""
        lines = [f"{rule}: {count} match(es)" for rule, count in sorted(self.matches.items())]
        groups: dict[tuple[str, str], list[str]] = {}
        for rule, node, reason in self.failures:
            groups.setdefault((rule, reason), []).append(node)
        for (rule, reason), nodes in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            more = f" (+{len(nodes) - limit_per_reason} more)" if len(nodes) > limit_per_reason else ""
            lines.append(f"{rule}: no match ({len(nodes)}x): {reason}")
            lines += [f"    at {node}" for node in nodes[:limit_per_reason]]
            if more:
                lines.append(f"    ...{more}")
        return "\n".join(lines)


def apply_rules(graph: Graph, rules: list[Rule], tracer: MatchTracer | None = None,
                max_sweeps: int = 20) -> int:
    """Apply the rules until none matches; returns the number of rewrites done."""
    by_anchor: dict[str, list[Rule]] = {}
    for rule in rules:
        by_anchor.setdefault(rule.anchor, []).append(rule)
    total = 0
    for _ in range(max_sweeps):
        done = 0
        live = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            if id(node) not in live or node.op not in by_anchor:
                continue
            for rule in by_anchor[node.op]:
                result = rule.match(graph, node)
                if isinstance(result, MatchFailure):
                    if tracer is not None and tracer.record_failures:
                        where = result.node if result.node is not None else node
                        tracer.record_failure(rule.name, repr(where), result.reason)
                    continue
                rule.rewrite(graph, node, **result)
                _drop_if_dead(graph, node)
                live = {id(n) for n in graph.nodes}
                done += 1
                if tracer is not None:
                    tracer.matches[rule.name] = tracer.matches.get(rule.name, 0) + 1
                break
        total += done
        if not done:
            break
    return total


def _drop_if_dead(graph: Graph, node: Node) -> None:
    """Remove the rewritten node when the rewrite left its results unused (ops are pure)."""
    outs = {id(v) for v in node.outputs}
    if any(id(v) in outs for v in graph.outputs):
        return
    if any(id(v) in outs for n in graph.nodes for v in n.inputs):
        return
    graph.remove_nodes([node])


def single_user(graph: Graph, node: Node) -> bool:
    """True when each output of `node` is read by at most one node and is not a graph output."""
    users = graph.users()
    outs = {id(v) for v in graph.outputs}
    return all(len(users.get(id(v), [])) <= 1 and id(v) not in outs for v in node.outputs)


__all__ = ["MatchFailure", "MatchTracer", "Rule", "apply_rules", "fail", "single_user"]
