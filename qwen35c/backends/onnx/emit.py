"""Lower the stateful qwen35c IR (the output of `insert-state`) to one ONNX graph for ORT >= 1.32.

One graph serves prefill (T >= 1) and decode (T = 1) with dynamic B and T. Its interface:

    inputs : input_ids i64[B, T], q_start i64[B], lengths i64[B], logit_positions i64[B, P],
             then every state input of the IR (layouts below), then `commit` i64[B] when the IR
             has one: tokens per row whose effect the GDN states keep (see insert-state). Its
             default, [-1], means "lengths", so a caller that knows nothing of speculative
             decoding (ORT GenAI, Triton server) never feeds it
    outputs: logits f32[B, P, V] (the LM head runs only at the positions asked for), then one
             `<state name>.out` per state input, same shape and layout

An artifact whose checkpoint has an MTP head holds a second graph of this form, the head's
(`mtp.onnx`): it also takes `hidden` f32[B, T, H] (the main model's post-norm hidden states at
positions i; input_ids are then the tokens i + 1) and returns `mtp_hidden` f32[B, T, H], and the
main graph returns `hidden` f32[B, T, H] at every position (`hidden_output`). The MTP graph reads
the tensors it shares with the main graph (the embedding, a tied LM head) from the main graph's
external data file (`reuse`) instead of storing them twice.

Backend-specific state layouts (recorded in the manifest; the session owns these buffers):
  conv_state_i       [B, K-1, C]   channels-last (the conv runs on concat(state, x) along time)
  recurrent_state_i  [B, nv, dk, dv] K-major: what com.microsoft::LinearAttention reads and writes
  key/value_cache_j  [B, nkv, S, hd] S = the capacity chosen by the session; written in place by
                     com.microsoft::GroupQueryAttention (the session binds input and output to one
                     buffer), so a step writes only its new positions

Node count is decode overhead (each kernel launch costs microseconds; a 0.8B decode step is ~50 ms),
so fused kernels are used wherever they compute the reference's fp32 values: LinearAttention and
LinearAttentionGate for the delta rule, GroupQueryAttention, RotaryEmbedding-23,
SkipSimplifiedLayerNormalization for residual add + norm, one RMSNormalization for the q/k L2
norms. Where a kernel is slower, needs a layout change or its numerics differ (GatedRMSNorm,
CausalConvWithState, ORT's epsilon-free L2 norm), standard ops are emitted and the lowering says why. The layout glue
that neighbouring lowerings leave in cancelling pairs (Reshape/Transpose chains) is removed at the
end by simplify.py; the 0.8B graph has 782 nodes, 718 kernels a decode step after ORT's optimizer.

Graph outputs are the producers' own tensors (no Identity copies). Decode cost per step is then the
weights plus the recurrent states; see bench/bench_onnx.py for the numbers against ORT GenAI.

Weights are streamed: each weight-only subgraph (a checkpoint tensor and the folds on it, e.g.
`1 + w` of the zero-centred norms) is evaluated when the first node using it is emitted, written to
the external data file at a 4 KiB-aligned offset and released, so the peak memory is one tensor.
Linear weights are stored transposed ([in, out]) for MatMul; a weight shared with the embedding
(tied LM head) is used through Gemm(transB=1) instead of stored twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qwen35c.backends.onnx.simplify import simplify, subgraph_nodes
from qwen35c.errors import QwenError
from qwen35c.graph.ir import Graph, Value
from qwen35c.graph.ops import OPS

OPSET = 23
MS_DOMAIN = "com.microsoft"
ALIGN = 4096
INLINE_LIMIT = 64          # tensors with at most this many elements live inside model.onnx
STREAM_BYTES = 64 << 20    # a weight larger than this is converted and written a row chunk at a time

ONNX_DTYPE = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
              "f64": TensorProto.DOUBLE, "i64": TensorProto.INT64, "i32": TensorProto.INT32,
              "i8": TensorProto.INT8, "u8": TensorProto.UINT8, "bool": TensorProto.BOOL,
              "f8e4m3": TensorProto.FLOAT8E4M3FN, "i16": TensorProto.INT16, "i4": TensorProto.INT4}

QUANTIZED_LINEAR_OPS = ("quantized_linear", "linear_int4", "linear_fp8", "qlinear")


class EmitError(QwenError):
    """The IR holds something this backend cannot lower; the message names the node."""


@dataclass
class StateSpec:
    name: str                  # ONNX input name (= IR state input name)
    output: str                # ONNX output name
    key: str                   # IR state key, e.g. layers.0.conv
    dtype: str
    shape: list                # ints and symbols (B, S)
    layout: str

    def to_json(self) -> dict:
        return {"name": self.name, "output": self.output, "key": self.key, "dtype": self.dtype,
                "shape": self.shape, "layout": self.layout}


@dataclass
class EmitResult:
    model_file: Path
    data_file: Path
    states: list[StateSpec]
    num_nodes: int
    num_initializers: int
    data_bytes: int
    ops: dict[str, int] = field(default_factory=dict)
    commit: bool = False                 # the graph takes `commit` (speculative verify steps)
    extra_inputs: list[str] = field(default_factory=list)    # e.g. "hidden f32[B,T,256]" (the MTP graph)
    extra_outputs: list[str] = field(default_factory=list)   # "hidden ..." / "mtp_hidden ..."
    external: dict[str, TensorProto] = field(default_factory=dict)   # weight (or derived key) -> its tensor


class _DataWriter:
    """Appends tensors to the external data file at aligned offsets (deterministic order)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def write(self, array: np.ndarray) -> tuple[int, int]:
        return self.write_rows([array])

    def write_rows(self, chunks) -> tuple[int, int]:
        """Consecutive row chunks of one tensor (arrays), at one aligned offset: (offset, length)."""
        pad = (-self.offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for array in chunks:
            data = np.ascontiguousarray(array)
            self.file.write(memoryview(data).cast("B"))
            self.offset += data.nbytes
        return start, self.offset - start

    def close(self) -> None:
        self.file.close()


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint16).numpy()
    return t.contiguous().numpy()


