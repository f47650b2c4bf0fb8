"""The cleanup passes: dce, cse, fold-constants, canonicalize, and `cleanup` (all four to a fixpoint).

Every op in the IR is pure (state is explicit graph inputs/outputs), so a node whose results are
unused can always go, and two nodes with the same op, operands, attributes and result types are
always the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen35c.graph.ir import FLOAT_DTYPES, Graph, Node, TensorType
from qwen35c.graph.ops import OPS
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.passes.rewrite import Rule, apply_rules, fail

_FLOAT_WIDTH = {"f8e4m3": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64}


@register_pass
class DeadCodeElimination(Pass):
    """dce: remove nodes none of whose results reach a graph output.

    Contract:
      requires: nothing.
      ensures:  every remaining node has at least one result that is used or is a graph output;
                graph inputs are kept even when unused (they are the signature).
    """

    name = "dce"

    def run(self, graph: Graph) -> PassResult:
        live = {id(v) for v in graph.outputs}
        doomed = []
        for node in reversed(graph.nodes):
            if any(id(out) in live for out in node.outputs):
                live.update(id(v) for v in node.inputs)
            else:
                doomed.append(node)
        graph.remove_nodes(doomed)
        return PassResult(graph, bool(doomed), len(doomed))


def _freeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu()
        if data.dtype in (torch.bfloat16, torch.float8_e4m3fn):  # numpy has no such dtype; f32 is exact
            data = data.float()
        return ("tensor", str(value.dtype), tuple(value.shape), data.numpy().tobytes())
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return (type(value).__name__, value)


@register_pass
class CommonSubexpressionElimination(Pass):
    """cse: merge nodes with the same op, operands, attributes and result types.

    Contract:
      requires: nothing.
      ensures:  no two nodes share (op, operands, attributes, result types); the first one in
                graph order is kept and the later ones' uses point at it. Weight nodes with the same
                checkpoint name and type merge too (a tied lm_head reads the embedding once).
    """

    name = "cse"

    def run(self, graph: Graph) -> PassResult:
        seen: dict[Any, Node] = {}
        doomed = []
        for node in graph.nodes:
            key = (node.op, tuple(id(v) for v in node.inputs), _freeze(node.attrs),
                   tuple(v.type for v in node.outputs))
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            for old, new in zip(node.outputs, first.outputs):
                graph.replace_all_uses(old, new)
            doomed.append(node)
        graph.remove_nodes(doomed)
        return PassResult(graph, bool(doomed), len(doomed))


@dataclass
class FoldOptions:
    max_elements: int = field(default=4096, metadata={"help": "largest result folded into a constant"})


@register_pass
class FoldConstants(Pass):
    """fold-constants: evaluate nodes whose operands are all constants into `constant` nodes.

    Contract:
      requires: nothing.
      ensures:  every foldable node (pure, `foldable` in the op table, results of at most
                max-elements elements, static types) with constant operands is replaced by constant
                nodes holding its results. Weights are never folded: they are not in the graph.
    """

    name = "fold-constants"
    Options = FoldOptions

    def run(self, graph: Graph) -> PassResult:
        folded = 0
        for node in list(graph.nodes):
            spec = OPS.get(node.op)
            if node.op == "constant" or spec is None or not spec.foldable:
                continue
            if not all(v.producer is not None and v.producer.op == "constant" for v in node.inputs):
                continue
            if not all(v.type.is_static and math.prod(v.type.shape) <= self.options.max_elements
                       for v in node.outputs):
                continue
            results = spec.impl([v.producer.attrs["value"] for v in node.inputs], node.attrs, {})
            for out, tensor in zip(node.outputs, results):
                const = graph.add_node("constant", [], [TensorType.of(tensor)],
                                       {"value": tensor.contiguous()}, names=[out.name + "_c"],
                                       before=node)
                graph.replace_all_uses(out, const.output)
            graph.remove_nodes([node])
            folded += 1
        return PassResult(graph, bool(folded), folded)


# ---- canonicalisation rules ------------------------------------------------------------------

class CastNoop(Rule):
    """Replaces `cast(x) {dtype = x.dtype}` by `x`."""

    anchor = "cast"

    def match(self, graph, node):
        if node.attrs["dtype"] != node.inputs[0].dtype:
            return fail("cast changes the dtype", node)
        return {"x": node.inputs[0]}

    def rewrite(self, graph, node, x):
        graph.replace_all_uses(node.output, x)


class CastRoundTrip(Rule):
    """Replaces `cast(cast(x: A) to W) to A` by `x` when W is a float at least as wide as float A."""

    anchor = "cast"

    def match(self, graph, node):
        inner = node.inputs[0].producer
        if inner is None or inner.op != "cast":
            return fail("operand is not a cast", node)
        x = inner.inputs[0]
        a, w = x.dtype, inner.attrs["dtype"]
        if node.attrs["dtype"] != a:
            return fail("outer cast does not return to the original dtype", node)
        if a not in FLOAT_DTYPES or w not in FLOAT_DTYPES or _FLOAT_WIDTH[w] < _FLOAT_WIDTH[a] \
                or (a == "bf16" and w == "f16") or (a == "f16" and w == "bf16"):
            return fail(f"{a} -> {w} -> {a} is not exact", node)
        return {"x": x}

    def rewrite(self, graph, node, x):
        graph.replace_all_uses(node.output, x)


class ReshapeNoop(Rule):
    """Replaces `reshape(x)` whose result type equals x's type by `x`."""

    anchor = "reshape"

    def match(self, graph, node):
        if node.output.type != node.inputs[0].type:
            return fail("reshape changes the shape", node)
        return {"x": node.inputs[0]}

    def rewrite(self, graph, node, x):
        graph.replace_all_uses(node.output, x)


