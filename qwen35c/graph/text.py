"""The IR's text form: MLIR-like, readable, and round-tripping exactly (`parse(print(g))` prints
the same text).

    graph @tiny(%x: f32[B, T, 64], %s: f32[B, 8, 3] {state = "layers.0.conv"}) -> (f32[B, T, 64], f32[B, 8, 3] {state = "layers.0.conv"})
        attributes {preset = "tiny"} {
      %w = weight {name = "model.norm.weight"} : f32[64]
      %y = rms_norm(%x, %w) {eps = 1e-06, offset = 1.0} : f32[B, T, 64]
      %a, %b = split(%y) {dim = 2, sizes = [32, 32]} : f32[B, T, 32], f32[B, T, 32]
      return %y, %s
    }

Attribute values: ints (`3`), floats (always with `.`/`e`, or `inf`, `-inf`, `nan`), `true`,
`false`, `none`, JSON strings, lists `[..]`, dicts `{key = value}` and tensors
`dense<f32[2]>[1.0, 2.0]` (flattened, for `constant` nodes). `#` starts a comment.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from qwen35c.graph.ir import DTYPES, Graph, IRError, Node, TensorType, Value


class ParseError(IRError):
    """The text is not a valid graph; the message names the line and column."""


# ---- printing ----------------------------------------------------------------------------------

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def format_attr(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_format_key(k)} = {format_attr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.Tensor):
        t = TensorType.of(value)
        flat = value.detach().reshape(-1)
        if t.dtype in ("bool",):
            items = ["true" if bool(x) else "false" for x in flat.tolist()]
        elif value.dtype.is_floating_point:
            items = [format_float(x) for x in flat.double().tolist()]
        else:
            items = [str(int(x)) for x in flat.tolist()]
        return f"dense<{t}>[{', '.join(items)}]"
    raise IRError(f"attribute value {value!r} of type {type(value).__name__} cannot be printed")


def _format_key(key: str) -> str:
    return key if _IDENT_RE.match(key) else json.dumps(key)


def format_attrs(attrs: dict[str, Any]) -> str:
    return format_attr(attrs) if attrs else ""


def _port(value_type: TensorType, attrs: dict[str, Any]) -> str:
    return f"{value_type} {format_attr(attrs)}" if attrs else str(value_type)


def print_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    ins = ", ".join(f"%{v.name}" for v in node.inputs)
    call = f"{node.op}({ins})" if node.inputs else node.op
    attrs = f" {format_attrs(node.attrs)}" if node.attrs else ""
    types = ", ".join(str(v.type) for v in node.outputs)
    return f"{outs} = {call}{attrs} : {types}"


def print_graph(graph: Graph) -> str:
    ins = ", ".join(f"%{v.name}: {_port(v.type, a)}" for v, a in zip(graph.inputs, graph.input_attrs))
    outs = ", ".join(_port(v.type, a) for v, a in zip(graph.outputs, graph.output_attrs))
    lines = [f"graph @{graph.name}({ins}) -> ({outs})"]
    if graph.metadata:
        lines.append(f"    attributes {format_attr(graph.metadata)} {{")
    else:
        lines[0] += " {"
    lines.extend("  " + print_node(node) for node in graph.nodes)
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- parsing -----------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<value>%[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<symref>@[A-Za-z_][A-Za-z0-9_.\-]*)
  | (?P<arrow>->)
  | (?P<number>-?(?:\d+\.\d*|\d*\.\d+|\d+)(?:[eE][+-]?\d+)?|-inf\b)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.\-]*)
  | (?P<punct>[()\[\]{}<>,=:*])
""", re.VERBOSE)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if not m:
                raise self._error(f"unexpected character {text[pos]!r}", pos)
            kind = m.lastgroup
            if kind != "ws":
                self.tokens.append((kind, m.group(), pos))
            pos = m.end()
        self.i = 0

    # -- token helpers
    def _error(self, message: str, pos: int | None = None) -> ParseError:
        if pos is None:
            pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return ParseError(f"line {line}, column {col}: {message}")

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        if j >= len(self.tokens):
            return ("eof", "")
        return self.tokens[j][:2]

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "eof":
            raise self._error("unexpected end of text")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        kind, tok = self.next()
        if tok != text:
            self.i -= 1
            raise self._error(f"expected '{text}', got '{tok}'")

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text and self.peek()[0] != "string":
            self.i += 1
            return True
        return False

    def expect_kind(self, kind: str, what: str) -> str:
        k, tok = self.next()
        if k != kind:
            self.i -= 1
            raise self._error(f"expected {what}, got '{tok}'")
        return tok

    # -- grammar
    def parse_type(self) -> TensorType:
        dtype = self.expect_kind("ident", "a dtype")
        if dtype not in DTYPES:
            self.i -= 1
            raise self._error(f"unknown dtype '{dtype}'")
        self.expect("[")
        dims: list[int | str] = []
        while not self.accept("]"):
            if dims:
                self.expect(",")
            kind, tok = self.next()
            if kind == "number" and re.fullmatch(r"\d+", tok):
                dims.append(int(tok))
            elif kind == "ident":
                while self.peek() == ("punct", "*"):
                    self.next()
                    tok += "*" + self.expect_kind("ident", "a symbol after '*'")
                dims.append(tok)
            else:
                self.i -= 1
                raise self._error(f"expected a dim (int or symbol), got '{tok}'")
        return TensorType(dtype, tuple(dims))

    def parse_attr(self) -> Any:
        kind, tok = self.next()
        if kind == "string":
            return json.loads(tok)
        if kind == "number":
            if tok == "-inf":
                return -math.inf
            if re.fullmatch(r"-?\d+", tok):
                return int(tok)
            return float(tok)
        if kind == "ident":
            constants = {"true": True, "false": False, "none": None, "inf": math.inf,
                         "nan": math.nan}
            if tok in constants:
                return constants[tok]
            if tok == "dense":
                return self._parse_dense()
            self.i -= 1
            raise self._error(f"unexpected word '{tok}' in an attribute value")
        if tok == "[":
            items = []
            while not self.accept("]"):
                if items:
                    self.expect(",")
                items.append(self.parse_attr())
            return items
        if tok == "{":
            self.i -= 1
            return self.parse_attr_dict()
        self.i -= 1
        raise self._error(f"unexpected '{tok}' in an attribute value")

    def _parse_dense(self) -> torch.Tensor:
        self.expect("<")
        t = self.parse_type()
        if not t.is_static:
            raise self._error(f"a dense tensor needs a static type, got {t}")
        self.expect(">")
        items = self.parse_attr()
        if not isinstance(items, list):
            raise self._error("expected a flat list after dense<...>")
        numel = math.prod(t.shape)
        if len(items) != numel:
            raise self._error(f"dense<{t}> needs {numel} values, got {len(items)}")
        if t.dtype in ("bf16", "f16", "f8e4m3"):
            data = torch.tensor(items, dtype=torch.float64).to(t.torch_dtype)
        else:
            data = torch.tensor(items, dtype=t.torch_dtype)
        return data.reshape(t.shape)

    def parse_attr_dict(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        while not self.accept("}"):
            if out:
                self.expect(",")
            kind, key = self.next()
            if kind == "string":
                key = json.loads(key)
            elif kind != "ident":
                self.i -= 1
                raise self._error(f"expected an attribute name, got '{key}'")
            if key in out:
                self.i -= 1
                raise self._error(f"attribute '{key}' given twice")
            self.expect("=")
            out[key] = self.parse_attr()
        return out

    def _maybe_attrs(self) -> dict[str, Any]:
        return self.parse_attr_dict() if self.peek()[1] == "{" and self.peek()[0] == "punct" else {}

    def parse_graph(self) -> Graph:
        self.expect("graph")
        name = self.expect_kind("symref", "a graph name '@name'")[1:]
        graph = Graph(name=name)
        self.expect("(")
        while not self.accept(")"):
            if graph.inputs:
                self.expect(",")
            vname = self.expect_kind("value", "an input '%name'")[1:]
            self.expect(":")
            vtype = self.parse_type()
            attrs = self._maybe_attrs()
            try:
                graph.add_input(vname, vtype, attrs)
            except IRError as err:
                raise self._error(str(err)) from None
        self.expect("->")
        self.expect("(")
        out_ports: list[tuple[TensorType, dict[str, Any]]] = []
        while not self.accept(")"):
            if out_ports:
                self.expect(",")
            out_ports.append((self.parse_type(), self._maybe_attrs()))
        if self.accept("attributes"):
            graph.metadata = self.parse_attr_dict()
        self.expect("{")
        values: dict[str, Value] = {v.name: v for v in graph.inputs}
        while not self.accept("return"):
            self._parse_node(graph, values)
        returned: list[Value] = []
        while self.peek()[0] == "value":
            vname = self.next()[1][1:]
            if vname not in values:
                self.i -= 1
                raise self._error(f"return of undefined value %{vname}")
            returned.append(values[vname])
            if not self.accept(","):
                break
        self.expect("}")
        if self.peek()[0] != "eof":
            raise self._error(f"unexpected '{self.peek()[1]}' after the graph")
        if len(returned) != len(out_ports):
            raise self._error(f"the signature declares {len(out_ports)} outputs but return has "
                              f"{len(returned)}")
        for value, (port_type, attrs) in zip(returned, out_ports):
            if value.type != port_type:
                raise self._error(f"output %{value.name} is {value.type} but the signature says "
                                  f"{port_type}")
            graph.add_output(value, attrs)
        return graph

    def _parse_node(self, graph: Graph, values: dict[str, Value]) -> None:
        names = [self.expect_kind("value", "a result '%name' or 'return'")[1:]]
        while self.accept(","):
            names.append(self.expect_kind("value", "a result '%name'")[1:])
        self.expect("=")
        op = self.expect_kind("ident", "an op name")
        inputs: list[Value] = []
        if self.peek() == ("punct", "("):
            self.next()
            while not self.accept(")"):
                if inputs:
                    self.expect(",")
                vname = self.expect_kind("value", "an operand '%name'")[1:]
                if vname not in values:
                    self.i -= 1
                    raise self._error(f"use of undefined value %{vname}")
                inputs.append(values[vname])
        attrs = self._maybe_attrs()
        self.expect(":")
        types = [self.parse_type()]
        while self.accept(","):
            types.append(self.parse_type())
        if len(types) != len(names):
            raise self._error(f"{len(names)} results but {len(types)} types")
        for vname in names:
            if vname in values:
                raise self._error(f"value %{vname} is defined twice")
        node = graph.add_node(op, inputs, types, attrs, names=names)
        for out in node.outputs:
            values[out.name] = out


def parse_graph(text: str) -> Graph:
    """Parse the text form into a Graph (the inverse of `print_graph`)."""
    return _Parser(text).parse_graph()


__all__ = ["ParseError", "format_attr", "parse_graph", "print_graph", "print_node"]