class OnnxEmitter:
    """Walks the IR once, in order, appending ONNX nodes; see the module docstring. A dialect (the
    TensorRT bundle's) subclasses it: `opset_imports`, `conv_state_layout` and the op lowerings."""

    opset_imports = (("", OPSET), (MS_DOMAIN, 1))

    def __init__(self, graph: Graph, weights: Callable[[str], torch.Tensor], out_dir: Path,
                 model_name: str = "model.onnx", on_weight: Callable[[str], None] | None = None,
                 release: Callable[[str], None] | None = None, tied_lm_head: bool = False,
                 hidden_output: bool = False, reuse: dict[str, TensorProto] | None = None):
        if graph.metadata.get("form") != "stateful":
            raise EmitError("the ONNX backend needs a stateful graph: run insert-state first "
                            "(the pipeline must contain insert-state)")
        self.graph, self.weights, self.out_dir = graph, weights, Path(out_dir)
        self.model_file = self.out_dir / model_name
        self.data_name = model_name + ".data"
        self.on_weight, self.release = on_weight, release
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.names: dict[int, str] = {}             # id(Value) -> ONNX tensor name
        self.static_cache: dict[int, torch.Tensor] = {}
        self.init_cache: dict[tuple, str] = {}
        self.counter = 0
        self.consts: dict[tuple, str] = {}
        self.dims: dict[str, str] = {}
        self.shapes: dict[tuple, str] = {}
        self.users = graph.users()
        self.tied_lm_head = tied_lm_head
        self.hidden_output = hidden_output
        self.reuse = reuse or {}                                 # weight (or key) -> another graph's tensor
        self.external: dict[str, TensorProto] = {}               # what this graph wrote, for the next one
        self.embedding_table = next((n.inputs[0] for n in graph.nodes if n.op == "embedding"), None)
        self._static: dict[int, bool] = {}
        self.deferred_kv: dict[int, tuple[str, str, str]] = {}   # id(cache') -> (cache, new, name)
        self.shared: dict[tuple, object] = {}                    # subgraphs every layer shares
        self.known_shapes: dict[str, tuple] = {}                 # ONNX name -> symbolic dims, for simplify

    # ---- names and small helpers --------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__{self.counter}"

    def node(self, op: str, inputs: Iterable[str], n_out: int = 1, hint: str | None = None,
             domain: str = "", outputs: list[str] | None = None, **attrs) -> list[str]:
        outs = outputs or [self.fresh(hint or op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh("n_" + op),
                                           domain=domain or None, **attrs))
        return outs

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            name = self.fresh(hint)
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            self.consts[key] = name
        return self.consts[key]

    def i64(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "i64")

    def f32(self, value) -> str:
        return self.const(np.asarray(value, dtype=np.float32), "f32")

    def dim(self, dim) -> str:
        """A 1-D i64 tensor [1] holding a dim (int or symbol, products of symbols allowed)."""
        if isinstance(dim, int):
            return self.i64([dim])
        if dim not in self.dims:
            factors = dim.split("*")
            if len(factors) > 1:
                out = self.dim(factors[0])
                for f in factors[1:]:
                    out = self.node("Mul", [out, self.dim(f)], hint=f"dim_{dim}")[0]
                self.dims[dim] = out
            else:
                source, axis = self.symbol_sources[dim]
                shape = self.node("Shape", [source], hint=f"shape_{dim}", start=axis, end=axis + 1)[0]
                self.dims[dim] = shape
        return self.dims[dim]

    def shape(self, dims) -> str:
        dims = tuple(dims)
        if all(isinstance(d, int) for d in dims):
            return self.i64(list(dims))
        if dims not in self.shapes:
            self.shapes[dims] = self.node("Concat", [self.dim(d) for d in dims], hint="shape", axis=0)[0]
        return self.shapes[dims]

    def name(self, value: Value) -> str:
        key = id(value)
        if key not in self.names:
            if self.is_static(value):
                self.names[key] = self.initializer(value)
            else:
                raise EmitError(f"value %{value.name} is used before it is defined")
        return self.names[key]

    # ---- weights: static subgraphs are folded at build time and streamed out -------------------

    def _weight_name(self, value: Value) -> str | None:
        node = value.producer
        while node is not None and node.op in ("reshape", "cast") and len(node.inputs) == 1:
            node = node.inputs[0].producer
        return node.attrs["name"] if node is not None and node.op == "weight" else None

    def is_static(self, value: Value) -> bool:
        key = id(value)
        if key not in self._static:
            self._static[key] = self._is_static(value)
        return self._static[key]

    def _is_static(self, value: Value) -> bool:
        node = value.producer
        if node is None:
            return False
        if node.op in ("weight", "constant"):
            return True
        if not OPS[node.op].foldable or not node.inputs:
            return False
        if any(isinstance(d, str) for d in value.type.shape):
            return False
        return all(self.is_static(v) for v in node.inputs)

    def evaluate(self, value: Value) -> torch.Tensor:
        """The tensor of a static value (weights are fetched, folds run with the op's reference impl)."""
        node = value.producer
        if node.op == "weight":
            name = node.attrs["name"]
            if self.on_weight:
                self.on_weight(name)
            tensor = self.weights(name).to(value.type.torch_dtype)
            return tensor
        if node.op == "constant":
            return node.attrs["value"].to(value.type.torch_dtype)
        inputs = [self.evaluate(v) for v in node.inputs]
        outs = OPS[node.op].impl(inputs, node.attrs, {})
        return outs[node.outputs.index(value)]

    def _released(self, value: Value) -> None:
        if self.release is None:
            return
        stack = [value]
        while stack:
            v = stack.pop()
            if v.producer is None:
                continue
            if v.producer.op == "weight":
                self.release(v.producer.attrs["name"])
            stack.extend(v.producer.inputs)

    def initializer(self, value: Value, transform: str = "", tensor: torch.Tensor | None = None) -> str:
        """An initializer for a static value; `transform` names a layout change ('t' = transpose)."""
        key = (id(value), transform)
        if key in self.init_cache:
            return self.init_cache[key]
        name = value.name + (f".{transform}" if transform else "")
        weight = value.producer.attrs["name"] if tensor is None and not transform and value.producer.op == "weight" \
            else None
        shared = self.reuse.get(weight) if weight is not None else None
        if shared is not None and shared.data_type == ONNX_DTYPE[value.dtype]:
            self._read_from(shared, name)
        elif weight is None or not self._add_streamed(name, value):
            if tensor is None:
                tensor = self.evaluate(value)
            if transform == "t":
                tensor = tensor.t()
            self.add_tensor(name, tensor, value.dtype)
        if weight is not None and self.initializers[-1].data_location == TensorProto.EXTERNAL:
            self.external[weight] = self.initializers[-1]
        self._released(value)
        self.init_cache[key] = name
        return name

    def _add_streamed(self, name: str, value: Value) -> bool:
        """A large weight as stored -> its external data, converted STREAM_BYTES of rows at a time
        (a 248K-row fp32 embedding is never whole in memory); False for a small one."""
        dtype = value.type.torch_dtype
        source = self.weights(value.producer.attrs["name"])
        if source.dim() == 0 or source.numel() * dtype.itemsize <= STREAM_BYTES:
            return False
        if self.on_weight:
            self.on_weight(value.producer.attrs["name"])
        rows = max(1, STREAM_BYTES // max(1, source[0].numel() * dtype.itemsize))
        chunks = (_np(source[r:r + rows].to(dtype)) for r in range(0, source.shape[0], rows))
        offset, length = self.data.write_rows(chunks)
        self.initializers.append(self._external(name, value.dtype, list(source.shape), offset, length))
        return True

    def reusable(self, key: str | None, hint: str, make: Callable[[], tuple[torch.Tensor, str]]) -> str:
        """An initializer derived from a weight alone (e.g. the MatMulNBits table of a packed LM head),
        read from another graph's data file when that graph wrote it under `key`; else `make()` ->
        (tensor, dtype) is written and recorded under `key` (None: not shared)."""
        name = self.fresh(hint)
        if key and key in self.reuse:
            self._read_from(self.reuse[key], name)
            return name
        tensor, dtype = make()
        self.add_tensor(name, tensor, dtype)
        if key and self.initializers[-1].data_location == TensorProto.EXTERNAL:
            self.external[key] = self.initializers[-1]
        return name

    def _read_from(self, tensor: TensorProto, name: str) -> None:
        """Initializer `name`: the bytes another graph of the artifact wrote (same file, same offset)."""
        proto = TensorProto()
        proto.CopyFrom(tensor)
        proto.name = name
        self.initializers.append(proto)

    def _external(self, name: str, dtype: str, dims: list[int], offset: int, length: int) -> TensorProto:
        proto = TensorProto(name=name, data_type=ONNX_DTYPE[dtype], dims=dims)
        proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = k, v
        return proto

    def add_tensor(self, name: str, tensor: torch.Tensor, dtype: str) -> None:
        array = _np(tensor)
        if array.size <= INLINE_LIMIT:
            proto = onnx.numpy_helper.from_array(array, name)
            proto.data_type = ONNX_DTYPE[dtype]
        else:
            proto = self._external(name, dtype, list(array.shape), *self.data.write(array))
        self.initializers.append(proto)

    # ---- the walk ------------------------------------------------------------------------------

    def emit(self) -> EmitResult:
        g = self.graph
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data = _DataWriter(self.out_dir / self.data_name)
        try:
            inputs, outputs, states = self._interface()
            for node in g.nodes:
                if all(self.is_static(v) for v in node.outputs):
                    continue  # folded into an initializer when (and if) used
                handler = getattr(self, f"op_{node.op}", None)
                if handler is None:
                    if node.op in QUANTIZED_LINEAR_OPS or node.op.startswith("quant"):
                        self._quantized(node)
                        continue
                    raise EmitError(f"node %{node.outputs[0].name} = {node.op}(...): no ONNX lowering for op "
                                    f"'{node.op}'")
                outs = handler(node)
                for value, name in zip(node.outputs, outs):
                    self.names[id(value)] = name
                    if id(value) not in self.state_values:   # states may have a backend layout
                        self.known_shapes.setdefault(name, tuple(value.type.shape))
            self._finish_outputs(outputs)
        finally:
            self.data.close()
        self._simplify(outputs)
        graph_proto = helper.make_graph(self.nodes, g.name or "qwen35", inputs, outputs, self.initializers)
        model = helper.make_model(graph_proto, producer_name="qwen35c",
                                  opset_imports=[helper.make_opsetid(d, v) for d, v in self.opset_imports])
        model.ir_version = 10
        self.model_file.write_bytes(model.SerializeToString(deterministic=True))
        return EmitResult(self.model_file, self.out_dir / self.data_name, states, len(self.nodes),
                          len(self.initializers), self.data.offset, dict(sorted(self.ops.items())),
                          any(i.name == "commit" for i in inputs), [_signature(v) for v in self.extra_inputs],
                          [_signature(v) for v in outputs[1:len(outputs) - len(states)]], self.external)

    def _simplify(self, outputs) -> None:
        """Drop the layout ops that cancel between neighbouring lowerings (see simplify.py), then
        the inline constants nobody reads; count the ops left, for the manifest."""
        constants = {name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
                     for (dtype, shape, data), name in self.consts.items() if np.dtype(dtype) == np.int64}
        shape_tensors = {name: dims for dims, name in self.shapes.items()}
        self.nodes = simplify(self.nodes, self.known_shapes, shape_tensors, constants,
                              {o.name for o in outputs})
        used = {i for n in self.nodes for inner in [n, *subgraph_nodes(n)] for i in inner.input}
        self.initializers = [t for t in self.initializers
                             if t.name in used or t.data_location == TensorProto.EXTERNAL]
        self.ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in self.nodes)

    def _interface(self):
        g = self.graph
        inputs, states = [], []
        by_name = {v.name: v for v in g.inputs}
        for required in ("input_ids", "q_start", "lengths"):
            if required not in by_name:
                raise EmitError(f"the stateful graph has no '{required}' input")
        self.symbol_sources = {"B": ("input_ids", 0), "T": ("input_ids", 1)}
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]))
        inputs.append(helper.make_tensor_value_info("q_start", TensorProto.INT64, ["B"]))
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]))
        inputs.append(helper.make_tensor_value_info("logit_positions", TensorProto.INT64, ["B", "P"]))
        for name in ("input_ids", "q_start", "lengths"):
            self.names[id(by_name[name])] = name
        self.state_values = {id(v) for _key, value, out in g.state_pairs() for v in (value, out)}
        self.extra_inputs = []
        for value in g.inputs:   # the MTP graph's `hidden`
            if id(value) not in self.state_values and value.name not in ("input_ids", "q_start", "lengths", "commit"):
                if any(isinstance(d, str) and d not in ("B", "T") for d in value.type.shape):
                    raise EmitError(f"graph input %{value.name} {value.type}: only B and T may be symbolic")
                self.extra_inputs.append(helper.make_tensor_value_info(value.name, ONNX_DTYPE[value.dtype],
                                                                       list(value.type.shape)))
                self.names[id(value)] = value.name
        inputs += self.extra_inputs
        for key, value, _out in g.state_pairs():
            shape = list(value.type.shape)
            layout = "as-ir"
            users = self.users.get(id(value), [])
            op = users[0].op if users else ""
            if key.endswith(".conv") and op == "gated_deltanet":
                shape, layout = self.conv_state_layout(shape)
            elif key.endswith(".recurrent") and op == "gated_deltanet":
                layout = "[B, nv, dk, dv] K-major"
            elif key.endswith("_cache"):
                layout = "[B, nkv, S, hd]"
                if "S" not in self.symbol_sources:
                    self.symbol_sources["S"] = (value.name, 2)
            else:
                raise EmitError(f"state input %{value.name} ({key}) is used by '{op}', which this backend "
                                f"does not lower with state")
            inputs.append(helper.make_tensor_value_info(value.name, ONNX_DTYPE[value.dtype], shape))
            self.names[id(value)] = value.name
            states.append(StateSpec(value.name, value.name + ".out", key, value.dtype, shape, layout))
        logits = g.outputs[0]
        outputs = [helper.make_tensor_value_info("logits", ONNX_DTYPE["f32"], ["B", "P", logits.type.shape[-1]])]
        # hidden states [B, T, H] at every position: the main graph's (the LM head's input) for the
        # MTP head, the MTP graph's own (its second output) for chained drafts
        self.extras = [(v, attrs["name"]) for v, attrs in zip(g.outputs[1:], g.output_attrs[1:]) if "name" in attrs]
        if self.hidden_output:
            self.extras.insert(0, (self._lm_head_input(), "hidden"))
        for value, name in self.extras:
            if value.dtype != "f32":
                raise EmitError(f"graph output {name} is {value.type}; the interface has f32 hidden states")
            outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPE["f32"], list(value.type.shape)))
        for spec in states:
            outputs.append(helper.make_tensor_value_info(spec.output, ONNX_DTYPE[spec.dtype], spec.shape))
        if "commit" in by_name:   # an overridable initializer: -1 (any negative) stands for lengths
            inputs.append(helper.make_tensor_value_info("commit", TensorProto.INT64, ["B"]))
            self.initializers.append(onnx.numpy_helper.from_array(np.asarray([-1], np.int64), "commit"))
            self.names[id(by_name["commit"])] = self.node(
                "Where", [self.node("Less", ["commit", self.i64([0])])[0], "lengths", "commit"], hint="commit")[0]
        self.states = states
        self.logits_value = logits
        return inputs, outputs, states

    def conv_state_layout(self, shape: list) -> tuple[list, str]:
        """The conv state's shape and layout from the IR's [B, C, K-1]: channels-last here."""
        return [shape[0], shape[2], shape[1]], "[B, K-1, C] channels-last"

    def _lm_head_input(self) -> Value:
        """The hidden states the LM head reads: the input of the linear (plain or quantized) whose
        weight is `lm_head.weight` (or the embedding table it is tied to)."""
        names = ("lm_head.weight", "model.embed_tokens.weight")
        for node in self.graph.nodes:
            if node.op == "linear" or node.op in QUANTIZED_LINEAR_OPS:
                weights = [v.producer.attrs["name"] for v in node.inputs[1:] if v.producer and v.producer.op == "weight"]
                if any(w.split("#")[0] in names for w in weights):
                    return node.inputs[0]
        raise EmitError("hidden_output: no LM head (a linear reading lm_head.weight) in the graph")

    def _finish_outputs(self, outputs) -> None:
        """Name the graph outputs. A tensor made by a node is renamed to the output's name, so the
        producer writes straight into the buffer the session binds (an Identity would copy every
        state tensor, the whole KV cache included, once per step); an Identity remains only for a
        graph input passed through or a tensor that is already another output."""
        g = self.graph
        out_of = {key: out for key, _v, out in g.state_pairs()}
        produced = {o for n in self.nodes for o in n.output}
        renames: dict[str, str] = {}
        pairs = [(self.name(out_of[spec.key]), spec.output) for spec in self.states]
        logits = self.name(self.logits_value)
        if self.logits_value.dtype != "f32":
            logits = self.node("Cast", [logits], to=TensorProto.FLOAT)[0]
            produced.add(logits)
        pairs[:0] = [(logits, "logits")] + [(self.name(value), name) for value, name in self.extras]
        for src, dst in pairs:
            if src in produced and src not in renames:
                renames[src] = dst
            else:
                self.node("Identity", [renames.get(src, src)], outputs=[dst])
        for n in self.nodes:
            for inner in [n, *subgraph_nodes(n)]:
                for i, name in enumerate(inner.input):
                    if name in renames:
                        inner.input[i] = renames[name]
            for i, name in enumerate(n.output):
                if name in renames:
                    n.output[i] = renames[name]

    def _quantized(self, node) -> None:
        try:
            from qwen35c.backends.onnx.quant import lower_quantized_linear
        except ImportError:
            raise EmitError(f"node %{node.outputs[0].name} is a quantized linear ('{node.op}') but this install has "
                            f"no qwen35c/backends/onnx/quant.py (lower_quantized_linear); the quantization "
                            f"backend hook is missing") from None
        if node.outputs[0] is self.logits_value:     # a quantized LM head: only the logit rows
            outs = lower_quantized_linear(self, node, x=self._logit_rows(node.inputs[0]))
        else:
            outs = lower_quantized_linear(self, node)
        for value, name in zip(node.outputs, outs):
            self.names[id(value)] = name

    # ---- op lowerings: each returns the ONNX names of the node's outputs ------------------------

    def _x(self, node, i=0) -> str:
        return self.name(node.inputs[i])

    def _unary(onnx_op):
        def lower(self, node):
            return self.node(onnx_op, [self._x(node)], hint=node.outputs[0].name)
        return lower

    op_neg, op_exp, op_log, op_sigmoid = _unary("Neg"), _unary("Exp"), _unary("Log"), _unary("Sigmoid")
    op_softplus, op_sqrt, op_tanh = _unary("Softplus"), _unary("Sqrt"), _unary("Tanh")
    op_cos, op_sin, op_abs, op_relu = _unary("Cos"), _unary("Sin"), _unary("Abs"), _unary("Relu")
    op_reciprocal = _unary("Reciprocal")

    def op_rsqrt(self, node):
        return self.node("Reciprocal", [self.node("Sqrt", [self._x(node)])[0]], hint=node.outputs[0].name)

    def op_silu(self, node):
        x = self._x(node)
        return self.node("Mul", [x, self.node("Sigmoid", [x])[0]], hint=node.outputs[0].name)

    def _binary(onnx_op):
        def lower(self, node):
            return self.node(onnx_op, [self._x(node, 0), self._x(node, 1)], hint=node.outputs[0].name)
        return lower

    op_add, op_sub, op_mul, op_div = _binary("Add"), _binary("Sub"), _binary("Mul"), _binary("Div")
    op_maximum, op_minimum = _binary("Max"), _binary("Min")
    op_lt, op_le, op_gt = _binary("Less"), _binary("LessOrEqual"), _binary("Greater")
    op_ge, op_eq = _binary("GreaterOrEqual"), _binary("Equal")

    def _scalar_const(self, node, value):
        return self.const(np.asarray(value, dtype=_np_dtype(node.inputs[0].dtype)))

    def op_add_scalar(self, node):
        return self.node("Add", [self._x(node), self._scalar_const(node, node.attrs["scalar"])])

    def op_mul_scalar(self, node):
        return self.node("Mul", [self._x(node), self._scalar_const(node, node.attrs["scalar"])])

    def op_div_scalar(self, node):
        return self.node("Div", [self._x(node), self._scalar_const(node, node.attrs["scalar"])])

    def op_pow(self, node):
        if node.attrs["exponent"] == 2:
            x = self._x(node)
            return self.node("Mul", [x, x])
        return self.node("Pow", [self._x(node), self._scalar_const(node, node.attrs["exponent"])])

    def op_where(self, node):
        return self.node("Where", [self._x(node, i) for i in range(3)])

    def op_cast(self, node):
        return self.node("Cast", [self._x(node)], to=ONNX_DTYPE[node.attrs["dtype"]])

    def op_arange(self, node):
        size = node.attrs["size"]
        end = self.node("Squeeze", [self.dim(size), self.i64([0])])[0]
        zero, one = self.const(np.asarray(0, np.int64)), self.const(np.asarray(1, np.int64))
        out = self.node("Range", [zero, end, one])[0]
        if node.attrs.get("dtype", "i64") != "i64":
            out = self.node("Cast", [out], to=ONNX_DTYPE[node.attrs["dtype"]])[0]
        return [out]

    def op_full(self, node):
        value = node.attrs["value"]
        dtype = node.attrs["dtype"]
        if isinstance(value, str):
            scalar = self.node("Cast", [self.dim(value)], to=ONNX_DTYPE[dtype])[0]
        else:
            scalar = self.const(np.asarray([value], dtype=_np_dtype(dtype)))
        return self.node("Expand", [scalar, self.shape(node.attrs["shape"])])

    def op_reshape(self, node):
        return self.node("Reshape", [self._x(node), self.shape(node.attrs["shape"])])

    def op_permute(self, node):
        return self.node("Transpose", [self._x(node)], perm=list(node.attrs["perm"]))

    def op_slice(self, node):
        end = node.attrs.get("end")
        end = np.iinfo(np.int64).max if end is None else end
        return self.node("Slice", [self._x(node), self.i64([node.attrs.get("start", 0)]), self.i64([end]),
                                   self.i64([node.attrs["dim"]]), self.i64([node.attrs.get("step", 1)])])

    def op_split(self, node):
        return self.node("Split", [self._x(node), self.i64(list(node.attrs["sizes"]))], n_out=len(node.outputs),
                         axis=node.attrs["dim"])

    def op_concat(self, node):
        return self.node("Concat", [self.name(v) for v in node.inputs], axis=node.attrs["dim"])

    def op_expand(self, node):
        return self.node("Expand", [self._x(node), self.shape(node.attrs["shape"])])

    def op_index_select(self, node):
        return self.node("Gather", [self._x(node, 0), self._x(node, 1)], axis=node.attrs["dim"])

    def op_repeat_interleave(self, node):
        x, t = self._x(node), node.inputs[0].type
        dim, r = node.attrs["dim"] % t.rank, node.attrs["repeats"]
        up = self.node("Unsqueeze", [x, self.i64([dim + 1])])[0]
        shape = list(t.shape[:dim + 1]) + [r] + list(t.shape[dim + 1:])
        big = self.node("Expand", [up, self.shape(shape)])[0]
        return self.node("Reshape", [big, self.shape(node.outputs[0].type.shape)])

    def _reduce(onnx_op):
        def lower(self, node):
            return self.node(onnx_op, [self._x(node), self.i64(list(node.attrs["dims"]))],
                             keepdims=int(node.attrs.get("keepdim", False)))
        return lower

    op_reduce_mean, op_reduce_sum = _reduce("ReduceMean"), _reduce("ReduceSum")

    def op_softmax(self, node):
        return self.node("Softmax", [self._x(node)], axis=node.attrs["dim"])

    def op_topk(self, node):
        return self.node("TopK", [self._x(node), self.i64([node.attrs["k"]])], n_out=2,
                         axis=node.attrs.get("dim", -1), largest=1, sorted=1)

    def op_rms_norm(self, node):
        # x̂ · (offset + w) in fp32, the reference's order; RMSNormalization-23 computes the same
        x, w = self._x(node, 0), node.inputs[1]
        scale = self.evaluate(w).float() + node.attrs.get("offset", 0.0) if self.is_static(w) else None
        scale_name = self.initializer(w, "rms", tensor=scale) if scale is not None else self.name(w)
        eps = float(node.attrs["eps"])
        residual = self._residual_add(node.inputs[0])
        if residual is not None:
            # residual add + norm → one SkipSimplifiedLayerNormalization, which also outputs the sum
            # (under the Add's own name, for the next residual); fp32, the same sum and norm
            out = self.node("SkipSimplifiedLayerNormalization", [residual.input[0], residual.input[1], scale_name],
                            n_out=4, domain=MS_DOMAIN, epsilon=eps, outputs=[self.fresh("skip_norm"), "", "", x])
            self.nodes[self.nodes.index(residual)] = self.nodes.pop()  # in the Add's place: still topological
            return out[:1]
        return self.node("RMSNormalization", [x, scale_name], axis=-1, epsilon=eps)

    def _residual_add(self, value):
        """The ONNX Add that made `value` when it is a residual sum: an f32 `add` of two tensors of
        the output's own shape (no broadcast), emitted as a plain Add. None otherwise."""
        producer = value.producer
        if producer is None or producer.op != "add" or value.dtype != "f32" or \
                any(v.type.shape != value.type.shape or self.is_static(v) for v in producer.inputs):
            return None
        name = self.names.get(id(value))
        return next((n for n in reversed(self.nodes) if n.op_type == "Add" and list(n.output) == [name]), None)

    def op_gated_rms_norm(self, node):
        """w ⊙ x̂ ⊙ silu(z) (the GDN output norm, plain weight): RMSNormalization over the head dim,
        then the gate on the packed [.., h·d] view, where z arrives and out_proj wants the result,
        so simplify drops those Reshapes. com.microsoft::GatedRMSNorm computes the same in one
        kernel but is slower (ORT 1.32 CPU, [1, T, 16·128]: 45 vs 24 µs at T = 1, 30.6 vs 3.3 ms at
        T = 512, 0.8B prefill ~0.5 s). Other dtypes round the norm to the input dtype before the
        gate, as the reference does."""
        x, w, z = self._x(node, 0), self.name(node.inputs[1]), self._x(node, 2)
        shape, dtype = node.inputs[0].type.shape, node.inputs[0].dtype
        lead = [0] * (len(shape) - 2)
        n = self.node("RMSNormalization", [x, w], axis=-1, epsilon=float(node.attrs["eps"]))[0]
        n = self.node("Reshape", [n, self.i64(lead + [-1])])[0]
        z = self.node("Reshape", [z, self.i64(lead + [-1])])[0]
        if dtype != "f32":
            n = self.node("Cast", [self.node("Cast", [n], to=ONNX_DTYPE[dtype])[0]], to=TensorProto.FLOAT)[0]
        if node.inputs[2].dtype != "f32":
            z = self.node("Cast", [z], to=TensorProto.FLOAT)[0]
        out = self.node("Mul", [n, self.node("Mul", [z, self.node("Sigmoid", [z])[0]])[0]])[0]
        if dtype != "f32":
            out = self.node("Cast", [out], to=ONNX_DTYPE[dtype])[0]
        return self.node("Reshape", [out, self.i64(lead + list(shape[-2:]))], hint=node.outputs[0].name)

    def op_swiglu(self, node):
        gate, up = self._x(node, 0), self._x(node, 1)
        return self.node("Mul", [self.node("Mul", [gate, self.node("Sigmoid", [gate])[0]])[0], up],
                         hint=node.outputs[0].name)

    def op_l2_norm(self, node):
        return [self._l2(self._x(node), node.attrs["eps"])]

    def _l2(self, x: str, eps: float) -> str:
        ss = self.node("ReduceSum", [self.node("Mul", [x, x])[0], self.i64([-1])], keepdims=1)[0]
        inv = self.node("Reciprocal", [self.node("Sqrt", [self.node("Add", [ss, self.f32(eps)])[0]])[0]])[0]
        return self.node("Mul", [x, inv])[0]

    def op_quantized_embedding(self, node):
        from qwen35c.backends.onnx.quant import lower_quantized_embedding

        return lower_quantized_embedding(self, node)

    def op_quantized_moe(self, node):
        from qwen35c.backends.onnx.quant import lower_quantized_moe

        return lower_quantized_moe(self, node)

    def op_embedding(self, node):
        return self.node("Gather", [self._x(node, 0), self._x(node, 1)], axis=0, hint="embed")

    def op_linear(self, node):
        x, w = node.inputs[0], node.inputs[1]
        if node.outputs[0] is self.logits_value:
            return self._lm_head(node)
        if self.is_static(w):
            weight = self.initializer(w, "t")
            out = self.node("MatMul", [self.name(x), weight], hint=node.outputs[0].name)
        else:
            wt = self.node("Transpose", [self.name(w)], perm=[1, 0])[0]
            out = self.node("MatMul", [self.name(x), wt])
        if len(node.inputs) == 3:
            out = self.node("Add", [out[0], self.name(node.inputs[2])])
        return out

    def _lm_head(self, node):
        """Logits only at `logit_positions` [B, P]: gather the hidden rows, then the LM head."""
        x, w = node.inputs[0], node.inputs[1]
        H = x.type.shape[-1]
        picked = self._logit_rows(x)                                                     # [B, P, H]
        if self.tied_lm_head and self.embedding_table is not None:
            # tied LM head: reuse the embedding table [V, H] with transB instead of a transposed copy
            table = self.name(self.embedding_table)
            p2 = self.node("Reshape", [picked, self.i64([-1, H])])[0]
            out = self.node("Gemm", [p2, table], transB=1)[0]
            V = w.type.shape[0]
            shape = self.node("Concat", [self.dim("B"), self.i64([-1]), self.i64([V])], axis=0)[0]
            return self.node("Reshape", [out, shape], hint="logits_raw")
        return self.node("MatMul", [picked, self.initializer(w, "t")], hint="logits_raw")

    def _logit_rows(self, x) -> str:
        """The hidden rows [B, P, H] at `logit_positions` [B, P] of x [B, T, H]."""
        hidden = self.name(x)
        H = x.type.shape[-1]
        flat = self.node("Reshape", [hidden, self.i64([-1, H])])[0]                     # [B*T, H]
        T = self.dim("T")
        rows = self.node("Range", [self.const(np.asarray(0, np.int64)),
                                   self.node("Squeeze", [self.dim("B"), self.i64([0])])[0],
                                   self.const(np.asarray(1, np.int64))])[0]             # [B]
        base = self.node("Mul", [self.node("Unsqueeze", [rows, self.i64([1])])[0], T])[0]   # [B, 1]
        index = self.node("Add", [base, "logit_positions"])[0]                          # [B, P]
        return self.node("Gather", [flat, index], axis=0)[0]                            # [B, P, H]

    def op_matmul(self, node):
        return self.node("MatMul", [self._x(node, 0), self._x(node, 1)])

    def op_rope(self, node):
        """Rotate-half partial RoPE on [B, T, h, hd] with positions [B, T]: the standard
        RotaryEmbedding-23 (non-interleaved, rotary_embedding_dim = rd) on the packed [B, T, h·hd]
        view, fed per-step cos/sin [B, T, rd/2] computed once for every layer's q and k in fp32 as
        the reference computes them (positions · inv_freq, then cos and sin)."""
        x, pos = self._x(node, 0), self._x(node, 1)
        rd, theta = node.attrs["rotary_dim"], node.attrs["theta"]
        if ("rope", pos, rd, theta) not in self.shared:
            inv = 1.0 / (theta ** (np.arange(0, rd, 2, dtype=np.int64).astype(np.float32) / rd))
            freqs = self.node("Mul", [self.node("Unsqueeze", [self.node("Cast", [pos], to=TensorProto.FLOAT)[0],
                                                              self.i64([-1])])[0], self.f32(inv.astype(np.float32))])[0]
            self.shared[("rope", pos, rd, theta)] = (self.node("Cos", [freqs])[0], self.node("Sin", [freqs])[0])
        cos, sin = self.shared[("rope", pos, rd, theta)]
        heads, hd = node.inputs[0].type.shape[2], node.inputs[0].type.shape[3]
        packed = self.node("Reshape", [x, self.i64([0, 0, heads * hd])])[0]
        y = self.node("RotaryEmbedding", [packed, cos, sin], interleaved=0, num_heads=heads,
                      rotary_embedding_dim=rd)[0]
        return self.node("Reshape", [y, self.i64([0, 0, heads, hd])], hint=node.outputs[0].name)

    # ---- state-carrying ops ----------------------------------------------------------------------

    def op_kv_cache_update(self, node):
        """cache' = cache with new[:, :, t] at q_start[b] + t.

        When every user of cache' is an `attention` (and the graph output), the write is left to
        that attention's com.microsoft::GroupQueryAttention (see op_attention): the name of cache'
        is reserved here and becomes GQA's present_key/present_value output. Otherwise it is a
        ScatterElements on the sequence axis."""
        if self._gqa_ok(node):
            name = self.fresh(node.outputs[0].name)
            self.deferred_kv[id(node.outputs[0])] = (self._x(node, 0), self._x(node, 1), name)
            return [name]
        cache, new, q_start = (self._x(node, i) for i in range(3))
        steps = self.node("Unsqueeze", [self._steps(), self.i64([0])])[0]                    # [1, T]
        pos = self.node("Add", [self.node("Unsqueeze", [q_start, self.i64([1])])[0], steps])[0]  # [B, T]
        pos = self.node("Unsqueeze", [pos, self.i64([1, 3])])[0]                             # [B, 1, T, 1]
        index = self.node("Expand", [pos, self.node("Shape", [new])[0]])[0]
        return self.node("ScatterElements", [cache, index, new], axis=2, hint=node.outputs[0].name)

    def _steps(self) -> str:
        if not hasattr(self, "_steps_name"):
            self._steps_name = self.node("Range", [self.const(np.asarray(0, np.int64)),
                                                   self.node("Squeeze", [self.dim("T"), self.i64([0])])[0],
                                                   self.const(np.asarray(1, np.int64))], hint="steps")[0]
        return self._steps_name

    def _gqa_ok(self, node) -> bool:
        if node.inputs[0].dtype != "f32" or not hasattr(self, "deferred_kv"):
            return False
        users = self.users.get(id(node.outputs[0]), [])
        return bool(users) and all(u.op == "attention" and u.inputs[1] is not u.inputs[2] for u in users) \
            and len(users) == 1

    def _attention_gqa(self, node, q, key, value):
        """com.microsoft::GroupQueryAttention over the cache, writing only the new positions.

        Row b's T new keys/values go to positions q_start[b] .. q_start[b] + T - 1 (seqlens_k =
        q_start + T - 1, so GQA's past length is q_start[b]) and query t sees keys 0 .. q_start[b] + t:
        for every valid step (t < lengths[b]) that is the reference's rule, j <= q_start + t < kv_len.
        Padded steps write past kv_len, where the next step overwrites them, exactly like the
        ScatterElements form. The session binds each cache's input and output to one buffer, which
        GQA detects (past and present share their data) and then updates in place, so neither a
        full-cache copy nor a slice of the cache is made per step."""
        past_k, new_k, present_k = key
        past_v, new_v, present_v = value
        q_start = self._x(node, 3)
        heads, hd = node.inputs[0].type.shape[1], node.inputs[0].type.shape[3]
        kv_heads = node.inputs[1].type.shape[1]

        def packed(x):
            return self.node("Reshape", [self.node("Transpose", [x], perm=[0, 2, 1, 3])[0], self.i64([0, 0, -1])])[0]

        if ("gqa", q_start) not in self.shared:
            ends = self.node("Add", [q_start, self.dim("T")])[0]                               # [B]
            self.shared[("gqa", q_start)] = (
                self.node("Cast", [self.node("Sub", [ends, self.i64([1])])[0]], to=TensorProto.INT32)[0],
                self.node("Cast", [self.node("ReduceMax", [ends], keepdims=0)[0]], to=TensorProto.INT32)[0])
        seqlens, total = self.shared[("gqa", q_start)]
        out = self.node("GroupQueryAttention", [packed(q), packed(new_k), packed(new_v), past_k, past_v, seqlens, total],
                        outputs=[self.fresh(node.outputs[0].name), present_k, present_v], domain=MS_DOMAIN,
                        num_heads=heads, kv_num_heads=kv_heads, scale=float(hd) ** -0.5)[0]
        out = self.node("Reshape", [out, self.i64([0, 0, heads, hd])])[0]
        return self.node("Transpose", [out], perm=[0, 2, 1, 3], hint=node.outputs[0].name)

    def op_attention(self, node):
        key = self.deferred_kv.get(id(node.inputs[1]))
        value = self.deferred_kv.get(id(node.inputs[2]))
        if key is not None and value is not None:
            return self._attention_gqa(node, self._x(node, 0), key, value)
        if key is not None or value is not None:
            raise EmitError(f"%{node.outputs[0].name}: only one of its caches was deferred to GQA")
        return self._attention_sdpa(node)

    def _attention_sdpa(self, node):
        """Opset-23 Attention over the cache prefix that any row can see, with an explicit mask.

        Key j is visible to query t of row b iff j <= q_start[b] + t and j < kv_len[b] (the
        reference's rule, including its escape for a row with no visible key). The cache is sliced
        to max(kv_len) first so decode cost follows the context, not the cache capacity.
        """
        q, k, v, q_start, kv_len = (self._x(node, i) for i in range(5))
        total = self.node("ReduceMax", [kv_len], keepdims=1)[0]                               # [1]
        k = self.node("Slice", [k, self.i64([0]), total, self.i64([2])])[0]
        v = self.node("Slice", [v, self.i64([0]), total, self.i64([2])])[0]
        keys = self.node("Range", [self.const(np.asarray(0, np.int64)),
                                   self.node("Squeeze", [total, self.i64([0])])[0],
                                   self.const(np.asarray(1, np.int64))])[0]                  # [L]
        keys = self.node("Reshape", [keys, self.i64([1, 1, -1])])[0]                         # [1, 1, L]
        pos = self.node("Add", [self.node("Unsqueeze", [q_start, self.i64([1])])[0],
                                self.node("Unsqueeze", [self._steps(), self.i64([0])])[0]])[0]  # [B, T]
        pos = self.node("Unsqueeze", [pos, self.i64([2])])[0]                                # [B, T, 1]
        kvl = self.node("Unsqueeze", [kv_len, self.i64([1, 2])])[0]                          # [B, 1, 1]
        visible = self.node("And", [self.node("LessOrEqual", [keys, pos])[0],
                                    self.node("Less", [keys, kvl])[0]])[0]                   # [B, T, L]
        empty = self.node("And", [self.node("Equal", [keys, self.const(np.asarray(0, np.int64))])[0],
                                  self.node("Equal", [kvl, self.const(np.asarray(0, np.int64))])[0]])[0]
        visible = self.node("Or", [visible, empty])[0]
        mask = self.node("Unsqueeze", [visible, self.i64([1])])[0]                           # [B, 1, T, L]
        hd = node.inputs[0].type.shape[3]
        return self.node("Attention", [q, k, v, mask], scale=float(hd) ** -0.5, is_causal=0,
                         hint=node.outputs[0].name)

    def _steps_below(self, n: str) -> str:
        """[B, T, 1] bool: step t < n[b] (shared by every layer)."""
        if ("below", n) not in self.shared:
            steps = self.node("Unsqueeze", [self._steps(), self.i64([0])])[0]                 # [1, T]
            self.shared[("below", n)] = self.node("Unsqueeze", [self.node("Less", [
                steps, self.node("Unsqueeze", [n, self.i64([1])])[0]])[0], self.i64([2])])[0]  # [B, T, 1]
        return self.shared[("below", n)]

    def _uncommitted_outputs(self, o, q, k, v, kept_state, g, beta, kept, lengths, nv, dk, layer) -> str:
        """Outputs of the steps past commit (a speculative step's drafts): LinearAttention again from
        the kept state with only steps commit..lengths-1 unmasked (masked steps leave a state as it
        is, so each draft sees exactly the state after the tokens before it). In an `If` on
        max(lengths - commit) > 0, so an ordinary step (commit = lengths) costs one If, not a
        second pass over the states."""
        if "uncommitted" not in self.shared:
            left = self.node("ReduceMax", [self.node("Sub", [lengths, kept])[0]], keepdims=0)[0]
            self.shared["uncommitted"] = self.node("Greater", [left, self.const(np.asarray(0, np.int64))],
                                                   hint="uncommitted")[0]
        first = self._steps_below(kept)
        later = self.node("And", [self.node("Not", [first])[0], self._steps_below(lengths)])[0]
        zero = self.f32(np.zeros((1,), np.float32))
        outer, self.nodes = self.nodes, []     # the then-branch's nodes; they read outer tensors by name
        drafts, _ = self.node("LinearAttention", [q, k, v, kept_state, self.node("Where", [later, g, zero])[0],
                                                  self.node("Where", [later, beta, zero])[0]],
                              n_out=2, domain=MS_DOMAIN, q_num_heads=nv, kv_num_heads=nv,
                              update_rule="gated_delta", scale=float(dk) ** -0.5, hint=f"L{layer}.gdn_drafts")
        merged = self.node("Where", [first, o, drafts], hint=f"L{layer}.gdn_o")[0]
        branch, self.nodes = self.nodes, outer
        same = self.fresh(f"L{layer}.gdn_o")

        def graph(nodes, name, out):
            return helper.make_graph(nodes, f"L{layer}_{name}", [],
                                     [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

        return self.node("If", [self.shared["uncommitted"]], hint=f"L{layer}.gdn_o",
                         then_branch=graph(branch, "drafts", merged),
                         else_branch=graph([helper.make_node("Identity", [o], [same])], "committed", same))[0]

    def op_gated_deltanet(self, node):
        """Causal conv + SiLU in standard ops, then the gated delta rule as
        com.microsoft::LinearAttention (update_rule gated_delta, packed [B, T, H*D] q/k/v, K-major
        state [B, nv, dk, dv], the IR's own layout).

        Why these kernels (ORT 1.32 CPU, measured on the 0.8B shapes, 16 heads of 128): the
        LinearAttention kernel is ~70x faster than com.microsoft::GatedDeltaNet at T = 1 (0.3 vs
        22 ms a layer) and ~7x at T = 512 (84 vs 560 ms), with the same values (1e-8). The conv is
        one Gather of the K windows of concat(state, x), a Mul by the taps and a ReduceSum (4
        kernels; K Slices, K Muls and a Sum took 9, ~2 ms more per 0.8B decode step). That costs what
        CausalConvWithState does (ORT GenAI's graph at T = 512: 16 ms a layer plus 6 ms of Transposes
        into its channels-first layout, against ~18 ms here; the same at T = 1) and keeps the conv
        state channels-last, with no Transposes.

        The gates are com.microsoft::LinearAttentionGate, the reference's fp32 formula
        g = -exp(A_log) · softplus(a + dt_bias), beta = sigmoid(b) (within 1e-6), then zeroed on
        steps t >= commit[b] (commit = lengths but in a speculative step) so padding and drafts
        never touch the state; the drafts' outputs come from `_uncommitted_outputs`. q and k are
        L2-normalised as the reference's x·rsqrt(Σx² + 1e-6), written as one RMSNormalization (ORT's
        in-op norm has no epsilon and differs where |x| is small), and q is scaled by dk^-0.5 in-op. The new conv
        state is gathered at each row's commit point of concat(state, x), so right padding (and a
        draft) never enters it.
        """
        a = node.attrs
        nk, nv, dk, dv = a["num_k_heads"], a["num_v_heads"], a["head_k_dim"], a["head_v_dim"]
        mixed, a_in, b_in = self._x(node, 0), self._x(node, 1), self._x(node, 2)
        conv_w_value, a_log, dt_bias = node.inputs[3], node.inputs[4], node.inputs[5]
        conv_state, state, lengths = self._x(node, 6), self._x(node, 7), self._x(node, 8)
        if node.inputs[0].dtype != "f32":
            raise EmitError(f"%{node.outputs[0].name}: the ONNX backend lowers gated_deltanet in f32 only "
                            f"(got {node.inputs[0].dtype})")
        channels = 2 * nk * dk + nv * dv
        w = self.evaluate(conv_w_value).float().reshape(channels, -1)
        kernel = w.shape[-1]
        joined = self.node("Concat", [conv_state, mixed], axis=1)[0]                         # [B, K-1+T, C]
        # y[t] = silu(sum_j w[:, j] * joined[t + j]): the K windows gathered at once, [B, T, K, C]
        if ("conv_windows", kernel) not in self.shared:   # the same indices for every layer
            self.shared[("conv_windows", kernel)] = self.node("Add", [
                self.node("Unsqueeze", [self._steps(), self.i64([1])])[0], self.i64([list(range(kernel))])])[0]
        windows = self.node("Gather", [joined, self.shared[("conv_windows", kernel)]], axis=1)[0]
        taps = self.initializer(conv_w_value, "taps", tensor=w.t().contiguous())                # [K, C]
        acc = self.node("ReduceSum", [self.node("Mul", [windows, taps])[0], self.i64([2])], keepdims=0)[0]
        y = self.node("Mul", [acc, self.node("Sigmoid", [acc])[0]], hint=f"L{a['layer']}.conv")[0]
        # new conv state: steps kept[b] .. kept[b] + K-2 of row b of concat(state, x)
        kept = self._x(node, 9) if len(node.inputs) > 9 else lengths      # commit (see insert-state)
        if ("conv_state", kernel, kept) not in self.shared:   # the same steps for every layer
            ends = self.node("Add", [self.node("Unsqueeze", [kept, self.i64([1])])[0],
                                     self.i64([list(range(kernel - 1))])])[0]                  # [B, K-1]
            self.shared[("conv_state", kernel, kept)] = self.node("Unsqueeze", [ends, self.i64([2])])[0]
        new_conv = self.node("GatherND", [joined, self.shared[("conv_state", kernel, kept)]],
                             batch_dims=1)[0]                                                  # [B, K-1, C]
        # q and k share one L2 norm: l2(x) = x·rsqrt(Σx² + ε) is RMSNormalization over dk with
        # epsilon ε/dk and scale dk^-0.5 (sqrt(Σx²/dk + ε/dk) = sqrt(Σx² + ε)·dk^-0.5; the /dk is
        # exact for a power-of-two dk), one node over [B, T, 2·nk, dk] instead of seven per tensor.
        qk, v = self.node("Split", [y, self.i64([2 * nk * dk, nv * dv])], n_out=2, axis=2)
        qk = self.node("Reshape", [qk, self.i64([0, 0, 2 * nk, dk])])[0]
        qk = self.node("RMSNormalization", [qk, self.f32(np.full(dk, dk ** -0.5))], axis=-1,
                       epsilon=1e-6 / dk)[0]
        if nv != nk:  # the reference repeats k heads interleaved (head h of v uses k head h // (nv/nk))
            qk = self.node("Expand", [self.node("Unsqueeze", [qk, self.i64([3])])[0],
                                      self.i64([1, 1, 1, nv // nk, 1])])[0]
        qk = self.node("Reshape", [qk, self.i64([0, 0, 2 * nv * dk])])[0]
        q, k = self.node("Split", [qk, self.i64([nv * dk, nv * dk])], n_out=2, axis=2)
        neg_a = self.initializer(a_log, "neg_exp", tensor=-self.evaluate(a_log).float().exp())
        dtb = self.name(dt_bias)
        g, beta = self.node("LinearAttentionGate", [a_in, dtb, neg_a, b_in], n_out=2, domain=MS_DOMAIN)
        zero = self.f32(np.zeros((1,), np.float32))
        first = self._steps_below(kept)
        o, new_state = self.node("LinearAttention", [q, k, v, state, self.node("Where", [first, g, zero])[0],
                                                     self.node("Where", [first, beta, zero])[0]],
                                 n_out=2, domain=MS_DOMAIN, q_num_heads=nv, kv_num_heads=nv, update_rule="gated_delta",
                                 scale=float(dk) ** -0.5, hint=f"L{a['layer']}.gdn")
        if kept != lengths:
            o = self._uncommitted_outputs(o, q, k, v, new_state, g, beta, kept, lengths, nv, dk, a["layer"])
        batch, steps = node.inputs[0].type.shape[:2]
        self.known_shapes[o] = (batch, steps, nv * dv)
        o = self.node("Reshape", [o, self.i64([0, 0, nv, dv])])[0]
        return [o, new_conv, new_state]

    # ---- lowered MoE pieces (lower-moe) ----------------------------------------------------------

    def _argsort_unique(self, keys: str) -> str:
        """Ascending argsort of a 1-D i64 tensor of distinct keys (TopK smallest over all of it)."""
        count = self.node("Shape", [keys])[0]
        return self.node("TopK", [keys, count], n_out=2, axis=0, largest=0, sorted=1)[1]

    def op_moe_sort(self, node):
        """Stable sort of the [N, k] expert ids: keys expert·(N·k) + slot are distinct, so any sort is stable."""
        experts = self._x(node)
        flat = self.node("Reshape", [experts, self.i64([-1])])[0]
        count = self.node("Shape", [flat])[0]
        slots = self.node("Range", [self.const(np.asarray(0, np.int64)),
                                    self.node("Squeeze", [count, self.i64([0])])[0],
                                    self.const(np.asarray(1, np.int64))])[0]
        keys = self.node("Add", [self.node("Mul", [flat, count])[0], slots])[0]
        order = self._argsort_unique(keys)
        sorted_experts = self.node("Gather", [flat, order], axis=0)[0]
        shape = self.node("Shape", [experts])[0]
        return [self.node("Reshape", [order, shape])[0], self.node("Reshape", [sorted_experts, shape])[0]]

    def op_moe_gather(self, node):
        x, order = self._x(node, 0), self._x(node, 1)
        k = node.inputs[1].type.shape[1]
        flat = self.node("Reshape", [order, self.i64([-1])])[0]
        token = self.node("Div", [flat, self.i64(k)])[0]
        rows = self.node("Gather", [x, token], axis=0)[0]
        return self.node("Reshape", [rows, self.i64([-1, k, node.inputs[0].type.shape[1]])])

    def op_grouped_linear(self, node):
        """Each slot's expert matrix is gathered and applied as a batched mat-vec: exact, with no
        data-dependent shapes; it reads k expert matrices per token, fine for decode and small
        prefills (a grouped GEMM kernel would be the fast path for long MoE prefills)."""
        rows, experts = self._x(node, 0), self._x(node, 2)
        w = self.name(node.inputs[1])                                   # [E, O, H]
        mats = self.node("Gather", [w, experts], axis=0)[0]             # [N, k, O, H]
        col = self.node("Unsqueeze", [rows, self.i64([-1])])[0]         # [N, k, H, 1]
        out = self.node("MatMul", [mats, col])[0]                       # [N, k, O, 1]
        return self.node("Squeeze", [out, self.i64([-1])])

    def op_moe_combine(self, node):
        out, order, weights = self._x(node, 0), self._x(node, 1), self._x(node, 2)
        h = node.inputs[0].type.shape[2]
        k = node.inputs[0].type.shape[1]
        flat_order = self.node("Reshape", [order, self.i64([-1])])[0]
        w = self.node("Gather", [self.node("Reshape", [weights, self.i64([-1])])[0], flat_order], axis=0)[0]
        weighted = self.node("Mul", [self.node("Reshape", [out, self.i64([-1, h])])[0],
                                     self.node("Unsqueeze", [w, self.i64([1])])[0]])[0]
        inverse = self._argsort_unique(flat_order)
        unsorted = self.node("Gather", [weighted, inverse], axis=0)[0]
        return self.node("ReduceSum", [self.node("Reshape", [unsorted, self.i64([-1, k, h])])[0], self.i64([1])],
                         keepdims=0)

    # ---- un-lowered ops: name the pass that should have run --------------------------------------

    def op_causal_conv1d(self, node):
        raise EmitError(f"%{node.outputs[0].name}: a bare causal_conv1d reached the ONNX backend; the "
                        f"pipeline must run fuse-deltanet before insert-state")

    op_gated_delta_rule = op_causal_conv1d

    def op_moe(self, node):
        raise EmitError(f"%{node.outputs[0].name}: an un-lowered moe op reached the ONNX backend; add lower-moe "
                        f"to the pipeline")


def _np_dtype(dtype: str):
    return {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i64": np.int64, "i32": np.int32,
            "bool": np.bool_, "i8": np.int8, "u8": np.uint8}[dtype]


def _signature(info) -> str:
    """'name dtype[dims]' of an ONNX value info, as the manifest's interface lists them."""
    t = info.type.tensor_type
    dtype = next(k for k, v in ONNX_DTYPE.items() if v == t.elem_type)
    return f"{info.name} {dtype}[{','.join(d.dim_param or str(d.dim_value) for d in t.shape.dim)}]"


def emit_onnx(graph: Graph, weights, out_dir: Path, **kwargs) -> EmitResult:
    return OnnxEmitter(graph, weights, out_dir, **kwargs).emit()


__all__ = ["EmitError", "EmitResult", "OnnxEmitter", "StateSpec", "emit_onnx", "OPSET"]
