"""insert-state: the stateless full-sequence graph becomes one stateful step graph.

Before: logits = f(input_ids [B, T]) with zero initial states, q_start = 0 and lengths = T built
inside the graph. After:

    (logits, conv_state_i', recurrent_state_i', key_cache_j', value_cache_j', ...) =
        f(input_ids [B, T], q_start [B], lengths [B], conv_state_i, recurrent_state_i, key_cache_j, ...)

* q_start[b]: tokens row b has already consumed (its position offset); lengths[b]: valid new
  tokens of row b (right padding beyond). One graph serves prefill (T >= 1) and decode (T = 1).
* commit[b] <= lengths[b] (graphs whose GDN layers are fused `gated_deltanet` ops; an input
  the caller sets to lengths for an ordinary step): the GDN conv and recurrent states come back
  after the row's first commit[b] tokens, while outputs and logits cover all lengths[b] tokens and
  every token's keys and values are written. A speculative verify step commits the tokens already
  accepted and only computes its drafts: rejected drafts need no rollback, and the next step,
  starting at q_start + commit, writes over their cache positions. Graphs with unfused GDN ops
  get no commit input (metadata `commit = false`).
* conv state [B, C, K-1] (model dtype) and recurrent state [B, nv, dk, dv] (fp32) per GDN layer;
  K/V cache [B, nkv, S, hd] per attention layer, S the cache capacity (a symbol). Each state input
  carries `state = "layers.<i>.<kind>"` and is paired with the output of the same key.
* Padding never reaches the state: the conv state is gathered at each row's end (the op does it
  from `lengths`), g and beta are zeroed at padded steps before the delta rule (the fused GDN op
  masks from `lengths` itself), and keys written at padded positions sit at or beyond kv_len, so
  no query sees them and the next step overwrites them.

Contract:
  requires: a stateless graph (no state inputs) whose lengths value is `full {value = "T"}` [B]
            and whose position offset is `full {value = 0}` i64[B]; every state-carrying op has a
            `layer` attribute.
  ensures:  no `full` zero state feeds a state-carrying op; every state input is paired; the
            graph metadata says form = "stateful". Does not check the cache capacity S against
            q_start + T at compile time (the kv_cache_update op raises at run time).
"""

from __future__ import annotations

import torch

from qwen35c.graph.ir import Graph, TensorType, Value
from qwen35c.graph.ops import TypeRuleError, register_op
from qwen35c.passes.manager import Pass, PassFailure, PassResult, register_pass


def _infer_kv_cache_update(types, attrs):
    cache, new, q_start = types
    if cache.rank != 4 or new.rank != 4:
        raise TypeRuleError("kv_cache_update: cache and new keys must be [B, heads, len, hd]")
    if cache.shape[0] != new.shape[0] or cache.shape[1] != new.shape[1] or cache.shape[3] != new.shape[3]:
        raise TypeRuleError(f"kv_cache_update: cache {cache} does not fit new entries {new}")
    if cache.dtype != new.dtype or q_start.dtype != "i64":
        raise TypeRuleError("kv_cache_update: cache/new dtypes differ or q_start is not i64")
    return [cache]


def kv_cache_update_ref(cache: torch.Tensor, new: torch.Tensor, q_start: torch.Tensor) -> torch.Tensor:
    """Write new[:, :, t] at position q_start[b] + t of each row (a copy; the input is not mutated)."""
    batch, heads, length, dim = new.shape
    if int((q_start + length).max()) > cache.shape[2]:
        raise ValueError(f"KV cache holds {cache.shape[2]} positions; this step needs "
                         f"{int((q_start + length).max())}")
    index = (q_start.view(batch, 1) + torch.arange(length)).view(batch, 1, length, 1)
    return cache.scatter(2, index.expand(batch, heads, length, dim), new)


register_op("kv_cache_update", _infer_kv_cache_update,
            lambda i, a, b: [kv_cache_update_ref(*i)], 3, foldable=False,
            doc="cache' = cache with new[:, :, t] written at q_start + t")


def _find_full(graph: Graph, value, shape, dtype) -> list[Value]:
    return [n.output for n in graph.nodes if n.op == "full" and n.attrs["value"] == value
            and list(n.attrs["shape"]) == shape and n.attrs["dtype"] == dtype]


