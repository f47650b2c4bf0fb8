"""match-rms-norm: the traced zero-centred RMSNorm chain becomes one `rms_norm {offset = 1.0}`.

Replaces

    xhat = mul(xf, rsqrt(add_scalar(reduce_mean(pow(xf, 2), [-1], keepdim), eps)))   # f32
    y    = mul(xhat, add_scalar(wf, 1.0))                                            # x̂ · (1 + w)

by `y = rms_norm(xf, w) {eps, offset = 1.0}` (wf = cast(w) to f32 is absorbed: the op widens w
itself), and then folds the bf16 sandwich

    cast(rms_norm(cast(x: D) to f32) to D)   ->   rms_norm(x: D)          (D narrower than f32)

which is exact: `rms_norm_ref` widens x, computes in f32 and rounds once to x's dtype, the same
single rounding the chain does (notes/qwen35-architecture.md §5, §10 item 6).

Contract:
  requires: nothing (runs on traced or cleaned-up graphs; run match-gated-rms-norm first so the
            GDN output norm, whose weight is plain w, is not half-matched — this rule never takes a
            plain weight anyway).
  ensures:  every chain above whose intermediates are f32 and read only inside the chain is one
            rms_norm node; numerics are bit-identical to the chain. Chains with a weight that is not
            1 + w, a non-last-dim mean, a non-scalar eps, or shared intermediates stay as they are,
            with the reason recorded (`qwen35c ir --explain match-rms-norm`).
  Does not pick a kernel; backends lower rms_norm through their table.
"""

from __future__ import annotations

from qwen35c.graph.ir import Graph, TensorType
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.passes.patterns import either_order, only_user, producer, rms_core, widened
from qwen35c.passes.rewrite import MatchFailure, Rule, apply_rules, fail


class ZeroCentredRmsNorm(Rule):
    """Replaces `mul(x̂(xf, eps), add_scalar(cast?(w), 1.0))` by `rms_norm(xf, w) {eps, offset = 1.0}`."""

    anchor = "mul"

    def match(self, graph, node):
        pair = either_order(node, "add_scalar")
        if pair is None:
            return fail("the weight is not 1 + w (no add_scalar operand)", node)
        scale, xhat = pair
        plus = scale.producer
        if plus.attrs["scalar"] != 1.0:
            return fail(f"the weight is {plus.attrs['scalar']} + w, not 1 + w", plus)
        wf = plus.inputs[0]
        if wf.type.rank != 1 or wf.dtype != "f32":
            return fail(f"the weight {wf.type} is not a f32 vector", plus)
        core = rms_core(graph, xhat)
        if isinstance(core, MatchFailure):
            return core
        xf = core["xf"]
        if xf.type.shape[-1] != wf.type.shape[0]:
            return fail("the weight size differs from the normalised dim", node)
        problem = only_user(graph, scale, node, "1 + w") or \
            only_user(graph, xhat, node, "the normalised value")
        if problem:
            return problem
        w, _ = widened(wf)
        return {"x": xf, "w": w, "eps": core["eps"]}

    def rewrite(self, graph, node, x, w, eps):
        new = graph.add_node("rms_norm", [x, w], [node.output.type], {"eps": eps, "offset": 1.0},
                             names=[node.output.name + "_norm"], before=node)
        graph.replace_all_uses(node.output, new.output)


class RmsNormCastSandwich(Rule):
    """Replaces `cast(rms_norm(cast(x: D) to f32, w) to D)` by `rms_norm(x, w)` (D narrower than f32)."""

    anchor = "cast"

    def match(self, graph, node):
        norm = producer(node.inputs[0], "rms_norm", "the cast operand")
        if isinstance(norm, MatchFailure):
            return norm
        x, dtype = widened(norm.inputs[0])
        if x is norm.inputs[0]:
            return fail("the norm input is not a widening cast", norm)
        if node.attrs["dtype"] != dtype:
            return fail(f"the result is cast to {node.attrs['dtype']}, not back to {dtype}", node)
        return {"norm": norm, "x": x}

    def rewrite(self, graph, node, norm, x):
        new = graph.add_node("rms_norm", [x, norm.inputs[1]], [TensorType(x.dtype, node.output.shape)],
                             dict(norm.attrs), names=[node.output.name + "_norm"], before=node)
        graph.replace_all_uses(node.output, new.output)


RMS_NORM_RULES: list[Rule] = [ZeroCentredRmsNorm(), RmsNormCastSandwich()]


@register_pass
class MatchRmsNorm(Pass):
    name = "match-rms-norm"

    def run(self, graph: Graph) -> PassResult:
        n = apply_rules(graph, RMS_NORM_RULES, self.tracer)
        return PassResult(graph, bool(n), n)


MatchRmsNorm.__doc__ = __doc__

__all__ = ["MatchRmsNorm", "RMS_NORM_RULES", "RmsNormCastSandwich", "ZeroCentredRmsNorm"]
