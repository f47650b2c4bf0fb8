"""match-gated-rms-norm: the GDN output norm chain becomes one `gated_rms_norm`.

Replaces (D is the model dtype; with D = f32 the casts are absent)

    xf  = cast(x: D) to f32
    n   = cast(mul(xf, rsqrt(add_scalar(reduce_mean(pow(xf, 2), [-1], keepdim), eps)))) to D
    nw  = mul(w, n)                                   # in D, plain weight (not 1 + w)
    out = cast(mul(cast(nw) to f32, silu(cast(z: D) to f32))) to D

by `out = gated_rms_norm(x, w, z) {eps}`. `gated_rms_norm_ref` rounds at the same three points
(after normalising, after the weight multiply, at the end; notes/qwen35-architecture.md §3 step 9,
§10 item 5), so the rewrite is bit-identical in f32 and bf16.

Contract:
  requires: nothing; run it before match-rms-norm and match-swiglu (both leave this chain alone,
            but running it first keeps the explain output short).
  ensures:  every chain above whose intermediates are read only inside it is one gated_rms_norm;
            x, w, z keep their dtypes and the result has x's dtype. A chain whose weight is 1 + w,
            whose gate is not silu, whose roundings differ from the list above, or whose
            intermediates are shared stays as it is, with the reason recorded.
"""

from __future__ import annotations

from qwen35c.graph.ir import Graph
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.passes.patterns import either_order, only_user, producer, rms_core, widened
from qwen35c.passes.rewrite import MatchFailure, Rule, apply_rules, fail


class GatedRmsNorm(Rule):
    """Replaces `cast?(mul(cast?(mul(w, cast?(x̂(xf)))), silu(cast?(z))))` by `gated_rms_norm(x, w, z)`."""

    anchor = ""

    def match(self, graph, node):
        if node.op == "cast":
            dtype, outer = node.attrs["dtype"], node.inputs[0].producer
            if outer is None or outer.op != "mul" or outer.output.dtype != "f32":
                return fail("the cast operand is not a f32 mul", node)
            if dtype == "f32":
                return fail("a cast to f32 does not end the chain", node)
        else:
            dtype, outer = "f32", node
        pair = either_order(outer, "silu")
        if pair is None:
            return fail("no operand of the gating mul is silu(z)", outer)
        gate, nwf = pair
        z, z_dtype = widened(gate.producer.inputs[0])
        if z_dtype != dtype:
            return fail(f"the gate is {z_dtype}, the result {dtype}", gate.producer)
        nw, nw_dtype = widened(nwf)
        if nw_dtype != dtype:
            return fail(f"the weighted norm is {nw_dtype} but the chain rounds to {dtype}", outer)
        weighted = producer(nw, "mul", "the weighted norm")
        if isinstance(weighted, MatchFailure):
            return weighted
        w, n = weighted.inputs
        if w.type.rank != 1:
            w, n = n, w
        if w.type.rank != 1:
            return fail("no operand of the weight mul is a weight vector", weighted)
        if w.producer is not None and w.producer.op == "add_scalar":
            return fail("the weight is 1 + w (a zero-centred norm), not a plain weight", weighted)
        xhat = n
        if dtype != "f32":
            narrow = producer(n, "cast", "the normalised value before the weight")
            if isinstance(narrow, MatchFailure):
                return fail(f"the normalised value is not rounded to {dtype} before the weight", weighted)
            xhat = narrow.inputs[0]
        core = rms_core(graph, xhat)
        if isinstance(core, MatchFailure):
            return core
        x, x_dtype = widened(core["xf"])
        if x_dtype != dtype:
            return fail(f"the norm input is {x_dtype}, the result {dtype}", core["xf"].producer)
        if x.type.shape != z.type.shape or w.type.shape[0] != x.type.shape[-1]:
            return fail("x, z and w shapes do not fit", outer)
        users = graph.users()
        readers = [(gate, outer, "silu(z)"), (nwf, outer, "weighted norm"), (n, weighted, "norm")]
        if nw is not nwf:
            readers.append((nw, nwf.producer, "weighted norm"))
        if xhat is not n:
            readers.append((xhat, n.producer, "normalised value"))
        if node is not outer:
            readers.append((outer.output, node, "gated product"))
        for value, reader, what in readers:
            problem = only_user(graph, value, reader, what, users)
            if problem:
                return problem
        return {"x": x, "w": w, "z": z, "eps": core["eps"]}

    def rewrite(self, graph, node, x, w, z, eps):
        new = graph.add_node("gated_rms_norm", [x, w, z], [node.output.type], {"eps": eps},
                             names=[node.output.name + "_gnorm"], before=node)
        graph.replace_all_uses(node.output, new.output)


class GatedRmsNormAtCast(GatedRmsNorm):
    anchor = "cast"


class GatedRmsNormAtMul(GatedRmsNorm):
    anchor = "mul"


GATED_RMS_NORM_RULES: list[Rule] = [GatedRmsNormAtMul(), GatedRmsNormAtCast()]


@register_pass
class MatchGatedRmsNorm(Pass):
    name = "match-gated-rms-norm"

    def run(self, graph: Graph) -> PassResult:
        n = apply_rules(graph, GATED_RMS_NORM_RULES, self.tracer)
        return PassResult(graph, bool(n), n)


MatchGatedRmsNorm.__doc__ = __doc__

__all__ = ["GATED_RMS_NORM_RULES", "MatchGatedRmsNorm"]