class ReshapeReshape(Rule):
    """Replaces `reshape(reshape(x))` by one `reshape(x)`."""

    anchor = "reshape"

    def match(self, graph, node):
        inner = node.inputs[0].producer
        if inner is None or inner.op != "reshape":
            return fail("operand is not a reshape", node)
        return {"x": inner.inputs[0]}

    def rewrite(self, graph, node, x):
        node.inputs[0] = x


class PermuteIdentity(Rule):
    """Replaces `permute(x) {perm = [0, 1, ..., n-1]}` by `x`."""

    anchor = "permute"

    def match(self, graph, node):
        if list(node.attrs["perm"]) != list(range(len(node.attrs["perm"]))):
            return fail("permutation is not the identity", node)
        return {"x": node.inputs[0]}

    def rewrite(self, graph, node, x):
        graph.replace_all_uses(node.output, x)


class ScalarIdentity(Rule):
    """Replaces `mul_scalar(x) {scalar = 1}` and `add_scalar(x) {scalar = 0}` by `x`."""

    anchor = ""

    def match(self, graph, node):
        neutral = 1 if node.op == "mul_scalar" else 0
        if node.attrs["scalar"] != neutral:
            return fail(f"scalar is not {neutral}", node)
        return {"x": node.inputs[0]}

    def rewrite(self, graph, node, x):
        graph.replace_all_uses(node.output, x)


class MulScalarOne(ScalarIdentity):
    anchor = "mul_scalar"


class AddScalarZero(ScalarIdentity):
    anchor = "add_scalar"


CANONICALIZE_RULES: list[Rule] = [CastNoop(), CastRoundTrip(), ReshapeNoop(), ReshapeReshape(),
                                  PermuteIdentity(), MulScalarOne(), AddScalarZero()]


@register_pass
class Canonicalize(Pass):
    """canonicalize: apply the local identity rules (no-op casts/reshapes/permutes, x*1, x+0).

    Contract:
      requires: nothing.
      ensures:  no rule in CANONICALIZE_RULES matches; replaced nodes are left for dce.
    """

    name = "canonicalize"

    def run(self, graph: Graph) -> PassResult:
        n = apply_rules(graph, CANONICALIZE_RULES, self.tracer)
        return PassResult(graph, bool(n), n)


@dataclass
class CleanupOptions:
    max_iterations: int = field(default=10, metadata={"help": "rounds of the four passes at most"})


@register_pass
class Cleanup(Pass):
    """cleanup: canonicalize, fold-constants, cse and dce, repeated until nothing changes.

    Contract:
      requires: nothing.
      ensures:  a fixpoint of the four passes, or max-iterations rounds (best effort beyond that).
    """

    name = "cleanup"
    Options = CleanupOptions

    def run(self, graph: Graph) -> PassResult:
        passes = [Canonicalize(), FoldConstants(), CommonSubexpressionElimination(),
                  DeadCodeElimination()]
        for p in passes:
            p.tracer = self.tracer
        total, changed = 0, False
        for _ in range(self.options.max_iterations):
            round_changed = False
            for p in passes:
                result = p.run(graph)
                total += result.num_matches
                round_changed |= result.changed
            changed |= round_changed
            if not round_changed:
                break
        return PassResult(graph, changed, total)


__all__ = ["CANONICALIZE_RULES", "Canonicalize", "Cleanup", "CommonSubexpressionElimination",
           "DeadCodeElimination", "FoldConstants"]
