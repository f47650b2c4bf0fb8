"""Layout clean-up on the emitted ONNX node list: drop the Reshapes and Transposes that cancel.

The emitter lowers one IR op at a time, so the layout glue of neighbouring ops meets in pairs that
undo each other: the IR's attention works on [B, h, T, hd], GroupQueryAttention, RotaryEmbedding
and LinearAttention on packed [B, T, h·hd], per-head norms on [B, T, h, hd]. ORT's optimizer cancels
Transpose pairs but leaves the Reshape chains they separated, and each Reshape is still a kernel
launch (~15 µs on the 2-core CPU). Three rewrites, repeated until none applies:

  Transpose(Transpose(x, p), q)  ->  Transpose(x, p∘q), or x when that is the identity
  Reshape(Reshape(x, s), t)      ->  Reshape(x, t)   when t's copied dims (0s) are x's own
  Reshape(x, t)                  ->  x               when t is x's shape

then nodes whose outputs nobody reads are dropped. The shapes are symbolic (the IR's "B", "T",
products like "B*T"): known for every tensor that carries an IR value and propagated through the
ops below; a tensor of unknown shape is never rewritten. Graph outputs keep their producers.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

Dim = tuple[int, tuple[str, ...]]      # coefficient and sorted symbol factors: "2*B*T" -> (2, ("B", "T"))

SAME_SHAPE = {  # output 0 has input 0's shape
    "Sigmoid", "QuickGelu", "Cast", "RMSNormalization", "RotaryEmbedding",
    "SkipSimplifiedLayerNormalization", "Identity", "Neg", "Exp", "Sqrt", "Reciprocal",
}


def dim(d) -> Dim:
    if isinstance(d, (int, np.integer)):
        return int(d), ()
    coef, symbols = 1, []
    for factor in str(d).split("*"):
        if factor.isdigit():
            coef *= int(factor)
        else:
            symbols.append(factor)
    return coef, tuple(sorted(symbols))


def _mul(a: Dim, b: Dim) -> Dim:
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _div(a: Dim, b: Dim) -> Dim | None:
    left = Counter(a[1])
    left.subtract(b[1])
    if b[0] == 0 or a[0] % b[0] or any(v < 0 for v in left.values()):
        return None
    return a[0] // b[0], tuple(sorted(left.elements()))


class Simplifier:
    def __init__(self, nodes, shapes: dict[str, tuple], shape_tensors: dict[str, tuple],
                 constants: dict[str, np.ndarray], outputs: set[str]):
        self.nodes = list(nodes)
        self.shapes = {name: tuple(dim(d) for d in dims) for name, dims in shapes.items()}
        self.shape_tensors = {name: tuple(dim(d) for d in dims) for name, dims in shape_tensors.items()}
        self.constants = constants
        self.outputs = outputs

    # ---- shapes --------------------------------------------------------------------------------

    def target(self, node) -> tuple[Dim | None, ...] | None:
        """The dims a Reshape asks for: 0 copies the input's dim, -1 is solved when it can be."""
        name, x = node.input[1], self.shapes.get(node.input[0])
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            return None
        if name in self.shape_tensors:
            return self.shape_tensors[name]
        if name not in self.constants:
            return None
        values = self.constants[name].tolist()
        dims: list[Dim | None] = [
            (x[i] if x is not None and i < len(x) else None) if v == 0 else None if v == -1 else dim(v)
            for i, v in enumerate(values)]
        if -1 in values and x is not None:
            known = [d for d, v in zip(dims, values) if v != -1]
            if all(d is not None for d in known):
                dims[values.index(-1)] = _div(prod_dims(x), prod_dims(known))
        return tuple(dims)

    def infer(self, node) -> None:
        """Record the output shapes of one node when they follow from its inputs."""
        x = self.shapes.get(node.input[0]) if node.input else None
        out = node.output
        if node.op_type == "Reshape":
            t = self.target(node)
            if t is not None and all(d is not None for d in t):
                self.shapes.setdefault(out[0], t)
        elif x is None:
            return
        elif node.op_type == "Transpose":
            perm = _perm(node) or range(len(x) - 1, -1, -1)
            self.shapes.setdefault(out[0], tuple(x[p] for p in perm))
        elif node.op_type in SAME_SHAPE:
            self.shapes.setdefault(out[0], x)
            if node.op_type == "SkipSimplifiedLayerNormalization" and len(out) > 3 and out[3]:
                self.shapes.setdefault(out[3], x)
        elif node.op_type == "Split" and len(node.input) > 1 and node.input[1] in self.constants:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(x)
            for name, size in zip(out, self.constants[node.input[1]].tolist()):
                self.shapes.setdefault(name, x[:axis] + (dim(size),) + x[axis + 1:])
        elif node.op_type in ("Add", "Sub", "Mul", "Div") and self.shapes.get(node.input[1]) == x:
            self.shapes.setdefault(out[0], x)
        elif node.op_type == "GroupQueryAttention":
            self.shapes.setdefault(out[0], x)
        elif node.op_type == "LinearAttention" and node.input[2] in self.shapes:
            self.shapes.setdefault(out[0], self.shapes[node.input[2]])

    # ---- rewrites ------------------------------------------------------------------------------

    def run(self) -> list:
        while self._sweep():
            self.nodes = self._prune()
        return self._prune()

    def _sweep(self) -> bool:
        producer = {o: n for n in self.nodes for o in n.output}
        alias: dict[str, str] = {}
        changed = False
        for node in self.nodes:
            for inner in [node, *subgraph_nodes(node)]:   # an If branch reads outer tensors by name
                for i, name in enumerate(inner.input):
                    while name in alias:
                        name = alias[name]
                    inner.input[i] = name
            self.infer(node)
            keep = node.output[0] in self.outputs
            inner = producer.get(node.input[0]) if node.input else None
            if node.op_type == "Transpose" and inner is not None and inner.op_type == "Transpose" \
                    and _perm(node) and _perm(inner):
                p, q = _perm(inner), _perm(node)
                perm = [p[i] for i in q]
                node.input[0] = inner.input[0]
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("perm", perm))
                if perm == sorted(perm) and not keep:
                    alias[node.output[0]] = node.input[0]
                changed = True
            elif node.op_type == "Reshape":
                if inner is not None and inner.op_type == "Reshape" and self._copies_survive(node, inner):
                    node.input[0] = inner.input[0]
                    changed = True
                x, t = self.shapes.get(node.input[0]), self.target(node)
                if not keep and x is not None and t is not None and tuple(t) == x:
                    alias[node.output[0]] = node.input[0]
                    changed = True
        return changed

    def _copies_survive(self, outer, inner) -> bool:
        """Whether Reshape(x, t) means what Reshape(Reshape(x, s), t) did: t's 0 entries copy dims
        of the middle tensor, so those dims of x must be the same."""
        t = outer.input[1]
        if t in self.shape_tensors:
            return True
        if t not in self.constants:
            return False
        zeros = [i for i, v in enumerate(self.constants[t].tolist()) if v == 0]
        if not zeros:
            return True
        x, middle = self.shapes.get(inner.input[0]), self.shapes.get(inner.output[0])
        return x is not None and middle is not None and \
            all(i < len(x) and i < len(middle) and x[i] == middle[i] for i in zeros)

    def _prune(self) -> list:
        needed = set(self.outputs)
        kept = []
        for node in reversed(self.nodes):
            if any(o and o in needed for o in node.output):
                kept.append(node)
                needed.update(i for inner in [node, *subgraph_nodes(node)] for i in inner.input if i)
        return kept[::-1]


def subgraph_nodes(node) -> list:
    """The nodes of a control-flow node's branches (If / Loop bodies), nested ones included."""
    found = []
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in graph.node:
                found += [inner, *subgraph_nodes(inner)]
    return found


def _perm(node) -> list[int] | None:
    """A Transpose's perm, None when it relies on the default (reverse) order."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def prod_dims(dims) -> Dim:
    out = (1, ())
    for d in dims:
        out = _mul(out, d)
    return out


def simplify(nodes, shapes, shape_tensors, constants, outputs) -> list:
    """The node list with cancelling layout ops removed (see the module docstring)."""
    return Simplifier(nodes, shapes, shape_tensors, constants, outputs).run()


__all__ = ["simplify", "dim", "subgraph_nodes"]
