"""lower-moe: the `moe` op becomes explicit routing plus grouped GEMMs, with no per-expert loop.

Replaces `y = moe(x [N, H], router [E, H], gate_up [E, 2I, H], down [E, H, I]) {top_k = k}` by

    logits   = linear(x, router)                       # [N, E], model dtype
    probs    = softmax(cast(logits, f32), dim = -1)     # fp32
    w, e     = topk(probs, k)                           # [N, k]
    w        = div(w, reduce_sum(w))                    # when norm_topk_prob
    order, se = moe_sort(e)                             # slots sorted by expert (stable)
    rows     = moe_gather(x, order)                     # [N, k, H]: the N·k slots in sorted order
    gu       = grouped_linear(rows, gate_up, se)        # [N, k, 2I]: one GEMM per expert segment
    gate, up = split(gu);  h = mul(silu(gate), up)
    out      = grouped_linear(h, down, se)              # [N, k, H]
    y        = moe_combine(out, order, cast(w, dtype))  # weight, unsort, sum over k in fp32

The N·k routed slots keep the static shape [N, k] (row-major in sorted order), so every shape in
the lowered graph is static in N: TensorRT-bound graphs get no data-dependent shapes; only the
segment boundaries inside `grouped_linear` depend on the routing. The gated shared expert is
already explicit in the traced graph (linear ops, sigmoid gate) and is left as it is.
`grouped_linear_naive` (a per-slot gather of expert weights + batched matmul) is the naive twin.

Contract:
  requires: `moe` nodes from tracing (x rank 2).
  ensures:  no `moe` node remains; numerics equal the reference `moe` op in fp32 (same op order:
            weights applied in sorted order, fp32 sum over k, one rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35c.graph.ir import Graph, TensorType
from qwen35c.graph.ops import TypeRuleError, register_op
from qwen35c.passes.manager import Pass, PassResult, register_pass


def _infer_moe_sort(types, attrs):
    (experts,) = types
    if experts.dtype != "i64" or experts.rank != 2:
        raise TypeRuleError(f"moe_sort: experts must be i64[N, k], got {experts}")
    return [experts, experts]


def moe_sort_ref(experts: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    sorted_experts, order = torch.sort(experts.reshape(-1), stable=True)
    return [order.view_as(experts), sorted_experts.view_as(experts)]


def _infer_moe_gather(types, attrs):
    x, order = types
    return [TensorType(x.dtype, (order.shape[0], order.shape[1], x.shape[1]))]


def moe_gather_ref(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Slot r (row-major over [N, k]) reads token order.flat[r] // k."""
    k = order.shape[1]
    return x[order.reshape(-1) // k].view(order.shape[0], k, x.shape[1])


def _infer_grouped_linear(types, attrs):
    rows, w, experts = types
    if w.rank != 3 or rows.shape[-1] != w.shape[2] or experts.shape != rows.shape[:2]:
        raise TypeRuleError(f"grouped_linear: rows {rows}, weights {w}, experts {experts} do not fit")
    if rows.dtype != w.dtype:
        raise TypeRuleError("grouped_linear: rows and weights must share a dtype")
    return [rows.with_shape((*rows.shape[:2], w.shape[1]))]


def grouped_linear_ref(rows: torch.Tensor, w: torch.Tensor, sorted_experts: torch.Tensor) -> torch.Tensor:
    """Rows are grouped by expert (sorted_experts ascending): one GEMM per contiguous segment."""
    flat = rows.reshape(-1, rows.shape[-1])
    counts = torch.bincount(sorted_experts.reshape(-1), minlength=w.shape[0]).tolist()
    out = flat.new_empty(flat.shape[0], w.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            out[start:start + count] = F.linear(flat[start:start + count], w[expert])
            start += count
    return out.view(*rows.shape[:2], w.shape[1])


def grouped_linear_naive(rows: torch.Tensor, w: torch.Tensor, sorted_experts: torch.Tensor) -> torch.Tensor:
    """Naive twin: gather each slot's expert matrix and do a batched matvec."""
    flat = rows.reshape(-1, rows.shape[-1])
    mats = w[sorted_experts.reshape(-1)]                                  # [M, O, H]
    return torch.bmm(mats, flat.unsqueeze(-1)).squeeze(-1).view(*rows.shape[:2], w.shape[1])


def _infer_moe_combine(types, attrs):
    out, order, weights = types
    if weights.shape != order.shape or weights.dtype != out.dtype:
        raise TypeRuleError("moe_combine: weights must be [N, k] in the output dtype")
    return [out.with_shape((out.shape[0], out.shape[2]))]


def moe_combine_ref(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, k, h = out.shape
    flat_order = order.reshape(-1)
    weighted = out.reshape(-1, h) * weights.reshape(-1)[flat_order].unsqueeze(-1)
    unsorted = torch.empty_like(weighted).index_copy(0, flat_order, weighted)
    return unsorted.view(n, k, h).sum(dim=1).to(out.dtype)


register_op("moe_sort", _infer_moe_sort, lambda i, a, b: moe_sort_ref(i[0], a["num_experts"]), 1,
            ("num_experts",), foldable=False)
register_op("moe_gather", _infer_moe_gather, lambda i, a, b: [moe_gather_ref(*i)], 2, foldable=False)
register_op("grouped_linear", _infer_grouped_linear, lambda i, a, b: [grouped_linear_ref(*i)], 3,
            foldable=False)
register_op("moe_combine", _infer_moe_combine, lambda i, a, b: [moe_combine_ref(*i)], 3,
            foldable=False)


@register_pass
class LowerMoe(Pass):
    name = "lower-moe"

    def run(self, graph: Graph) -> PassResult:
        count = 0
        for node in list(graph.nodes):
            if node.op != "moe":
                continue
            self._lower(graph, node)
            count += 1
        if count:
            graph.remove_nodes([n for n in graph.nodes if n.op == "moe"])
        return PassResult(graph, bool(count), count)

    @staticmethod
    def _lower(g: Graph, node) -> None:
        x, router, gate_up, down = node.inputs
        k, layer = node.attrs["top_k"], node.attrs.get("layer")
        n_tok, hidden = x.type.shape
        experts = router.type.shape[0]
        p = f"L{layer}.moe_"

        def add(op, inputs, types, attrs=None, name=""):
            new = g.add_node(op, inputs, types, attrs or {}, names=[p + name + (f"_{i}" if len(types) > 1 else "")
                                                                    for i in range(len(types))], before=node)
            return new.outputs if len(types) > 1 else new.output

        dtype = x.dtype
        logits = add("linear", [x, router], [TensorType(dtype, (n_tok, experts))], name="router_logits")
        probs = add("softmax", [add("cast", [logits], [TensorType("f32", (n_tok, experts))], {"dtype": "f32"},
                                    name="logits_f32")],
                    [TensorType("f32", (n_tok, experts))], {"dim": -1}, name="probs")
        slot_f32, slot_i64 = TensorType("f32", (n_tok, k)), TensorType("i64", (n_tok, k))
        weights, chosen = add("topk", [probs], [slot_f32, slot_i64], {"k": k, "dim": -1}, name="topk")
        if node.attrs["norm_topk_prob"]:
            total = add("reduce_sum", [weights], [TensorType("f32", (n_tok, 1))], {"dims": [1], "keepdim": True},
                        name="weight_sum")
            weights = add("div", [weights, total], [slot_f32], name="weights_norm")
        weights = add("cast", [weights], [TensorType(dtype, (n_tok, k))], {"dtype": dtype}, name="weights")
        order, sorted_experts = add("moe_sort", [chosen], [slot_i64, slot_i64], {"num_experts": experts},
                                    name="sort")
        rows = add("moe_gather", [x, order], [TensorType(dtype, (n_tok, k, hidden))], name="rows")
        two_i = gate_up.type.shape[1]
        gu = add("grouped_linear", [rows, gate_up, sorted_experts], [TensorType(dtype, (n_tok, k, two_i))],
                 name="gate_up")
        half = two_i // 2
        gate, up = add("split", [gu], [TensorType(dtype, (n_tok, k, half))] * 2, {"dim": 2, "sizes": [half, half]},
                       name="gate_up_split")
        act = add("mul", [add("silu", [gate], [gate.type], name="silu"), up], [gate.type], name="act")
        out = add("grouped_linear", [act, down, sorted_experts], [TensorType(dtype, (n_tok, k, hidden))],
                  name="down")
        y = add("moe_combine", [out, order, weights], [x.type], name="out")
        g.replace_all_uses(node.output, y)


LowerMoe.__doc__ = __doc__

__all__ = ["LowerMoe", "grouped_linear_naive", "grouped_linear_ref", "moe_combine_ref", "moe_gather_ref",
           "moe_sort_ref"]
