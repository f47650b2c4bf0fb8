"""match-rope: the traced partial rotate-half RoPE chain becomes one `rope {theta, rotary_dim}`.

Replaces (R = rotary dim, h = R / 2, D = the model dtype)

    f     = mul(cast(reshape(positions: i64[B, T]) to [B, T, 1]) to f32, inv_freq)   # constant [h]
    e     = concat(f, f, dim = -1)
    cos_u = reshape(cast?(cos(e)) to D)           # [B, 1, T, R] (heads first) or [B, T, 1, R]
    sin_u = reshape(cast?(sin(e)) to D)
    x1, x2 = slice(x, 0:R), slice(x, R:)          # on the last dim
    rot   = concat(neg(slice(x1, h:)), slice(x1, 0:h))
    out   = concat(add(mul(x1, cos_u), mul(rot, sin_u)), x2)

by `out = rope(x, positions) {theta, rotary_dim = R}` (wrapped in permutes when x is heads-first:
rope takes [B, T, heads, head_dim]; a permute feeding the chain is looked through). theta is read
back from the inv_freq constant and the rule checks that `rope_ref` recomputes that constant
bit for bit. `rope_ref` casts cos/sin to D and multiplies and adds in D in the chain's order, so the
rewrite is bit-identical (notes/qwen35-architecture.md §4 step 3, §10 item 7).

Contract:
  requires: positions arrive as an i64 [B, T] value (tracing gives q_start + arange(T)).
  ensures:  every partial chain above is one rope node (plus permutes for the heads-first layout);
            cos/sin/inv_freq nodes are left for dce. Interleaved RoPE, full rotation without the
            pass-through slice, and inv_freq tables that no theta reproduces are not matched
            (the reason is recorded).
"""

from __future__ import annotations

import torch

from qwen35c.graph.ir import Graph, TensorType, Value
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.passes.patterns import either_order, only_user, producer
from qwen35c.passes.rewrite import MatchFailure, Rule, apply_rules, fail

_HEADS_FIRST = [0, 2, 1, 3]


