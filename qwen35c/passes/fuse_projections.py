"""fuse-projections: sibling projections of one input become one GEMM and a split (opt-in).

Replaces

    y1 = linear(x, W1); y2 = linear(x, W2); ...          # no bias, W_i are checkpoint weights

by

    W  = concat(W1, W2, ..., dim = 0)                     # folded by the backend (static weights)
    y1, y2, ... = split(linear(x, W), sizes = [O1, O2, ...], dim = -1)

`which = siblings` fuses every such group (attention q/k/v, GDN in_proj_qkv/z/b/a, MLP gate/up);
`which = gate-up` only the gate/up pair feeding a `swiglu` (run match-swiglu first). A group keeps
the graph order of its members. This is a backend choice, so no named pipeline enables it by
default: ONNX Runtime gets three small GEMMs as fast as one, a GPU backend may prefer one.

Contract:
  requires: nothing (gate-up needs swiglu nodes to find anything).
  ensures:  each fused group reads x once; every former result is a split output with its old type.
            Not guaranteed bit-identical: one wider GEMM may block its reduction differently from
            the separate ones (tested to fp32 round-off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qwen35c.graph.ir import Graph, TensorType
from qwen35c.passes.manager import Pass, PassResult, register_pass


@dataclass
class FuseProjectionsOptions:
    which: Literal["siblings", "gate-up"] = field(
        default="siblings", metadata={"help": "siblings: every group of projections of one input; "
                                              "gate-up: only SwiGLU gate/up pairs"})


def _fusable(node) -> bool:
    if node.op != "linear" or len(node.inputs) != 2:
        return False
    w = node.inputs[1]
    return w.producer is not None and w.producer.op == "weight" and w.type.rank == 2 and w.type.is_static


@register_pass
class FuseProjections(Pass):
    name = "fuse-projections"
    Options = FuseProjectionsOptions

    def run(self, graph: Graph) -> PassResult:
        groups = self._groups(graph)
        for group in groups:
            self._fuse(graph, group)
        if groups:
            graph.remove_nodes([n for group in groups for n in group])
            graph.topo_sort()
        return PassResult(graph, bool(groups), len(groups))

    def _groups(self, graph: Graph) -> list[list]:
        if self.options.which == "gate-up":
            groups = []
            for node in graph.nodes:
                if node.op != "swiglu":
                    continue
                pair = [v.producer for v in node.inputs]
                if all(p is not None and _fusable(p) for p in pair) and pair[0].inputs[0] is pair[1].inputs[0] \
                        and pair[0] is not pair[1]:
                    groups.append(pair)
            return groups
        by_input: dict[int, list] = {}
        for node in graph.nodes:
            if _fusable(node):
                by_input.setdefault(id(node.inputs[0]), []).append(node)
        return [g for g in by_input.values() if len(g) > 1 and len({n.inputs[1].dtype for n in g}) == 1]

    @staticmethod
    def _fuse(graph: Graph, group: list) -> None:
        x = group[0].inputs[0]
        first = min(group, key=graph.nodes.index)
        sizes = [n.inputs[1].type.shape[0] for n in group]
        hidden = group[0].inputs[1].type.shape[1]
        weights = [n.inputs[1] for n in group]
        base = group[0].output.name
        w = graph.add_node("concat", weights, [TensorType(weights[0].dtype, (sum(sizes), hidden))], {"dim": 0},
                           names=[base + "_wcat"], before=first).output
        y = graph.add_node("linear", [x, w], [x.type.with_shape((*x.type.shape[:-1], sum(sizes)))],
                           names=[base + "_fused"], before=first).output
        split = graph.add_node("split", [y], [n.output.type for n in group],
                               {"dim": x.type.rank - 1, "sizes": sizes},
                               names=[n.output.name + "_part" for n in group], before=first)
        for node, part in zip(group, split.outputs):
            graph.replace_all_uses(node.output, part)


FuseProjections.__doc__ = __doc__

__all__ = ["FuseProjections", "FuseProjectionsOptions"]
