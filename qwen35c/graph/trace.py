"""Tracing: the reference model -> torch.export on the meta device -> the qwen35c IR.

Cost independent of depth and expert count, by templates:
  1. The config's layers fall into a few *kinds* (mixer type x dense/MoE MLP: at most 4).
     We build a *template config* with one layer per kind (same widths, experts, vocabulary) and
     export that model once, on the meta device, with dynamic batch `B` and sequence `T`.
     Expert count does not matter either: experts are stacked weights of the `qwen35::moe` op.
  2. The importer turns the ExportedProgram's ATen graph into IR ops (table `_ATEN` below) and
     splits it by `nn_module_stack` into a prologue, one segment per template layer and an
     epilogue.
  3. The full graph is the prologue, then for each real layer i a copy of its kind's segment
     with weight names rewritten `model.layers.{j}.` -> `model.layers.{i}.`, then the epilogue.
So the export costs the same for 4 or 64 layers; only the (cheap, pure-Python) copy grows.

Weights are `weight` nodes named by the reference model's parameter names, which are the
text-only checkpoint names (`model.layers.3.mlp.up_proj.weight`); `CheckpointWeights` reads them
from any official layout. The RoPE `inv_freq` buffer (non-persistent, computed from the config)
becomes a small `constant`. Custom-op nodes carry `layer = i` so later passes can name state.
"""

from __future__ import annotations

import operator
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from qwen35c.errors import QwenError
from qwen35c.graph.ir import TORCH_TO_DTYPE, Graph, TensorType, Value

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)(\.|$)")


class TraceError(QwenError):
    """The model could not be exported or an exported op has no IR mapping."""


# ---- the template config --------------------------------------------------------------------

def layer_kinds(config) -> list[tuple[str, bool]]:
    return [(config.layer_types[i], config.layer_is_moe(i)) for i in range(config.num_hidden_layers)]


def template_config(config):
    """One layer per distinct (layer type, is-MoE) kind, in order of first appearance."""
    kinds: list[tuple[str, bool]] = []
    for kind in layer_kinds(config):
        if kind not in kinds:
            kinds.append(kind)
    overrides: dict[str, Any] = {"num_hidden_layers": len(kinds), "layer_types": [k[0] for k in kinds],
                                 "mtp_num_hidden_layers": 0}
    if config.model_type == "qwen3_next":
        overrides["decoder_sparse_step"] = 1
        overrides["mlp_only_layers"] = [j for j, k in enumerate(kinds) if not k[1]]
    template = replace(config, **overrides)
    if layer_kinds(template) != kinds:
        raise TraceError(f"template config does not reproduce the layer kinds {kinds}")
    return template, kinds


