"""Small pattern helpers shared by the `match-*` rules: walk producers, peel casts, match the RMS core.

Every helper returns either what it matched or a `MatchFailure` naming the node that did not fit,
so a rule's `match` reads as a straight line of `if isinstance(r, MatchFailure): return r`.
"""

from __future__ import annotations

from typing import Any

from qwen35c.graph.ir import FLOAT_DTYPES, Graph, Node, Value
from qwen35c.passes.rewrite import MatchFailure, fail

_WIDTH = {"f8e4m3": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64}


def producer(value: Value, op: str, what: str) -> Node | MatchFailure:
    """The node producing `value` when it is an `op`; otherwise a failure saying `what` it should be."""
    node = value.producer
    if node is None or node.op != op:
        found = "a graph input" if node is None else f"'{node.op}'"
        return fail(f"{what} is {found}, not '{op}'", node)
    return node


def widened(value: Value, to: str = "f32") -> tuple[Value, str]:
    """(source, source dtype) when `value` is `cast(source) {dtype = to}` from a narrower float
    (an exact widening), else (value, value.dtype)."""
    node = value.producer
    if node is not None and node.op == "cast" and node.attrs["dtype"] == to:
        src = node.inputs[0]
        if src.dtype in FLOAT_DTYPES and _WIDTH[src.dtype] < _WIDTH[to]:
            return src, src.dtype
    return value, value.dtype


def either_order(node: Node, first_op: str) -> tuple[Value, Value] | None:
    """For a commutative binary node, (operand produced by `first_op`, the other operand)."""
    a, b = node.inputs
    if a.producer is not None and a.producer.op == first_op:
        return a, b
    if b.producer is not None and b.producer.op == first_op:
        return b, a
    return None


def only_user(graph: Graph, value: Value, node: Node, what: str, users=None) -> MatchFailure | None:
    """A failure when `value` (an intermediate of the chain) is read by anything but `node`."""
    users = graph.users() if users is None else users
    readers = users.get(id(value), [])
    if any(r is not node for r in readers) or any(v is value for v in graph.outputs):
        return fail(f"{what} %{value.name} has other users; rewriting would duplicate it", value.producer)
    return None


def rms_core(graph: Graph, xhat: Value, users=None) -> dict[str, Any] | MatchFailure:
    """Match `xhat = mul(xf, rsqrt(add_scalar(reduce_mean(pow(xf, 2), [-1], keepdim), eps)))`.

    Returns {"xf", "eps"}; all intermediates must be f32 and read only inside the chain.
    """
    mul = producer(xhat, "mul", "the normalised value")
    if isinstance(mul, MatchFailure):
        return mul
    pair = either_order(mul, "rsqrt")
    if pair is None:
        return fail("neither operand of the normalising mul is an rsqrt", mul)
    r, xf = pair
    rsqrt = r.producer
    add = producer(rsqrt.inputs[0], "add_scalar", "the rsqrt operand")
    if isinstance(add, MatchFailure):
        return fail("eps is not added as a scalar (add_scalar) inside the rsqrt", rsqrt)
    eps = add.attrs["scalar"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1e-2:
        return fail(f"eps {eps!r} is not a small positive number", add)
    mean = producer(add.inputs[0], "reduce_mean", "the mean of squares")
    if isinstance(mean, MatchFailure):
        return mean
    rank = xf.type.rank
    if [d % max(rank, 1) for d in mean.attrs["dims"]] != [rank - 1] or not mean.attrs.get("keepdim"):
        return fail("the mean is not over the last dim with keepdim", mean)
    square = producer(mean.inputs[0], "pow", "the mean's operand")
    if isinstance(square, MatchFailure):
        return square
    if square.attrs["exponent"] != 2:
        return fail(f"exponent {square.attrs['exponent']} is not 2", square)
    if square.inputs[0] is not xf:
        return fail("the squared value is not the value being normalised", square)
    if xf.dtype != "f32":
        return fail(f"the norm computes in {xf.dtype}; the canonical ops compute in f32", mul)
    for value, reader, what in ((r, mul, "rsqrt"), (add.output, rsqrt, "mean + eps"),
                                (mean.output, add, "mean"), (square.output, mean, "square")):
        problem = only_user(graph, value, reader, what, users)
        if problem:
            return problem
    return {"xf": xf, "eps": float(eps)}


__all__ = ["either_order", "only_user", "producer", "rms_core", "widened"]
