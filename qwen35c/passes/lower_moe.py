"""lower-moe: the `moe` op becomes explicit routing plus grouped GEMMs, with no per-expert loop.

form = grouped (the default) replaces `y = moe(x [N, H], router [E, H], gate_up [E, 2I, H], down [E, H, I]) {top_k = k}` by

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

form = dense is for TensorRT-bound graphs, which must not have a data-dependent shape or a
data-dependent segment anywhere: every expert computes every token and a scattered routing matrix
zeroes the experts a token did not pick.

    (routing as above: w [N, k] in the model dtype, e [N, k])
    hit      = eq(reshape(e, [N, k, 1]), arange(E))                 # [N, k, E] one-hot
    route    = reduce_sum(where(hit, reshape(w, [N, k, 1]), 0), k)  # [N, E]: w at the picked experts
    gu       = batched_linear(x, gate_up)                           # [E, N, 2I]: x W_eᵀ for every e
    h        = mul(silu(gate), up) over split(gu)                    # [E, N, I]
    out      = batched_linear(h, down)                               # [E, N, H]
    y        = cast(reduce_sum(cast(mul(out, route^T [E, N, 1]), f32), E), dtype)

It costs E/k times the expert FLOPs, so it suits few experts or a backend without grouped GEMM.

Contract:
  requires: `moe` nodes from tracing (x rank 2).
  ensures:  no `moe` node remains. form=grouped: numerics equal the reference `moe` op in fp32
            (same op order: weights applied in sorted order, fp32 sum over k, one rounding).
            form=dense: every shape is static in N and E (no sort, no segments); each weighted
            expert output rounds like the reference and the fp32 sum adds the same k nonzero terms
            plus exact zeros, but in expert order rather than top-k order; each expert GEMM runs
            over all N rows rather than its own few (bit-identical on the bf16 tiny-moe preset;
            fp32 round-off in general, since BLAS may choose kernels by row count).
Options: form (grouped | dense; default grouped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


def _infer_batched_linear(types, attrs):
    x, w = types
    if w.rank != 3 or x.rank not in (2, 3) or x.shape[-1] != w.shape[2] or x.dtype != w.dtype:
        raise TypeRuleError(f"batched_linear: x {x} and weights {w} do not fit ([E, N, I] or [N, I] x [E, O, I])")
    if x.rank == 3 and x.shape[0] != w.shape[0]:
        raise TypeRuleError(f"batched_linear: x {x} has {x.shape[0]} batches, weights {w.shape[0]}")
    return [TensorType(x.dtype, (w.shape[0], x.shape[-2], w.shape[1]))]


def batched_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[e] = F.linear(x[e] (or x), w[e]): the checkpoint's [out, in] layout, one GEMM per expert,
    so each expert's output rounds exactly like the reference's per-expert F.linear."""
    return torch.stack([F.linear(x if x.dim() == 2 else x[e], w[e]) for e in range(w.shape[0])])