def export_meta(config, dtype: torch.dtype = torch.float32):
    """torch.export of Qwen35ForCausalLM(config).forward(input_ids) on the meta device."""
    import reference.ops  # noqa: F401  (registers torch.ops.qwen35.*)
    from reference.model import Qwen35ForCausalLM

    with torch.device("meta"):
        model = Qwen35ForCausalLM(config).to(dtype).eval()
        ids = torch.zeros(2, 8, dtype=torch.long)
    batch = torch.export.Dim("B", min=1, max=1 << 20)
    seq = torch.export.Dim("T", min=1, max=1 << 20)
    try:
        return torch.export.export(model, (ids,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    except Exception as err:  # torch raises many types here; the message is what helps
        raise TraceError(f"torch.export failed: {type(err).__name__}: {err}") from err


# ---- the importer -------------------------------------------------------------------------------

@dataclass
class _Ctx:
    graph: Graph
    env: dict[str, Any]          # fx node name -> Value | list[Value] | symbol str | python scalar
    symbols: dict[str, str]      # torch symbol ("s72") -> IR symbol ("B")

    def dim(self, size) -> int | str:
        if isinstance(size, int):
            return size
        text = str(size)
        if re.fullmatch(r"[A-Za-z0-9_*]+", text):
            factors = [self.symbols.get(f, f) for f in text.split("*")]
            if all(re.fullmatch(r"[A-Za-z_]\w*", f) for f in factors):
                return "*".join(sorted(factors))
        raise TraceError(f"symbolic size '{text}' is not a product of known symbols")

    def type_of(self, fx_node) -> TensorType:
        val = fx_node.meta["val"]
        return TensorType(TORCH_TO_DTYPE[val.dtype], tuple(self.dim(d) for d in val.shape))

    def arg(self, a):
        if hasattr(a, "name") and hasattr(a, "op"):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        return a


def _cast_to(ctx: _Ctx, value: Value, dtype: str) -> Value:
    if value.dtype == dtype:
        return value
    return ctx.graph.add_node("cast", [value], [value.type.with_dtype(dtype)], {"dtype": dtype}).output


def _emit(ctx: _Ctx, op: str, inputs: list[Value], fx_node, attrs: dict | None = None) -> Value:
    return ctx.graph.add_node(op, inputs, [ctx.type_of(fx_node)], attrs or {}, names=[fx_node.name]).output


def _binary(op: str, scalar_op: str | None):
    def convert(ctx: _Ctx, node, args):
        out_type = ctx.type_of(node)
        a, b = args[0], args[1]
        if not isinstance(a, Value):  # scalar first: commutative ops only
            if op not in ("add", "mul"):
                raise TraceError(f"{node.target} with a leading scalar is not supported")
            a, b = b, a
        if not isinstance(b, Value):
            if scalar_op is None:
                raise TraceError(f"{node.target} with a scalar operand is not supported")
            scalar = -b if op == "sub" else b
            return _emit(ctx, scalar_op, [_cast_to(ctx, a, out_type.dtype)], node, {"scalar": scalar})
        return _emit(ctx, op, [_cast_to(ctx, a, out_type.dtype), _cast_to(ctx, b, out_type.dtype)], node)
    return convert


def _unary(op: str):
    return lambda ctx, node, args: _emit(ctx, op, [args[0]], node)


def _reshape(ctx, node, args):
    out = ctx.type_of(node)
    return _emit(ctx, "reshape", [args[0]], node, {"shape": list(out.shape)})


def _cast(ctx, node, args):
    return _emit(ctx, "cast", [args[0]], node, {"dtype": ctx.type_of(node).dtype})


def _full(ctx, node, args):
    out = ctx.type_of(node)
    value = args[1]
    if not isinstance(value, (int, float)):
        value = ctx.dim(value)
    return _emit(ctx, "full", [], node, {"shape": list(out.shape), "value": value, "dtype": out.dtype})


def _zeros(ctx, node, args):
    out = ctx.type_of(node)
    return _emit(ctx, "full", [], node, {"shape": list(out.shape), "value": 0, "dtype": out.dtype})


def _arange(ctx, node, args):
    if len(args) != 1:
        raise TraceError("arange with start/step is not supported")
    out = ctx.type_of(node)
    return _emit(ctx, "arange", [], node, {"size": out.shape[0], "dtype": out.dtype})


def _split(ctx, node, args):
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    vals = node.meta["val"]
    rank = vals[0].dim()
    dim = dim % rank
    sizes = [int(v.shape[dim]) for v in vals]
    types = [TensorType(TORCH_TO_DTYPE[v.dtype], tuple(ctx.dim(d) for d in v.shape)) for v in vals]
    n = ctx.graph.add_node("split", [args[0]], types, {"dim": dim, "sizes": sizes},
                           names=[f"{node.name}_{i}" for i in range(len(vals))])
    return list(n.outputs)


def _slice(ctx, node, args):
    x: Value = args[0]
    dim = (args[1] if len(args) > 1 else 0) % x.type.rank
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    size = x.type.shape[dim]
    if not isinstance(start, int) or (end is not None and not isinstance(end, int)):
        raise TraceError("slice with symbolic bounds is not supported")
    if end is not None and isinstance(size, int) and end >= size:
        end = None
    if end is not None and end >= (1 << 62):
        end = None
    return _emit(ctx, "slice", [x], node, {"dim": dim, "start": start, "end": end, "step": step})


def _transpose(ctx, node, args):
    x: Value = args[0]
    perm = list(range(x.type.rank))
    a, b = args[1] % x.type.rank, args[2] % x.type.rank
    perm[a], perm[b] = perm[b], perm[a]
    return _emit(ctx, "permute", [x], node, {"perm": perm})


def _mean(ctx, node, args):
    x = args[0]
    dims = [d % x.type.rank for d in args[1]]
    keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
    return _emit(ctx, "reduce_mean", [x], node, {"dims": dims, "keepdim": bool(keep)})


def _pow(ctx, node, args):
    return _emit(ctx, "pow", [args[0]], node, {"exponent": float(args[1])})


def _softplus(ctx, node, args):
    if (len(args) > 1 and args[1] != 1) or (len(args) > 2 and args[2] != 20):
        raise TraceError("softplus with non-default beta/threshold is not supported")
    return _emit(ctx, "softplus", [args[0]], node)


def _cat(ctx, node, args):
    return _emit(ctx, "concat", list(args[0]), node, {"dim": args[1] % ctx.type_of(node).rank
                                                       if len(args) > 1 else 0})


def _linear(ctx, node, args):
    return _emit(ctx, "linear", [a for a in args[:3] if a is not None], node)


def _custom(op: str, n_tensors: int, attr_names: tuple[str, ...] = ()):
    def convert(ctx, node, args):
        vals = node.meta["val"]
        vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        types = [TensorType(TORCH_TO_DTYPE[v.dtype], tuple(ctx.dim(d) for d in v.shape)) for v in vals]
        attrs = {name: args[n_tensors + i] for i, name in enumerate(attr_names)}
        attrs["layer"] = ctx.env["__layer__"]
        names = [node.name] if len(types) == 1 else [f"{node.name}_{i}" for i in range(len(types))]
        n = ctx.graph.add_node(op, list(args[:n_tensors]), types, attrs, names=names)
        return n.outputs[0] if len(types) == 1 else list(n.outputs)
    return convert


def _getitem(ctx, node, args):
    return args[0][args[1]]


def _skip(ctx, node, args):
    return None


_ATEN: dict[str, Callable] = {
    "aten.embedding.default": lambda ctx, node, args: _emit(ctx, "embedding", [args[0], args[1]], node),
    "aten.linear.default": _linear,
    "aten.add.Tensor": _binary("add", "add_scalar"),
    "aten.sub.Tensor": _binary("sub", "add_scalar"),
    "aten.mul.Tensor": _binary("mul", "mul_scalar"),
    "aten.div.Tensor": _binary("div", "div_scalar"),
    "aten.neg.default": _unary("neg"),
    "aten.exp.default": _unary("exp"),
    "aten.rsqrt.default": _unary("rsqrt"),
    "aten.sigmoid.default": _unary("sigmoid"),
    "aten.silu.default": _unary("silu"),
    "aten.cos.default": _unary("cos"),
    "aten.sin.default": _unary("sin"),
    "aten.softplus.default": _softplus,
    "aten.pow.Tensor_Scalar": _pow,
    "aten.mean.dim": _mean,
    "aten.to.dtype": _cast,
    "aten._to_copy.default": _cast,
    "aten.type_as.default": _cast,
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.unsqueeze.default": _reshape,
    "aten.squeeze.dim": _reshape,
    "aten.full.default": _full,
    "aten.zeros_like.default": _zeros,
    "aten.new_zeros.default": _zeros,
    "aten.arange.default": _arange,
    "aten.split_with_sizes.default": _split,
    "aten.split.Tensor": _split,
    "aten.chunk.default": _split,
    "aten.slice.Tensor": _slice,
    "aten.transpose.int": _transpose,
    "aten.cat.default": _cat,
    "aten._assert_tensor_metadata.default": _skip,
    "aten.sym_size.int": lambda ctx, node, args: ctx.dim(node.meta["val"]),
    "qwen35.causal_conv1d.default": _custom("causal_conv1d", 4),
    "qwen35.gated_delta_rule.default": _custom("gated_delta_rule", 6),
    "qwen35.attention.default": _custom("attention", 5),
    "qwen35.moe.default": _custom("moe", 4, ("top_k", "norm_topk_prob")),
}


def _module_layer(node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():
        m = _LAYER_RE.match(path)
        if m:
            return int(m.group(1))
    return None


def _buffer_value(name: str, config) -> torch.Tensor:
    if name.endswith("rotary_emb.inv_freq"):
        from reference.model import RotaryEmbedding

        return RotaryEmbedding(config).inv_freq.float()
    raise TraceError(f"buffer '{name}' has no known recipe (it is not a checkpoint tensor)")


def import_exported(ep, config) -> tuple[Graph, dict[int, int | None]]:
    """ExportedProgram -> (IR graph, {id(node): template layer or None})."""
    sig = ep.graph_signature
    graph = Graph(name="qwen35")
    ctx = _Ctx(graph, {}, {})
    user_inputs = list(sig.user_inputs)
    layer_of: dict[int, int | None] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in sig.inputs_to_parameters:
                pname = sig.inputs_to_parameters[node.name]
                ctx.env["__layer__"] = None
                w = graph.add_node("weight", [], [ctx.type_of(node)], {"name": pname},
                                   names=[node.name.removeprefix("p_")])
                ctx.env[node.name] = w.output
                layer_of[id(w)] = _LAYER_RE.match(pname) and int(_LAYER_RE.match(pname).group(1))
            elif node.name in sig.inputs_to_buffers:
                value = _buffer_value(sig.inputs_to_buffers[node.name], config)
                c = graph.add_node("constant", [], [TensorType.of(value)], {"value": value},
                                   names=[node.name.removeprefix("b_")])
                ctx.env[node.name] = c.output
                layer_of[id(c)] = None
            elif node.name in user_inputs:
                val = node.meta["val"]
                for i, size in enumerate(val.shape):
                    if not isinstance(size, int):
                        ctx.symbols.setdefault(str(size), "BT"[i] if i < 2 else f"D{i}")
                ids = node.meta["val"].dtype == torch.long
                ctx.env[node.name] = graph.add_input(node.name, ctx.type_of(node), {"high": config.vocab_size} if ids else {})
            continue
        if node.op == "output":
            outs = node.args[0]
            for out in outs:
                graph.add_output(ctx.env[out.name])
            continue
        target = str(node.target) if node.target is not operator.getitem else "getitem"
        convert = _getitem if target == "getitem" else _ATEN.get(target)
        if convert is None:
            raise TraceError(f"exported op {target} (node {node.name}) has no IR mapping")
        layer = _module_layer(node)
        ctx.env["__layer__"] = layer
        before = len(graph.nodes)
        result = convert(ctx, node, [ctx.arg(a) for a in node.args])
        for new in graph.nodes[before:]:
            layer_of[id(new)] = layer
        ctx.env[node.name] = result
    ctx.env.pop("__layer__", None)
    return graph, layer_of


# ---- instantiating the template per layer ----------------------------------------------------

def _rename_weight(name: str, template_layer: int, layer: int) -> str:
    prefix = f"model.layers.{template_layer}."
    if not name.startswith(prefix):
        raise TraceError(f"weight '{name}' is used by template layer {template_layer} but named for "
                         f"another layer")
    return f"model.layers.{layer}." + name[len(prefix):]


def instantiate(template: Graph, layer_of: dict[int, int | None], config,
                kinds: list[tuple[str, bool]]) -> Graph:
    """Expand the template graph (one layer per kind) to the config's real layer list."""
    nodes = template.nodes
    layer_nodes: dict[int, list] = {}
    for node in nodes:
        j = layer_of.get(id(node))
        if j is not None and node.op != "weight":
            layer_nodes.setdefault(j, []).append(node)
    first = min(nodes.index(ns[0]) for ns in layer_nodes.values())
    last = max(nodes.index(ns[-1]) for ns in layer_nodes.values())
    in_layer = {id(n) for ns in layer_nodes.values() for n in ns}
    prologue = [n for n in nodes[:first] if id(n) not in in_layer and layer_of.get(id(n)) is None
                and n.op != "weight"]
    epilogue = [n for n in nodes[last + 1:] if id(n) not in in_layer and layer_of.get(id(n)) is None
                and n.op != "weight"]
    weights = {id(n): n for n in nodes if n.op == "weight"}
    embed = next(n for n in prologue if n.op == "embedding").output

    def escaping(j: int) -> Value:
        produced = {id(v): v for n in layer_nodes[j] for v in n.outputs}
        used_outside = {id(v) for n in nodes if id(n) not in {id(m) for m in layer_nodes[j]}
                        for v in n.inputs} | {id(v) for v in template.outputs}
        outs = [v for k, v in produced.items() if k in used_outside]
        if len(outs) != 1:
            raise TraceError(f"template layer {j} has {len(outs)} values escaping it, expected one")
        return outs[0]

    hidden_in = {0: embed}
    for j in range(1, len(kinds)):
        hidden_in[j] = escaping(j - 1)
    last_out = escaping(len(kinds) - 1)

    graph = Graph(name=template.name, metadata=dict(template.metadata))
    vmap: dict[int, Value] = {}
    for value, attrs in zip(template.inputs, template.input_attrs):
        vmap[id(value)] = graph.add_input(value.name, value.type, attrs)

    def copy(node, rename: Callable[[str], str] | None = None, prefix: str = "", layer: int | None = None):
        attrs = dict(node.attrs)
        if node.op == "weight" and rename:
            attrs["name"] = rename(attrs["name"])
        if "layer" in attrs and layer is not None:
            attrs["layer"] = layer
        names = ([re.sub(r"\W", "_", attrs["name"])] if node.op == "weight"
                 else [prefix + v.name for v in node.outputs])
        new = graph.add_node(node.op, [vmap[id(v)] for v in node.inputs], [v.type for v in node.outputs],
                             attrs, names=names)
        for old, out in zip(node.outputs, new.outputs):
            vmap[id(old)] = out

    shared_weights = [w for w in weights.values() if layer_of.get(id(w)) is None]
    for w in shared_weights:
        copy(w)
    for node in prologue:
        copy(node)
    hidden = vmap[id(embed)]
    kind_index = {kind: j for j, kind in enumerate(kinds)}
    for i, kind in enumerate(layer_kinds(config)):
        j = kind_index[kind]
        vmap[id(hidden_in[j])] = hidden
        segment_weights = [w for w in weights.values() if layer_of.get(id(w)) == j]
        for w in segment_weights:
            copy(w, lambda name: _rename_weight(name, j, i), prefix=f"L{i}.")
        for node in layer_nodes[j]:
            copy(node, prefix=f"L{i}.", layer=i)
        hidden = vmap[id(escaping(j))] if j != len(kinds) - 1 else vmap[id(last_out)]
    vmap[id(last_out)] = hidden
    for node in epilogue:
        copy(node)
    for value, attrs in zip(template.outputs, template.output_attrs):
        graph.add_output(vmap[id(value)], attrs)
    return graph


@dataclass
class TraceResult:
    graph: Graph
    export_seconds: float
    import_seconds: float
    template_layers: int


def trace_config(config, dtype: torch.dtype = torch.float32) -> TraceResult:
    """Trace a config to the stateless IR graph: logits = f(input_ids [B, T])."""
    template, kinds = template_config(config)
    start = time.perf_counter()
    ep = export_meta(template, dtype)
    exported = time.perf_counter()
    graph, layer_of = import_exported(ep, template)
    graph = instantiate(graph, layer_of, config, kinds)
    graph.name = re.sub(r"\W", "_", config.model_type)
    graph.metadata = {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
                      "layer_types": list(config.layer_types), "dtype": TORCH_TO_DTYPE[dtype],
                      "tie_word_embeddings": bool(config.tie_word_embeddings), "form": "stateless"}
    graph.rename(graph.outputs[0], "logits")
    done = time.perf_counter()
    return TraceResult(graph, exported - start, done - exported, len(kinds))


def _mtp_step_module():
    from reference.model import Qwen35ForCausalLM

    class MtpStep(Qwen35ForCausalLM):
        """The MTP head as a step over (hidden [B, T, H] at positions i, input_ids [B, T] = tokens
        i + 1): its logits (of tokens i + 2) and its own post-norm hidden states (chained drafts feed
        them back as `hidden`). Built like the main model's step: `insert-state` turns the zero
        position offset into `q_start` (pair i sits at rotary position i + 1) and gives the layer a
        KV cache, so a draft step attends over every pair fed before it, as the reference MTP
        attends over its window."""

        def forward(self, input_ids, hidden):
            batch, length = input_ids.shape
            lengths = torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
            q_start = torch.zeros_like(lengths)
            positions = q_start.unsqueeze(1) + torch.arange(length, device=input_ids.device) + 1
            mtp_hidden = self.mtp(hidden, self.model.embed_tokens(input_ids), positions)
            return self.lm_head(mtp_hidden), mtp_hidden

    return MtpStep


def trace_mtp(config, dtype: torch.dtype = torch.float32) -> Graph:
    """The stateless IR graph of a config's MTP head: (logits, mtp_hidden) = f(input_ids, hidden).

    One export of a one-layer model (its main layer unused): the MTP layer is a full-attention
    decoder layer whatever the model's layer mix. Its state-carrying ops get `layer =
    num_hidden_layers` (the index HF and vLLM give the MTP layer), so its state keys are its own."""
    import reference.ops  # noqa: F401  (registers torch.ops.qwen35.*)

    if not config.mtp_num_hidden_layers:
        raise TraceError("the config has no MTP layer (mtp_num_hidden_layers = 0)")
    template = replace(config, num_hidden_layers=1, layer_types=[config.layer_types[0]])
    if config.model_type == "qwen3_next":
        template = replace(template, mlp_only_layers=[])
    with torch.device("meta"):
        model = _mtp_step_module()(template).to(dtype).eval()
        args = (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, config.hidden_size, dtype=dtype))
    batch, seq = torch.export.Dim("B", min=1, max=1 << 20), torch.export.Dim("T", min=1, max=1 << 20)
    try:
        ep = torch.export.export(model, args, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), strict=False)
    except Exception as err:  # torch raises many types here; the message is what helps
        raise TraceError(f"torch.export of the MTP head failed: {type(err).__name__}: {err}") from err
    graph, _ = import_exported(ep, template)
    for node in graph.nodes:
        if node.attrs.get("layer", 0) is None:
            node.attrs["layer"] = config.num_hidden_layers
    graph.name = re.sub(r"\W", "_", config.model_type) + "_mtp"
    graph.metadata = {"model_type": config.model_type, "num_hidden_layers": 1, "layer_types": ["full_attention"],
                      "dtype": TORCH_TO_DTYPE[dtype], "tie_word_embeddings": bool(config.tie_word_embeddings),
                      "form": "stateless", "mtp": True}
    graph.rename(graph.outputs[0], "logits")
    graph.rename(graph.outputs[1], "mtp_hidden")
    graph.output_attrs[1]["name"] = "mtp_hidden"      # passes rename values; the interface name stays
    return graph


def trace_checkpoint(path, dtype: torch.dtype = torch.float32) -> TraceResult:
    """Trace the model of a checkpoint directory (reads config.json only; no weights)."""
    from reference.config import load_config

    return trace_config(load_config(path), dtype)


class CheckpointWeights:
    """Weight callable over a checkpoint directory in any official layout (VLM or text prefix,
    fused or per-expert experts, Qwen3-Next fused projections), one tensor at a time."""

    def __init__(self, path, config=None):
        from reference.checkpoint import Checkpoint, WeightLoader
        from reference.config import load_config

        self.config = config or load_config(path)
        self._ckpt = Checkpoint(path)
        self._loader = WeightLoader(self._ckpt, self.config)
        with torch.device("meta"):
            from reference.model import Qwen35ForCausalLM

            model = Qwen35ForCausalLM(self.config)
        self._shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
        if self.config.tie_word_embeddings:
            self._shapes["lm_head.weight"] = self._shapes["model.embed_tokens.weight"]

    def _stored(self, name: str) -> str:
        """The parameter a weight is read from: a tied LM head is the embedding."""
        return "model.embed_tokens.weight" if name == "lm_head.weight" and self.config.tie_word_embeddings else name

    def __call__(self, name: str) -> torch.Tensor:
        name = self._stored(name)
        return self._loader.tensor(name, self._shapes[name])

    def release(self, name: str) -> None:
        """Drop the mapped pages of a weight the caller has finished with (bounded build memory)."""
        self._loader.release(self._stored(name))

    def unused(self) -> list[str]:
        """Checkpoint tensors no weight was read from so far (see `WeightLoader.unused`)."""
        return self._loader.unused()


__all__ = ["CheckpointWeights", "TraceError", "TraceResult", "export_meta", "import_exported",
           "instantiate", "template_config", "trace_checkpoint", "trace_config", "trace_mtp"]
