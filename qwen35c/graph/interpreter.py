"""The interpreter: runs a graph with the reference implementation of every op.

Symbols (`B`, `T`, `S`, ...) are bound from the shapes of the graph inputs; weights come from a
callable `name -> tensor` (so they can stream from memory-mapped safetensors) and are cast to the
dtype the `weight` node declares. Values are dropped after their last use, so peak memory is about
one layer's activations plus whatever the weight callable keeps. With `check_types=True` (the
default) every result is checked against its declared type, which is how a wrong type rule or a
wrong implementation shows up at the node that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from qwen35c.graph.ir import Graph, Node, TensorType
from qwen35c.graph.ops import OPS, resolve_shape

WeightFn = Callable[[str], torch.Tensor]
Observer = Callable[[Node, list[torch.Tensor]], None]


class InterpreterError(RuntimeError):
    """The graph could not be run (missing input, shape mismatch, failing op)."""


def bind_symbols(graph: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    bindings: dict[str, int] = {}
    for value in graph.inputs:
        tensor = inputs[value.name]
        if tensor.dim() != value.type.rank:
            raise InterpreterError(f"input %{value.name} has shape {list(tensor.shape)}, declared "
                                   f"{value.type}")
        for dim, size in zip(value.type.shape, tensor.shape):
            if isinstance(dim, int):
                if dim != size:
                    raise InterpreterError(f"input %{value.name} has shape {list(tensor.shape)}, "
                                           f"declared {value.type}")
            elif bindings.setdefault(dim, int(size)) != size:
                raise InterpreterError(f"symbol {dim} is {bindings[dim]} elsewhere but {size} in "
                                       f"input %{value.name}")
    return bindings


def _check(value_type: TensorType, tensor: torch.Tensor, bindings: dict[str, int], what: str) -> None:
    if tensor.dtype != value_type.torch_dtype:
        raise InterpreterError(f"{what}: got dtype {tensor.dtype}, declared {value_type}")
    try:
        want = resolve_shape(value_type.shape, bindings)
    except Exception:
        return  # a symbol only bound inside the graph (none today); shape unchecked
    if list(tensor.shape) != want:
        raise InterpreterError(f"{what}: got shape {list(tensor.shape)}, declared {value_type} = {want}")


def run(graph: Graph, inputs: Mapping[str, torch.Tensor], weights: WeightFn | None = None,
        *, check_types: bool = True, observer: Observer | None = None) -> dict[str, torch.Tensor]:
    """Evaluate the graph; returns {output value name: tensor} in output order."""
    missing = [v.name for v in graph.inputs if v.name not in inputs]
    if missing:
        raise InterpreterError(f"missing graph input(s): {', '.join('%' + m for m in missing)}")
    bindings = bind_symbols(graph, inputs)
    env: dict[int, torch.Tensor] = {}
    for value in graph.inputs:
        tensor = inputs[value.name]
        if check_types:
            _check(value.type, tensor, bindings, f"input %{value.name}")
        env[id(value)] = tensor

    last_use: dict[int, int] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.inputs:
            last_use[id(value)] = index
    keep = {id(v) for v in graph.outputs}

    for index, node in enumerate(graph.nodes):
        if node.op == "weight":
            if weights is None:
                raise InterpreterError(f"graph needs weight '{node.attrs['name']}' but no weight "
                                       f"source was given")
            tensor = weights(node.attrs["name"])
            results = [tensor.to(node.output.type.torch_dtype)]
        else:
            spec = OPS.get(node.op)
            if spec is None:
                raise InterpreterError(f"no reference implementation for op '{node.op}'")
            args = [env[id(v)] for v in node.inputs]
            try:
                results = list(spec.impl(args, node.attrs, bindings))
            except Exception as err:
                raise InterpreterError(f"op {node.op} producing %{node.outputs[0].name} failed: "
                                       f"{type(err).__name__}: {err}") from err
        if len(results) != len(node.outputs):
            raise InterpreterError(f"op {node.op} returned {len(results)} results, declared "
                                   f"{len(node.outputs)}")
        for value, tensor in zip(node.outputs, results):
            if check_types:
                _check(value.type, tensor, bindings, f"{node.op} result %{value.name}")
            env[id(value)] = tensor
        if observer is not None:
            observer(node, results)
        for value in node.inputs:
            if last_use.get(id(value)) == index and id(value) not in keep:
                env.pop(id(value), None)
    return {value.name: env[id(value)] for value in graph.outputs}


class SafetensorsWeights:
    """A weight callable over one safetensors file or a directory of shards (memory-mapped).

    Names are looked up as given; `aliases` maps a graph weight name to a stored name when the
    checkpoint spells it differently.
    """

    def __init__(self, path: str | Path, aliases: Mapping[str, str] | None = None):
        from safetensors import safe_open

        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}
        self._aliases = dict(aliases or {})

    def __call__(self, name: str) -> torch.Tensor:
        stored = self._aliases.get(name, name)
        handle = self._where.get(stored)
        if handle is None:
            raise KeyError(f"weight '{name}' is not in the checkpoint")
        return handle.get_tensor(stored)


def random_weights_for(graph: Graph, seed: int = 0, scale: float = 0.1) -> WeightFn:
    """A weight callable giving seeded random tensors of each weight node's declared type."""
    types = {n.attrs["name"]: n.output.type for n in graph.nodes if n.op == "weight"}
    cache: dict[str, torch.Tensor] = {}

    def fetch(name: str) -> torch.Tensor:
        if name not in cache:
            t = types[name]
            if not t.is_static:
                raise InterpreterError(f"weight '{name}' has a symbolic type {t}")
            gen = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 7919 % 1_000_003)
            cache[name] = (torch.randn(t.shape, generator=gen) * scale).to(t.torch_dtype)
        return cache[name]

    return fetch




def random_inputs(graph: Graph, sizes: Mapping[str, int], seed: int = 0,
                  int_high: int = 8) -> dict[str, torch.Tensor]:
    """Seeded random graph inputs: floats ~ N(0, 1), ints in [0, int_high), bools random.

    `sizes` binds every symbol of the input types (`{"B": 2, "T": 5}`). An input whose attributes
    carry `high = n` draws ints in [0, n) instead.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for value, attrs in zip(graph.inputs, graph.input_attrs):
        shape = resolve_shape(value.type.shape, dict(sizes))
        dtype = value.type.torch_dtype
        if dtype == torch.bool:
            out[value.name] = torch.randint(0, 2, shape, generator=gen).bool()
        elif dtype.is_floating_point:
            out[value.name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            out[value.name] = torch.randint(0, attrs.get("high", int_high), shape, generator=gen,
                                            dtype=dtype)
    return out


__all__ = ["InterpreterError", "SafetensorsWeights", "bind_symbols", "random_inputs",
           "random_weights_for", "run"]