def batched_linear_naive(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Naive twin: one broadcast matmul with the transposed weights (equal up to GEMM blocking)."""
    return torch.matmul(x, w.transpose(1, 2))


register_op("batched_linear", _infer_batched_linear, lambda i, a, b: [batched_linear_ref(*i)], 2,
            foldable=False, doc="%y = batched_linear(%x, %w): y[e] = x[e] w[e]ᵀ; x [E, N, I] or [N, I]")
register_op("moe_sort", _infer_moe_sort, lambda i, a, b: moe_sort_ref(i[0], a["num_experts"]), 1,
            ("num_experts",), foldable=False)
register_op("moe_gather", _infer_moe_gather, lambda i, a, b: [moe_gather_ref(*i)], 2, foldable=False)
register_op("grouped_linear", _infer_grouped_linear, lambda i, a, b: [grouped_linear_ref(*i)], 3,
            foldable=False)
register_op("moe_combine", _infer_moe_combine, lambda i, a, b: [moe_combine_ref(*i)], 3,
            foldable=False)


@dataclass
class LowerMoeOptions:
    form: Literal["grouped", "dense"] = field(
        default="grouped", metadata={"help": "grouped: sort + grouped GEMM; dense: every expert on every "
                                             "token, static shapes only (TensorRT)"})


@register_pass
class LowerMoe(Pass):
    name = "lower-moe"
    Options = LowerMoeOptions

    def run(self, graph: Graph) -> PassResult:
        count = 0
        lower = self._lower if self.options.form == "grouped" else self._lower_dense
        for node in list(graph.nodes):
            if node.op != "moe":
                continue
            lower(graph, node)
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
        weights, chosen = LowerMoe._route(add, node, dtype)
        slot_i64 = TensorType("i64", (n_tok, k))
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


    @staticmethod
    def _route(add, node, dtype):
        """Router logits -> softmax (f32) -> top-k (-> renormalise) -> weights in the model dtype."""
        x, router = node.inputs[0], node.inputs[1]
        n_tok, experts, k = x.type.shape[0], router.type.shape[0], node.attrs["top_k"]
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
        return weights, chosen

    @staticmethod
    def _lower_dense(g: Graph, node) -> None:
        x, router, gate_up, down = node.inputs
        k, layer = node.attrs["top_k"], node.attrs.get("layer")
        n_tok, hidden = x.type.shape
        experts, two_i = gate_up.type.shape[0], gate_up.type.shape[1]
        half = two_i // 2
        dtype = x.dtype
        p = f"L{layer}.moe_"

        def add(op, inputs, types, attrs=None, name=""):
            new = g.add_node(op, inputs, types, attrs or {}, names=[p + name + (f"_{i}" if len(types) > 1 else "")
                                                                    for i in range(len(types))], before=node)
            return new.outputs if len(types) > 1 else new.output

        weights, chosen = LowerMoe._route(add, node, dtype)
        # the routing matrix [N, E]: weight w at each picked expert, exact zeros elsewhere
        picked = add("reshape", [chosen], [TensorType("i64", (n_tok, k, 1))], {"shape": [n_tok, k, 1]},
                     name="chosen_col")
        ids = add("arange", [], [TensorType("i64", (experts,))], {"size": experts, "dtype": "i64"}, name="expert_ids")
        hit = add("eq", [picked, ids], [TensorType("bool", (n_tok, k, experts))], name="hit")
        w_col = add("reshape", [weights], [TensorType(dtype, (n_tok, k, 1))], {"shape": [n_tok, k, 1]},
                    name="weights_col")
        zero = add("full", [], [TensorType(dtype, (1,))], {"shape": [1], "value": 0, "dtype": dtype}, name="zero")
        spread = add("where", [hit, w_col, zero], [TensorType(dtype, (n_tok, k, experts))], name="spread")
        route = add("reduce_sum", [spread], [TensorType(dtype, (n_tok, experts))], {"dims": [1]}, name="route")
        route_t = add("reshape", [add("permute", [route], [TensorType(dtype, (experts, n_tok))], {"perm": [1, 0]},
                                      name="route_t")],
                      [TensorType(dtype, (experts, n_tok, 1))], {"shape": [experts, n_tok, 1]}, name="route_col")
        # every expert on every token: two batched GEMMs over the stacked expert weights
        gu = add("batched_linear", [x, gate_up], [TensorType(dtype, (experts, n_tok, two_i))], name="gate_up")
        gate, up = add("split", [gu], [TensorType(dtype, (experts, n_tok, half))] * 2,
                       {"dim": 2, "sizes": [half, half]}, name="gate_up_split")
        act = add("mul", [add("silu", [gate], [gate.type], name="silu"), up], [gate.type], name="act")
        out = add("batched_linear", [act, down], [TensorType(dtype, (experts, n_tok, hidden))], name="down")
        weighted = add("mul", [out, route_t], [out.type], name="weighted")
        wide = add("cast", [weighted], [TensorType("f32", (experts, n_tok, hidden))], {"dtype": "f32"},
                   name="weighted_f32")
        total = add("reduce_sum", [wide], [TensorType("f32", (n_tok, hidden))], {"dims": [0]}, name="sum")
        y = add("cast", [total], [x.type], {"dtype": dtype}, name="out")
        g.replace_all_uses(node.output, y)


LowerMoe.__doc__ = __doc__

__all__ = ["LowerMoe", "LowerMoeOptions", "batched_linear_naive", "batched_linear_ref", "grouped_linear_naive", "grouped_linear_ref", "moe_combine_ref", "moe_gather_ref",
           "moe_sort_ref"]