def inv_freq_for(theta: float, rotary_dim: int) -> torch.Tensor:
    """The table `rope_ref` computes (kept in one place so the check and the op agree)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def theta_from_inv_freq(inv_freq: torch.Tensor) -> float | None:
    """The theta whose table equals `inv_freq` exactly, or None."""
    rotary_dim = 2 * inv_freq.numel()
    if inv_freq.numel() < 2:
        return 10000.0 if inv_freq.numel() == 1 and float(inv_freq[0]) == 1.0 else None
    estimate = float(inv_freq[1].double()) ** (-rotary_dim / 2)
    for theta in (float(round(estimate)), estimate, float(f"{estimate:.6g}")):
        if theta > 1 and torch.equal(inv_freq_for(theta, rotary_dim), inv_freq):
            return theta
    return None


def _slice(value: Value, start: int, end, what: str):
    node = producer(value, "slice", what)
    if isinstance(node, MatchFailure):
        return node
    rank = node.inputs[0].type.rank
    attrs = node.attrs
    if attrs["dim"] % rank != rank - 1 or attrs.get("step", 1) != 1 \
            or attrs.get("start", 0) != start or attrs.get("end") != end:
        return fail(f"{what} is not the last-dim slice [{start}:{end}]", node)
    return node


def _table(value: Value, fn: str, dtype: str, x_layout_dims, what: str):
    """cos_u / sin_u -> (e, layout) with layout 'heads-first' or 'seq-first'."""
    unsq = producer(value, "reshape", what)
    if isinstance(unsq, MatchFailure):
        return unsq
    b, d1, d2, r = unsq.attrs["shape"]
    layout = "heads-first" if d1 == 1 else "seq-first" if d2 == 1 else None
    if layout is None:
        return fail(f"{what} does not broadcast over heads ({unsq.attrs['shape']})", unsq)
    src = unsq.inputs[0]
    if dtype != "f32":
        cast = producer(src, "cast", f"{what} before the reshape")
        if isinstance(cast, MatchFailure) or cast.attrs["dtype"] != dtype:
            return fail(f"{what} is not cast to {dtype} before use", unsq)
        src = cast.inputs[0]
    trig = producer(src, fn, what)
    if isinstance(trig, MatchFailure):
        return trig
    return trig.inputs[0], layout


class PartialRope(Rule):
    """Replaces the rotate-half partial RoPE chain ending in `concat(rotated, pass-through)` by `rope`."""

    anchor = "concat"

    def match(self, graph, node):
        if len(node.inputs) != 2 or node.attrs["dim"] % node.output.type.rank != node.output.type.rank - 1:
            return fail("not a two-operand concat on the last dim", node)
        if node.output.type.rank != 4:
            return fail("the result is not rank 4", node)
        y, x2 = node.inputs
        add = producer(y, "add", "the rotated part")
        if isinstance(add, MatchFailure):
            return add
        cos_term, sin_term = add.inputs
        for a, b in ((cos_term, sin_term), (sin_term, cos_term)):
            if b.producer is not None and b.producer.op == "mul" and \
                    either_order(b.producer, "concat") is not None:
                cos_term, sin_term = a, b
                break
        else:
            return fail("no term of the add is mul(rotate_half(x), sin)", add)
        rot, sin_u = either_order(sin_term.producer, "concat")
        cmul = producer(cos_term, "mul", "the cos term")
        if isinstance(cmul, MatchFailure):
            return cmul
        x1, cos_u = cmul.inputs
        if x1.producer is None or x1.producer.op != "slice":
            x1, cos_u = cos_u, x1
        rotary = x1.type.shape[-1]
        if not isinstance(rotary, int) or rotary % 2:
            return fail(f"rotary dim {rotary} is not a static even size", cmul)
        half = rotary // 2
        first = _slice(x1, 0, rotary, "the rotated input")
        if isinstance(first, MatchFailure):
            return first
        x = first.inputs[0]
        rest = _slice(x2, rotary, None, "the pass-through part")
        if isinstance(rest, MatchFailure):
            return rest
        if rest.inputs[0] is not x:
            return fail("the rotated and pass-through parts come from different tensors", rest)
        rot_cat = rot.producer
        if len(rot_cat.inputs) != 2 or rot_cat.attrs["dim"] % 4 != 3:
            return fail("rotate_half is not a two-part last-dim concat", rot_cat)
        neg = producer(rot_cat.inputs[0], "neg", "the first half of rotate_half")
        if isinstance(neg, MatchFailure):
            return neg
        for value, start, end, what in ((neg.inputs[0], half, None, "the negated half"),
                                        (rot_cat.inputs[1], 0, half, "the kept half")):
            s = _slice(value, start, end, what)
            if isinstance(s, MatchFailure):
                return s
            if s.inputs[0] is not x1:
                return fail(f"{what} is not sliced from the rotated input", s)
        cos_t = _table(cos_u, "cos", x.dtype, None, "cos")
        if isinstance(cos_t, MatchFailure):
            return cos_t
        sin_t = _table(sin_u, "sin", x.dtype, None, "sin")
        if isinstance(sin_t, MatchFailure):
            return sin_t
        (e, layout), (e_sin, layout_sin) = cos_t, sin_t
        if e is not e_sin or layout != layout_sin:
            return fail("cos and sin are not taken of the same angles", add)
        positions = self._positions(e, half)
        if isinstance(positions, MatchFailure):
            return positions
        positions, inv_freq = positions
        theta = theta_from_inv_freq(inv_freq)
        if theta is None:
            return fail("the inv_freq constant is not theta^(-2i/R) for any theta", e.producer)
        seq_dim = 2 if layout == "heads-first" else 1
        if x.type.shape[0] != positions.type.shape[0] or x.type.shape[seq_dim] != positions.type.shape[1]:
            return fail(f"positions {positions.type} do not fit x {x.type} ({layout})", node)
        problem = only_user(graph, y, node, "the rotated part")
        if problem:
            return problem
        return {"x": x, "positions": positions, "theta": theta, "rotary_dim": rotary, "layout": layout}

    @staticmethod
    def _positions(e: Value, half: int):
        cat = producer(e, "concat", "the angles")
        if isinstance(cat, MatchFailure):
            return cat
        if len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
            return fail("the angles are not concat(freqs, freqs)", cat)
        mul = producer(cat.inputs[0], "mul", "the frequencies")
        if isinstance(mul, MatchFailure):
            return mul
        pair = either_order(mul, "constant")
        if pair is None:
            return fail("the frequencies are not positions times a constant inv_freq", mul)
        inv, pos_f = pair
        inv_freq = inv.producer.attrs["value"]
        if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or inv_freq.numel() != half:
            return fail(f"inv_freq is not a f32 vector of {half} values", inv.producer)
        cast = producer(pos_f, "cast", "the positions")
        if isinstance(cast, MatchFailure) or cast.attrs["dtype"] != "f32":
            return fail("the positions are not cast to f32", mul)
        unsq = producer(cast.inputs[0], "reshape", "the integer positions")
        if isinstance(unsq, MatchFailure):
            return unsq
        positions = unsq.inputs[0]
        if positions.type.rank != 2 or positions.dtype not in ("i64", "i32") or \
                list(unsq.attrs["shape"]) != [*positions.type.shape, 1]:
            return fail(f"positions {positions.type} are not integer [B, T] unsqueezed last", unsq)
        return positions, inv_freq

    def rewrite(self, graph, node, x, positions, theta, rotary_dim, layout):
        attrs = {"theta": theta, "rotary_dim": rotary_dim}
        name = node.output.name
        if layout == "seq-first":
            new = graph.add_node("rope", [x, positions], [x.type], attrs, names=[name + "_rope"], before=node)
            graph.replace_all_uses(node.output, new.output)
            return
        src = x.producer
        if src is not None and src.op == "permute" and list(src.attrs["perm"]) == _HEADS_FIRST:
            xt = src.inputs[0]
        else:
            b, h, t, d = x.type.shape
            xt = graph.add_node("permute", [x], [TensorType(x.dtype, (b, t, h, d))], {"perm": _HEADS_FIRST},
                                names=[name + "_bthd"], before=node).output
        rope = graph.add_node("rope", [xt, positions], [xt.type], attrs, names=[name + "_rope"], before=node)
        back = graph.add_node("permute", [rope.output], [node.output.type], {"perm": _HEADS_FIRST},
                              names=[name + "_bhtd"], before=node)
        graph.replace_all_uses(node.output, back.output)


ROPE_RULES: list[Rule] = [PartialRope()]


@register_pass
class MatchRope(Pass):
    name = "match-rope"

    def run(self, graph: Graph) -> PassResult:
        n = apply_rules(graph, ROPE_RULES, self.tracer)
        return PassResult(graph, bool(n), n)


MatchRope.__doc__ = __doc__

__all__ = ["MatchRope", "PartialRope", "ROPE_RULES", "inv_freq_for", "theta_from_inv_freq"]
