"""The verifier: rules over the whole graph and over each node.

Graph rules: every value is defined once and before use (no dangling values), every graph output
is defined, graph names are unique, every state input (`state = "<key>"`) is paired with exactly
one state output of the same key and type.
Node rules: the op is known, its arity and required attributes are present, and its declared
output types equal what the op's type rule infers (`qwen35c.graph.ops`). `weight` nodes are
checked for a non-empty checkpoint name.

`verify(graph)` raises `VerificationError` naming the first failing node with its op, input types
and attributes; `collect_errors(graph)` returns every problem as text.
"""

from __future__ import annotations

from qwen35c.graph.ir import Graph, Node
from qwen35c.graph.ops import OPS, TypeRuleError, infer_types
from qwen35c.graph.text import format_attrs


class VerificationError(ValueError):
    """The graph breaks a verifier rule; the message names the node at fault."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)


def _describe(node: Node) -> str:
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    ins = ", ".join(f"%{v.name}: {v.type}" for v in node.inputs)
    attrs = f" {format_attrs(node.attrs)}" if node.attrs else ""
    if len(attrs) > 200:
        attrs = attrs[:200] + "...}"
    return f"{outs} = {node.op}({ins}){attrs}"


def _check_node(node: Node) -> str | None:
    if node.op not in OPS:
        return f"unknown op '{node.op}'"
    if node.op == "weight":
        if node.inputs:
            return "weight takes no inputs"
        if not isinstance(node.attrs.get("name"), str) or not node.attrs["name"]:
            return "weight needs a non-empty checkpoint 'name' attribute"
        if len(node.outputs) != 1:
            return "weight has exactly one result"
        return None
    try:
        inferred = infer_types(node.op, [v.type for v in node.inputs], node.attrs)
    except TypeRuleError as err:
        return str(err)
    declared = [v.type for v in node.outputs]
    if len(inferred) != len(declared):
        return f"declares {len(declared)} results, the op gives {len(inferred)}"
    for i, (want, got) in enumerate(zip(inferred, declared)):
        if want != got:
            return f"result {i} (%{node.outputs[i].name}) is declared {got}, the type rule gives {want}"
    return None


def collect_errors(graph: Graph) -> list[str]:
    errors: list[str] = []
    defined: set[int] = set()
    names: set[str] = set()

    def define(value, where: str) -> None:
        if value.name in names:
            errors.append(f"value %{value.name} is defined twice ({where})")
        names.add(value.name)
        defined.add(id(value))

    for value in graph.inputs:
        define(value, "graph input")
    for node in graph.nodes:
        for value in node.inputs:
            if id(value) not in defined:
                errors.append(f"node {_describe(node)}: operand %{value.name} is not defined before "
                              f"use (dangling value)")
        problem = _check_node(node)
        if problem:
            errors.append(f"node {_describe(node)}: {problem}")
        for out in node.outputs:
            if out.producer is not node:
                errors.append(f"value %{out.name} does not point back at its producer {node.op}")
            define(out, node.op)
    for value in graph.outputs:
        if id(value) not in defined:
            errors.append(f"graph output %{value.name} is not defined (dangling value)")
    if len(graph.input_attrs) != len(graph.inputs) or len(graph.output_attrs) != len(graph.outputs):
        errors.append("graph port attributes do not match the ports")
    errors.extend(_check_state(graph))
    return errors


def _check_state(graph: Graph) -> list[str]:
    errors = []
    in_keys: dict[str, int] = {}
    for attrs in graph.input_attrs:
        key = attrs.get("state")
        if key is not None:
            in_keys[key] = in_keys.get(key, 0) + 1
    out_keys: dict[str, int] = {}
    for attrs in graph.output_attrs:
        key = attrs.get("state")
        if key is not None:
            out_keys[key] = out_keys.get(key, 0) + 1
    for key, count in {**in_keys, **out_keys}.items():
        if in_keys.get(key, 0) > 1 or out_keys.get(key, 0) > 1:
            errors.append(f"state '{key}' appears more than once on one side")
    for key, state_in, state_out in graph.state_pairs():
        if state_out is None:
            errors.append(f"state input %{state_in.name} ('{key}') has no paired state output")
        elif state_out.type != state_in.type:
            errors.append(f"state '{key}': input %{state_in.name} is {state_in.type} but output "
                          f"%{state_out.name} is {state_out.type}")
    for key in out_keys:
        if key not in in_keys:
            errors.append(f"state output '{key}' has no paired state input")
    return errors


def verify(graph: Graph) -> None:
    errors = collect_errors(graph)
    if errors:
        raise VerificationError(errors)


__all__ = ["VerificationError", "collect_errors", "verify"]
