"""The serialized form: `graph.json` (structure) plus `constants.safetensors` (constant tensors).

Weights are never written: `weight` nodes keep only their checkpoint name. Constant tensors are
stored in the safetensors file under a key and referenced from JSON as `{"$tensor": key}`.
Non-finite floats are stored as `{"$float": "inf" | "-inf" | "nan"}` because JSON has none.
`load(save(g))` prints exactly like `g`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qwen35c.graph.ir import Graph, IRError, TensorType

FORMAT = "qwen35c-ir"
VERSION = 1
GRAPH_FILE = "graph.json"
CONSTANTS_FILE = "constants.safetensors"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.Tensor):
        key = f"c{len(tensors)}"
        tensors[key] = value.detach().contiguous().cpu()
        return {"$tensor": key}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v, tensors) for k, v in value.items()}
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        if set(value) == {"$float"}:
            return float(value["$float"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _type(t: TensorType) -> dict[str, Any]:
    return {"dtype": t.dtype, "shape": list(t.shape)}


def to_json(graph: Graph) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document and the constant tensors it references."""
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "name": graph.name,
        "metadata": _encode(graph.metadata, tensors),
        "inputs": [{"name": v.name, **_type(v.type), "attrs": _encode(a, tensors)}
                   for v, a in zip(graph.inputs, graph.input_attrs)],
        "nodes": [{"op": n.op, "inputs": [v.name for v in n.inputs],
                   "outputs": [{"name": v.name, **_type(v.type)} for v in n.outputs],
                   "attrs": _encode(n.attrs, tensors)} for n in graph.nodes],
        "outputs": [{"name": v.name, "attrs": _encode(a, tensors)}
                    for v, a in zip(graph.outputs, graph.output_attrs)],
    }
    return doc, tensors


def from_json(doc: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Graph:
    tensors = tensors or {}
    if doc.get("format") != FORMAT:
        raise IRError(f"not a qwen35c IR document (format={doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise IRError(f"IR document version {doc.get('version')} is not supported (expected {VERSION})")
    graph = Graph(name=doc["name"], metadata=_decode(doc.get("metadata", {}), tensors))
    values = {}
    for port in doc["inputs"]:
        values[port["name"]] = graph.add_input(port["name"], TensorType(port["dtype"], tuple(port["shape"])),
                                               _decode(port.get("attrs", {}), tensors))
    for entry in doc["nodes"]:
        try:
            inputs = [values[name] for name in entry["inputs"]]
        except KeyError as err:
            raise IRError(f"node {entry['op']} uses undefined value %{err.args[0]}") from None
        node = graph.add_node(entry["op"], inputs,
                              [TensorType(o["dtype"], tuple(o["shape"])) for o in entry["outputs"]],
                              _decode(entry.get("attrs", {}), tensors),
                              names=[o["name"] for o in entry["outputs"]])
        for out in node.outputs:
            values[out.name] = out
    for port in doc["outputs"]:
        if port["name"] not in values:
            raise IRError(f"graph output %{port['name']} is undefined")
        graph.add_output(values[port["name"]], _decode(port.get("attrs", {}), tensors))
    return graph


def save(graph: Graph, directory: str | Path) -> Path:
    """Write graph.json (+ constants.safetensors when there are constants) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc, tensors = to_json(graph)
    (directory / GRAPH_FILE).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    constants = directory / CONSTANTS_FILE
    if tensors:
        save_file(tensors, str(constants))
    elif constants.exists():
        constants.unlink()
    return directory


def load(directory: str | Path) -> Graph:
    directory = Path(directory)
    path = directory / GRAPH_FILE
    if not path.exists():
        raise IRError(f"{path}: no serialized graph here")
    doc = json.loads(path.read_text())
    constants = directory / CONSTANTS_FILE
    tensors = load_file(str(constants)) if constants.exists() else {}
    return from_json(doc, tensors)


__all__ = ["from_json", "load", "save", "to_json"]
