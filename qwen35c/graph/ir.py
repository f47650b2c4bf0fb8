"""The qwen35c IR: a small typed SSA graph of high-level ops.

A `Graph` is an ordered list of `Node`s (always topologically sorted), the graph inputs and
outputs, and a metadata dict. Every `Value` has a `TensorType`: a dtype name and a shape whose
dims are ints or symbols (`"B"`, `"T"`, `"S"`), so one graph serves every batch and sequence length.

Weights are never copied into the graph: a `weight` node names a checkpoint tensor
(`{name = "model.layers.0.mlp.up_proj.weight"}`) and declares the type the graph computes in; the
interpreter asks a callable for the tensor when the node runs. Small constants (the only tensors a
graph may hold) live in the `value` attribute of a `constant` node.

State is explicit: a graph input whose attributes carry `state = "<key>"` is paired with the graph
output carrying the same key (the verifier checks the pairing). Attribute values are plain data:
int, float, bool, str, None, lists and dicts of those, and (for `constant`) a torch tensor.

The graph is mutable; passes edit it in place through the small API below (`add_node`,
`replace_all_uses`, `remove_nodes`, ...). Names are unique; `fresh_name` makes new ones.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

Dim = int | str

DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f8e4m3": torch.float8_e4m3fn,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
}
TORCH_TO_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"f64", "f32", "f16", "bf16", "f8e4m3"})
INT_DTYPES = frozenset({"i64", "i32", "i16", "i8", "u8"})

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# a symbolic dim is a symbol or a product of symbols in sorted order ("B*T" for flattened tokens)
_SYMBOL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\*[A-Za-z_][A-Za-z0-9_]*)*$")


class IRError(ValueError):
    """A malformed graph edit (bad name, unknown value, broken order)."""


@dataclass(frozen=True)
class TensorType:
    """dtype name (a key of DTYPES) and shape; a dim is an int or a symbol name."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype '{self.dtype}', expected one of {', '.join(DTYPES)}")
        shape = tuple(self.shape)
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise IRError(f"dim {dim!r} must be an int or a symbol name")
            if isinstance(dim, int) and dim < 0:
                raise IRError(f"dim {dim} is negative")
            if isinstance(dim, str) and (not _SYMBOL_RE.match(dim)
                                         or dim.split("*") != sorted(dim.split("*"))):
                raise IRError(f"symbolic dim '{dim}' is not a symbol or a sorted product of symbols")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape)

    def with_shape(self, shape: Sequence[Dim]) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(tensor: torch.Tensor) -> "TensorType":
        return TensorType(TORCH_TO_DTYPE[tensor.dtype], tuple(int(d) for d in tensor.shape))


