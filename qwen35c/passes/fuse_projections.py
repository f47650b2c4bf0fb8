"""fuse-projections: sibling projections of one input become one GEMM and a split (opt-in).

Replaces

    y1 = linear(x, W1); y2 = linear(x, W2); ...          # no bias, W_i are checkpoint weights

by

    W  = concat(W1, W2, ..., dim = 0)                     # folded by the backend (static weights)
    y1, y2, ... = split(linear(x, W), sizes = [O1, O2, ...], dim = -1)

Sibling `quantized_linear`s (the `quantize` pass runs first in quantized builds) fuse the same
way when their packed layouts agree and are row-wise in N: each packed part (INT4 qweight /
scales / zeros, FP8 per-channel or 128-row-block codes and scales) is concatenated along N, which
is exactly the separate GEMMs (see `_quantized_key`).

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
    if node.op == "quantized_linear":
        return _quantized_key(node) is not None
    if node.op != "linear" or len(node.inputs) != 2:
        return False
    w = node.inputs[1]
    return w.producer is not None and w.producer.op == "weight" and w.type.rank == 2 and w.type.is_static


def _quantized_key(node):
    """What must agree for sibling `quantized_linear`s to become one, or None when concatenating
    their packed parts along N (dim 0) would not be exactly the separate GEMMs: every packed
    tensor is row-wise in N for INT4 without g_idx / AWQ pre_scale (qweight, scales, zeros) and for
    FP8 per-channel; FP8 block scales are per 128 rows (fused only when every N is a multiple of
    128); per-tensor and static FP8 scales are one per member (never fused)."""
    a = node.attrs
    if not all(v.producer is not None and v.producer.op == "weight" for v in node.inputs[1:]):
        return None
    if a["format"] == "int4":
        if a["has_g_idx"] or a["has_pre_scale"]:
            return None
        return ("int4", a["in_features"], a["group_size"], a["has_zeros"], a.get("activations", "none"))
    if a["format"] == "fp8" and a["activations"] != "static":
        if a["granularity"] == "channel" or (a["granularity"] == "block" and a["out_features"] % 128 == 0):
            return ("fp8", a["in_features"], a["granularity"], a["activations"])
    return None


def _key(node):
    if node.op == "quantized_linear":
        return (id(node.inputs[0]), _quantized_key(node))
    return (id(node.inputs[0]), "linear", node.inputs[1].dtype)


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
                        and pair[0] is not pair[1] and _key(pair[0]) == _key(pair[1]):
                    groups.append(pair)
            return groups
        by_input: dict[tuple, list] = {}
        for node in graph.nodes:
            if _fusable(node):
                by_input.setdefault(_key(node), []).append(node)
        return [g for g in by_input.values() if len(g) > 1]

    @staticmethod
    def _fuse(graph: Graph, group: list) -> None:
        if group[0].op == "quantized_linear":
            return FuseProjections._fuse_quantized(graph, group)
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


    @staticmethod
    def _fuse_quantized(graph: Graph, group: list) -> None:
        """Sibling quantized linears: each packed part is concatenated along N (see `_quantized_key`)."""
        x = group[0].inputs[0]
        first = min(group, key=graph.nodes.index)
        sizes = [n.attrs["out_features"] for n in group]
        base = group[0].output.name
        parts = []
        for i in range(1, len(group[0].inputs)):
            members = [n.inputs[i] for n in group]
            t = members[0].type
            shape = (sum(m.type.shape[0] for m in members), *t.shape[1:])
            parts.append(graph.add_node("concat", members, [TensorType(t.dtype, shape)], {"dim": 0},
                                        names=[f"{base}_cat{i}"], before=first).output)
        attrs = dict(group[0].attrs, out_features=sum(sizes),
                     weight="+".join(n.attrs["weight"] for n in group))
        y = graph.add_node("quantized_linear", [x, *parts], [x.type.with_shape((*x.type.shape[:-1], sum(sizes)))],
                           attrs, names=[base + "_fused"], before=first).output
        split = graph.add_node("split", [y], [n.output.type for n in group],
                               {"dim": x.type.rank - 1, "sizes": sizes},
                               names=[n.output.name + "_part" for n in group], before=first)
        for node, part in zip(group, split.outputs):
            graph.replace_all_uses(node.output, part)


FuseProjections.__doc__ = __doc__

__all__ = ["FuseProjections", "FuseProjectionsOptions"]
