"""match-swiglu: `mul(silu(gate), up)` over two projections of one input becomes `swiglu(gate, up)`.

Replaces

    y = mul(silu(linear(x, W_gate)), linear(x, W_up))        # dense MLP, shared expert
    y = mul(silu(g), u)  with  g, u = split(t) halves         # fused gate_up, lowered MoE experts

by `y = swiglu(gate, up)`. `swiglu_ref` is `silu(gate) * up` in the operands' dtype, the chain's own
op order and roundings, so the rewrite is bit-identical. The projections stay separate linears
(fuse-projections{which=gate-up} merges them when a backend wants one GEMM).

Contract:
  requires: nothing; run match-gated-rms-norm first (its `norm * silu(z)` is not a SwiGLU and is
            rejected here anyway: its operands are not two projections of one input).
  ensures:  every matched mul is one swiglu node with the same operands and result type; a silu
            whose result is used elsewhere, or gate/up that are not sibling projections (same input,
            no bias) or the two halves of one split, are left alone with the reason recorded.
"""

from __future__ import annotations

from qwen35c.graph.ir import Graph
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.passes.patterns import either_order, only_user
from qwen35c.passes.rewrite import Rule, apply_rules, fail


def _siblings(gate, up) -> str | None:
    """None when gate and up are two projections of one input; else why not."""
    g, u = gate.producer, up.producer
    if g is None or u is None:
        return "gate or up is a graph input"
    if g.op == "linear" and u.op == "linear":
        if len(g.inputs) != 2 or len(u.inputs) != 2:
            return "a projection has a bias"
        if g.inputs[0] is not u.inputs[0]:
            return "gate and up project different inputs"
        return None
    if g.op == "split" and g is u:
        sizes = list(g.attrs["sizes"])
        outs = list(g.outputs)
        if len(sizes) == 2 and sizes[0] == sizes[1] and outs == [gate, up] \
                and g.attrs["dim"] % gate.type.rank == gate.type.rank - 1:
            return None
        return "gate and up are not the first and second halves of one last-dim split"
    return f"gate is '{g.op}' and up is '{u.op}', not two projections of one input"


class SiluMulToSwiglu(Rule):
    """Replaces `mul(silu(gate), up)` by `swiglu(gate, up)` (gate, up: sibling projections)."""

    anchor = "mul"

    def match(self, graph, node):
        pair = either_order(node, "silu")
        if pair is None:
            return fail("no operand is silu", node)
        act, up = pair
        gate = act.producer.inputs[0]
        if gate.type != up.type:
            return fail(f"gate {gate.type} and up {up.type} differ (a broadcast, not a SwiGLU)", node)
        why = _siblings(gate, up)
        if why:
            return fail(why, node)
        problem = only_user(graph, act, node, "silu(gate)")
        if problem:
            return problem
        return {"gate": gate, "up": up}

    def rewrite(self, graph, node, gate, up):
        new = graph.add_node("swiglu", [gate, up], [node.output.type], {},
                             names=[node.output.name + "_swiglu"], before=node)
        graph.replace_all_uses(node.output, new.output)


SWIGLU_RULES: list[Rule] = [SiluMulToSwiglu()]


@register_pass
class MatchSwiglu(Pass):
    name = "match-swiglu"

    def run(self, graph: Graph) -> PassResult:
        n = apply_rules(graph, SWIGLU_RULES, self.tracer)
        return PassResult(graph, bool(n), n)


MatchSwiglu.__doc__ = __doc__

__all__ = ["MatchSwiglu", "SWIGLU_RULES", "SiluMulToSwiglu"]