class Value:
    """An SSA value: produced by one node (or a graph input), typed, named uniquely."""

    __slots__ = ("name", "type", "producer")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None):
        self.name = name
        self.type = type
        self.producer = producer

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.type.shape

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One op application: `%out0, %out1 = op(%in0, %in1) {attr = ...}`."""

    __slots__ = ("op", "inputs", "outputs", "attrs")

    def __init__(self, op: str, inputs: list[Value], outputs: list[Value], attrs: dict[str, Any]):
        self.op = op
        self.inputs = inputs
        self.outputs = outputs
        self.attrs = attrs

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRError(f"node {self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def __repr__(self) -> str:
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        ins = ", ".join(f"%{v.name}" for v in self.inputs)
        return f"<{outs} = {self.op}({ins})>"


@dataclass
class Graph:
    """Ordered nodes, typed inputs/outputs with per-port attributes, and free-form metadata."""

    name: str = "main"
    inputs: list[Value] = field(default_factory=list)
    input_attrs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    output_attrs: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set, repr=False)
    _counter: int = field(default=0, repr=False)

    # ---- names -------------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = re.sub(r"[^A-Za-z0-9_.]", "_", hint) or "v"
        if not re.match(r"[A-Za-z_]", hint):
            hint = "v" + hint
        if hint not in self._names:
            return hint
        while True:
            self._counter += 1
            name = f"{hint}_{self._counter}"
            if name not in self._names:
                return name

    def _claim(self, name: str) -> None:
        if not _NAME_RE.match(name):
            raise IRError(f"value name '{name}' is not an identifier")
        if name in self._names:
            raise IRError(f"value name '%{name}' is defined twice")
        self._names.add(name)

    # ---- building ----------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType, attrs: dict[str, Any] | None = None) -> Value:
        self._claim(name)
        value = Value(name, type)
        self.inputs.append(value)
        self.input_attrs.append(dict(attrs or {}))
        return value

    def add_output(self, value: Value, attrs: dict[str, Any] | None = None) -> None:
        self.outputs.append(value)
        self.output_attrs.append(dict(attrs or {}))

    def add_node(self, op: str, inputs: Sequence[Value], output_types: Sequence[TensorType],
                 attrs: dict[str, Any] | None = None, names: Sequence[str] | None = None,
                 before: Node | None = None, after: Node | None = None) -> Node:
        """Create a node; it goes at the end, or just before `before` / just after `after`."""
        outputs = []
        for i, out_type in enumerate(output_types):
            name = names[i] if names else self.fresh_name(op)
            if names:
                name = self.fresh_name(name) if name in self._names else name
            self._claim(name)
            outputs.append(Value(name, out_type))
        node = Node(op, list(inputs), outputs, dict(attrs or {}))
        for out in outputs:
            out.producer = node
        if before is not None:
            self.nodes.insert(self._index(before), node)
        elif after is not None:
            self.nodes.insert(self._index(after) + 1, node)
        else:
            self.nodes.append(node)
        return node

    def _index(self, node: Node) -> int:
        for i, candidate in enumerate(self.nodes):
            if candidate is node:
                return i
        raise IRError(f"node {node!r} is not in graph @{self.name}")

    def rename(self, value: Value, name: str) -> None:
        if name == value.name:
            return
        self._claim(name)
        self._names.discard(value.name)
        value.name = name

    # ---- editing -----------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value, *, in_outputs: bool = True) -> int:
        """Point every use of `old` at `new`; returns the number of uses rewritten."""
        count = 0
        for node in self.nodes:
            for i, value in enumerate(node.inputs):
                if value is old:
                    node.inputs[i] = new
                    count += 1
        if in_outputs:
            for i, value in enumerate(self.outputs):
                if value is old:
                    self.outputs[i] = new
                    count += 1
        return count

    def remove_nodes(self, doomed: Iterable[Node]) -> None:
        ids = {id(n) for n in doomed}
        kept = []
        for node in self.nodes:
            if id(node) in ids:
                for out in node.outputs:
                    self._names.discard(out.name)
            else:
                kept.append(node)
        self.nodes = kept

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> the nodes that read it (graph outputs are not listed)."""
        table: dict[int, list[Node]] = {}
        for node in self.nodes:
            for value in node.inputs:
                table.setdefault(id(value), []).append(node)
        return table

    def values(self) -> dict[str, Value]:
        table = {v.name: v for v in self.inputs}
        for node in self.nodes:
            for out in node.outputs:
                table[out.name] = out
        return table

    def value(self, name: str) -> Value:
        try:
            return self.values()[name.lstrip("%")]
        except KeyError:
            raise IRError(f"no value %{name.lstrip('%')} in graph @{self.name}") from None

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def state_pairs(self) -> list[tuple[str, Value, Value | None]]:
        """(key, state input, paired state output or None) for every state input."""
        outs = {attrs.get("state"): v for v, attrs in zip(self.outputs, self.output_attrs)
                if attrs.get("state") is not None}
        return [(attrs["state"], v, outs.get(attrs["state"]))
                for v, attrs in zip(self.inputs, self.input_attrs) if attrs.get("state") is not None]

    def topo_sort(self) -> None:
        """Re-order nodes so that every value is defined before use (stable where possible)."""
        defined = {id(v) for v in self.inputs}
        pending = list(self.nodes)
        ordered: list[Node] = []
        while pending:
            progress = False
            rest = []
            for node in pending:
                if all(id(v) in defined for v in node.inputs):
                    ordered.append(node)
                    defined.update(id(o) for o in node.outputs)
                    progress = True
                else:
                    rest.append(node)
            if not progress:
                raise IRError(f"graph @{self.name} has a cycle or an undefined value near "
                              f"{rest[0]!r}")
            pending = rest
        self.nodes = ordered

    def clone(self) -> "Graph":
        """A deep copy (constants are copied too; weights are only names, so this is cheap)."""
        return copy.deepcopy(self)

    def __str__(self) -> str:
        from qwen35c.graph.text import print_graph

        return print_graph(self)