@register_pass
class InsertState(Pass):
    name = "insert-state"
    must_follow = ("fuse-deltanet",)

    def requires(self, graph: Graph) -> None:
        if graph.state_pairs():
            raise PassFailure("insert-state: the graph already has state inputs")
        if not any(v.name == "input_ids" for v in graph.inputs):
            raise PassFailure("insert-state: the graph has no input_ids input")

    def run(self, graph: Graph) -> PassResult:
        g = graph
        for name in ("q_start", "lengths"):  # the interface names win over internal values
            if name in g.values():
                g.rename(g.value(name), g.fresh_name(name))
        q_start = g.add_input("q_start", TensorType("i64", ("B",)))
        lengths = g.add_input("lengths", TensorType("i64", ("B",)))
        fused = [n for n in g.nodes if n.op == "gated_deltanet"]
        unfused = any(n.op in ("causal_conv1d", "gated_delta_rule") for n in g.nodes)
        if fused and not unfused:
            if "commit" in g.values():
                g.rename(g.value("commit"), g.fresh_name("commit"))
            commit = g.add_input("commit", TensorType("i64", ("B",)))
            for node in fused:
                node.inputs.append(commit)
        g.metadata["commit"] = bool(fused) and not unfused
        matches = 0
        for old in _find_full(g, "T", ["B"], "i64"):
            g.replace_all_uses(old, lengths)
            matches += 1
        for old in _find_full(g, 0, ["B"], "i64"):
            g.replace_all_uses(old, q_start)
            matches += 1
        first = g.nodes[0] if g.nodes else None
        valid = None

        def valid_mask() -> Value:
            nonlocal valid
            if valid is None:
                ar = g.add_node("arange", [], [TensorType("i64", ("T",))], {"size": "T", "dtype": "i64"},
                                names=["step_positions"], before=first)
                row = g.add_node("reshape", [ar.output], [TensorType("i64", (1, "T"))],
                                 {"shape": [1, "T"]}, before=first)
                col = g.add_node("reshape", [lengths], [TensorType("i64", ("B", 1))],
                                 {"shape": ["B", 1]}, before=first)
                valid = g.add_node("lt", [row.output, col.output], [TensorType("bool", ("B", "T"))],
                                   names=["valid"], before=first).output
            return valid

        def state_io(node, operand: int, result: int, key: str, name: str) -> None:
            t = node.inputs[operand].type
            t = t.with_shape(tuple(t.shape))
            value = g.add_input(name, t, {"state": key})
            node.inputs[operand] = value
            g.add_output(node.outputs[result], {"state": key})

        for node in list(g.nodes):
            layer = node.attrs.get("layer")
            if node.op == "causal_conv1d":
                state_io(node, 2, 1, f"layers.{layer}.conv", f"conv_state_{layer}")
                matches += 1
            elif node.op == "gated_delta_rule":
                self._mask_gates(g, node, valid_mask())
                state_io(node, 5, 1, f"layers.{layer}.recurrent", f"recurrent_state_{layer}")
                matches += 1
            elif node.op == "gated_deltanet":
                state_io(node, 6, 1, f"layers.{layer}.conv", f"conv_state_{layer}")
                state_io(node, 7, 2, f"layers.{layer}.recurrent", f"recurrent_state_{layer}")
                matches += 1
            elif node.op == "attention":
                for operand, kind in ((1, "key"), (2, "value")):
                    new = node.inputs[operand]
                    b, h, _, d = new.type.shape
                    cache_type = TensorType(new.dtype, (b, h, "S", d))
                    cache = g.add_input(f"{kind}_cache_{layer}", cache_type,
                                        {"state": f"layers.{layer}.{kind}_cache"})
                    upd = g.add_node("kv_cache_update", [cache, new, q_start], [cache_type],
                                     names=[f"L{layer}.{kind}_cache_new"], before=node)
                    node.inputs[operand] = upd.output
                    g.add_output(upd.output, {"state": f"layers.{layer}.{kind}_cache"})
                matches += 1
        g.metadata["form"] = "stateful"
        return PassResult(g, True, matches)

    @staticmethod
    def _mask_gates(g: Graph, node, valid: Value) -> None:
        """g and beta := 0 at padded steps (state untouched: decay exp(0) = 1, update beta = 0)."""
        for operand in (3, 4):
            x = node.inputs[operand]
            b, t, h = x.type.shape
            mask = g.add_node("reshape", [valid], [TensorType("bool", (b, t, 1))], {"shape": [b, t, 1]},
                              before=node).output
            zero = g.add_node("full", [], [TensorType(x.dtype, (1,))],
                              {"shape": [1], "value": 0, "dtype": x.dtype}, before=node).output
            node.inputs[operand] = g.add_node("where", [mask, x, zero], [x.type], before=node).output

    def ensures(self, graph: Graph) -> None:
        for node in graph.nodes:
            if node.op in ("causal_conv1d", "gated_delta_rule", "gated_deltanet"):
                for v in node.inputs:
                    if v.producer is not None and v.producer.op == "full" and v.type.rank >= 3:
                        raise PassFailure(f"insert-state: {node.op} still reads a zero state %{v.name}")


InsertState.__doc__ = __doc__  # the module docstring is the pass's summary and contract

__all__ = ["InsertState", "kv_cache_update_ref"]
