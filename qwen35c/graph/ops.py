"""The op table: for every op name, its type rule (used by the verifier) and its reference
implementation (used by the interpreter).

A type rule takes the input types and the attributes and returns the output types, or raises
`TypeRuleError` with a sentence saying what is wrong. An implementation takes torch tensors, the
attributes and the symbol bindings (`{"B": 2, "T": 5}`) and returns a list of tensors.
The model-level ops (causal_conv1d, gated_delta_rule, attention, moe) call the reference model's
`torch.ops.qwen35.*` custom ops, so the interpreter and the reference share one implementation.
Ops added by passes (the fused GDN, the lowered MoE pieces) register themselves here from their
pass module through `register_op`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from qwen35c.graph.ir import DTYPES, FLOAT_DTYPES, INT_DTYPES, Dim, TensorType


class TypeRuleError(ValueError):
    """An op's inputs or attributes do not fit its type rule."""


InferFn = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]
ImplFn = Callable[[list[torch.Tensor], dict[str, Any], dict[str, int]], list[torch.Tensor]]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn | None          # None: the node's declared output types are taken as they are
    impl: ImplFn
    arity: tuple[int, int]         # (min, max) number of inputs
    required_attrs: tuple[str, ...] = ()
    foldable: bool = True          # constant folding may evaluate it
    doc: str = ""


OPS: dict[str, OpDef] = {}


def register_op(name: str, infer: InferFn | None, impl: ImplFn, arity: int | tuple[int, int],
                required_attrs: Sequence[str] = (), foldable: bool = True, doc: str = "") -> OpDef:
    if isinstance(arity, int):
        arity = (arity, arity)
    op = OpDef(name, infer, impl, arity, tuple(required_attrs), foldable, doc)
    OPS[name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise TypeRuleError(f"unknown op '{name}'") from None


# ---- symbolic shape helpers ------------------------------------------------------------------

def fail(message: str) -> TypeRuleError:
    return TypeRuleError(message)


def same_dim(a: Dim, b: Dim) -> bool:
    return a == b


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        else:
            raise fail(f"shapes {list(a)} and {list(b)} do not broadcast (dim -{i}: {x} vs {y})")
    return tuple(reversed(out))


def _numel_key(shape: Sequence[Dim]) -> tuple[int, tuple[str, ...]]:
    """Product of a shape as (int factor, sorted symbols) so symbolic numels can be compared."""
    n, syms = 1, []
    for d in shape:
        if isinstance(d, int):
            n *= d
        else:
            syms.extend(d.split("*"))
    return n, tuple(sorted(syms))


def resolve_dim(dim: Dim, bindings: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    try:
        size = 1
        for factor in dim.split("*"):
            size *= bindings[factor]
        return size
    except KeyError as err:
        raise TypeRuleError(f"symbol {err.args[0]} is not bound") from None


def resolve_shape(shape: Sequence[Dim], bindings: dict[str, int]) -> list[int]:
    return [resolve_dim(d, bindings) for d in shape]


def _float(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise fail(f"{what} must be a float tensor, got {t.dtype}")


def _int(t: TensorType, what: str) -> None:
    if t.dtype not in INT_DTYPES:
        raise fail(f"{what} must be an integer tensor, got {t.dtype}")


def _same_dtype(types: Sequence[TensorType], what: str) -> None:
    dtypes = {t.dtype for t in types}
    if len(dtypes) > 1:
        raise fail(f"{what} must share one dtype, got {', '.join(t.dtype for t in types)}")


def _rank(t: TensorType, rank: int, what: str) -> None:
    if t.rank != rank:
        raise fail(f"{what} must have rank {rank}, got {t}")


def _dim_eq(a: Dim, b: Dim, what: str) -> None:
    if a != b:
        raise fail(f"{what}: {a} != {b}")


# ---- sources ----------------------------------------------------------------------------------

def _impl_unreachable(inputs, attrs, bindings):  # pragma: no cover - the interpreter handles these
    raise RuntimeError("weight nodes are evaluated by the interpreter's weight provider")


register_op("weight", None, _impl_unreachable, 0, ("name",), foldable=False,
            doc="%w = weight {name = \"<checkpoint tensor name>\"} : <compute type>")


def _infer_constant(types, attrs):
    value = attrs.get("value")
    if not isinstance(value, torch.Tensor):
        raise fail("constant needs a tensor 'value' attribute")
    return [TensorType.of(value)]


register_op("constant", _infer_constant, lambda i, a, b: [a["value"]], 0, ("value",),
            doc="%c = constant {value = dense<...>} : <type>")


def _infer_arange(types, attrs):
    return [TensorType(attrs.get("dtype", "i64"), (attrs["size"],))]


def _impl_arange(inputs, attrs, bindings):
    size = resolve_dim(attrs["size"], bindings)
    return [torch.arange(size, dtype=DTYPES[attrs.get("dtype", "i64")])]


register_op("arange", _infer_arange, _impl_arange, 0, ("size",),
            doc="%r = arange {size = T} : i64[T]; 0, 1, ..., size-1 (size may be a symbol)")


def _infer_full(types, attrs):
    value = attrs["value"]
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        raise fail("full: 'value' must be a number or a symbol")
    return [TensorType(attrs["dtype"], tuple(attrs["shape"]))]


def _impl_full(inputs, attrs, bindings):
    value = attrs["value"]
    if isinstance(value, str):
        value = resolve_dim(value, bindings)
    return [torch.full(resolve_shape(attrs["shape"], bindings), value, dtype=DTYPES[attrs["dtype"]])]


register_op("full", _infer_full, _impl_full, 0, ("shape", "value", "dtype"),
            doc="%z = full {shape = [\"B\", 4], value = 0, dtype = \"f32\"}; value may be a symbol (\"T\")")


# ---- elementwise --------------------------------------------------------------------------------

def _infer_unary(types, attrs):
    return [types[0]]


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sigmoid": torch.sigmoid,
    "silu": F.silu, "softplus": F.softplus, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt,
    "tanh": torch.tanh, "cos": torch.cos, "sin": torch.sin, "abs": torch.abs,
    "reciprocal": torch.reciprocal, "relu": torch.relu,
}
for _name, _fn in _UNARY.items():
    register_op(_name, _infer_unary, (lambda fn: lambda i, a, b: [fn(i[0])])(_fn), 1)


def _infer_binary(types, attrs):
    a, b = types
    if a.dtype != b.dtype:
        raise fail(f"operands must share one dtype, got {a.dtype} and {b.dtype}")
    return [TensorType(a.dtype, broadcast_shapes(a.shape, b.shape))]


_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "maximum": torch.maximum, "minimum": torch.minimum}
for _name, _fn in _BINARY.items():
    register_op(_name, _infer_binary, (lambda fn: lambda i, a, b: [fn(i[0], i[1])])(_fn), 2)


def _infer_compare(types, attrs):
    return [TensorType("bool", _infer_binary(types, attrs)[0].shape)]


_COMPARE = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq}
for _name, _fn in _COMPARE.items():
    register_op(_name, _infer_compare, (lambda fn: lambda i, a, b: [fn(i[0], i[1])])(_fn), 2)


def _infer_where(types, attrs):
    cond, x, y = types
    if cond.dtype != "bool":
        raise fail(f"where: condition must be bool, got {cond.dtype}")
    if x.dtype != y.dtype:
        raise fail(f"where: branches must share one dtype, got {x.dtype} and {y.dtype}")
    return [TensorType(x.dtype, broadcast_shapes(cond.shape, broadcast_shapes(x.shape, y.shape)))]


register_op("where", _infer_where, lambda i, a, b: [torch.where(i[0], i[1], i[2])], 3)


def _infer_pow(types, attrs):
    _float(types[0], "pow input")
    return [types[0]]


register_op("pow", _infer_pow, lambda i, a, b: [torch.pow(i[0], a["exponent"])], 1, ("exponent",))


def _infer_scalar(types, attrs):
    if not isinstance(attrs.get("scalar"), (int, float)) or isinstance(attrs.get("scalar"), bool):
        raise fail("'scalar' must be a number")
    return [types[0]]


register_op("add_scalar", _infer_scalar, lambda i, a, b: [i[0] + a["scalar"]], 1, ("scalar",))
register_op("div_scalar", _infer_scalar, lambda i, a, b: [i[0] / a["scalar"]], 1, ("scalar",))
register_op("mul_scalar", _infer_scalar, lambda i, a, b: [i[0] * a["scalar"]], 1, ("scalar",))


def _infer_cast(types, attrs):
    if attrs.get("dtype") not in DTYPES:
        raise fail(f"cast: unknown dtype {attrs.get('dtype')!r}")
    return [types[0].with_dtype(attrs["dtype"])]


register_op("cast", _infer_cast, lambda i, a, b: [i[0].to(DTYPES[a["dtype"]])], 1, ("dtype",))


# ---- shape ops ----------------------------------------------------------------------------------

def _infer_reshape(types, attrs):
    shape = tuple(attrs["shape"])
    out = TensorType(types[0].dtype, shape)
    a, b = _numel_key(types[0].shape), _numel_key(shape)
    if a != b:
        raise fail(f"reshape changes the element count: {types[0]} -> {list(shape)}")
    return [out]


register_op("reshape", _infer_reshape,
            lambda i, a, b: [i[0].reshape(resolve_shape(a["shape"], b))], 1, ("shape",))


def _infer_permute(types, attrs):
    perm = list(attrs["perm"])
    if sorted(perm) != list(range(types[0].rank)):
        raise fail(f"permute: {perm} is not a permutation of rank {types[0].rank}")
    return [types[0].with_shape([types[0].shape[p] for p in perm])]


register_op("permute", _infer_permute, lambda i, a, b: [i[0].permute(a["perm"]).contiguous()], 1,
            ("perm",))


def _slice_len(dim: Dim, start: int, end: int | None, step: int) -> Dim:
    if isinstance(dim, str):
        if start == 0 and end is None and step == 1:
            return dim
        raise fail(f"slice of symbolic dim {dim} needs static bounds (start=0, end=none, step=1)")
    return len(range(dim)[slice(start, end, step)])


def _infer_slice(types, attrs):
    t = types[0]
    dim = norm_axis(attrs["dim"], t.rank)
    shape = list(t.shape)
    shape[dim] = _slice_len(shape[dim], attrs.get("start", 0), attrs.get("end"), attrs.get("step", 1))
    return [t.with_shape(shape)]


def _impl_slice(inputs, attrs, bindings):
    index = [slice(None)] * inputs[0].dim()
    index[attrs["dim"]] = slice(attrs.get("start", 0), attrs.get("end"), attrs.get("step", 1))
    return [inputs[0][tuple(index)]]


register_op("slice", _infer_slice, _impl_slice, 1, ("dim",))


def _infer_split(types, attrs):
    t = types[0]
    dim = norm_axis(attrs["dim"], t.rank)
    sizes = list(attrs["sizes"])
    if isinstance(t.shape[dim], int) and sum(sizes) != t.shape[dim]:
        raise fail(f"split sizes {sizes} do not add up to dim {dim} of {t}")
    if isinstance(t.shape[dim], str):
        raise fail(f"split along symbolic dim {t.shape[dim]}")
    return [t.with_shape([*t.shape[:dim], s, *t.shape[dim + 1:]]) for s in sizes]


register_op("split", _infer_split,
            lambda i, a, b: list(torch.split(i[0], list(a["sizes"]), dim=a["dim"])), 1,
            ("dim", "sizes"))


def _infer_concat(types, attrs):
    _same_dtype(types, "concat operands")
    rank = types[0].rank
    dim = norm_axis(attrs["dim"], rank)
    shape = list(types[0].shape)
    total: Dim = 0
    for t in types:
        if t.rank != rank:
            raise fail("concat operands must have one rank")
        for i in range(rank):
            if i != dim and t.shape[i] != shape[i]:
                raise fail(f"concat operands differ off the concat dim: {types[0]} vs {t}")
        if isinstance(t.shape[dim], str) or isinstance(total, str):
            if len(types) == 1:
                total = t.shape[dim]
            else:
                raise fail("concat along a symbolic dim is not supported")
        else:
            total += t.shape[dim]
    shape[dim] = total
    return [types[0].with_shape(shape)]


register_op("concat", _infer_concat, lambda i, a, b: [torch.cat(i, dim=a["dim"])], (1, 64), ("dim",))


def _infer_expand(types, attrs):
    return [types[0].with_shape(tuple(attrs["shape"]))]


register_op("expand", _infer_expand,
            lambda i, a, b: [i[0].expand(resolve_shape(a["shape"], b)).contiguous()], 1, ("shape",))


def _infer_repeat_interleave(types, attrs):
    t = types[0]
    dim = norm_axis(attrs["dim"], t.rank)
    if isinstance(t.shape[dim], str):
        raise fail("repeat_interleave along a symbolic dim")
    shape = list(t.shape)
    shape[dim] = shape[dim] * attrs["repeats"]
    return [t.with_shape(shape)]


register_op("repeat_interleave", _infer_repeat_interleave,
            lambda i, a, b: [i[0].repeat_interleave(a["repeats"], dim=a["dim"])], 1,
            ("repeats", "dim"))


def _infer_index_select(types, attrs):
    x, idx = types
    _int(idx, "index_select index")
    _rank(idx, 1, "index_select index")
    dim = norm_axis(attrs["dim"], x.rank)
    shape = list(x.shape)
    shape[dim] = idx.shape[0]
    return [x.with_shape(shape)]


register_op("index_select", _infer_index_select,
            lambda i, a, b: [torch.index_select(i[0], a["dim"], i[1])], 2, ("dim",))


# ---- reductions and normalisations -------------------------------------------------------------

def _infer_reduce(types, attrs):
    t = types[0]
    dims = sorted(norm_axis(d, t.rank) for d in attrs["dims"])
    keep = attrs.get("keepdim", False)
    shape = [1 if i in dims else d for i, d in enumerate(t.shape)] if keep else \
        [d for i, d in enumerate(t.shape) if i not in dims]
    return [t.with_shape(shape)]


register_op("reduce_mean", _infer_reduce,
            lambda i, a, b: [i[0].mean(dim=list(a["dims"]), keepdim=a.get("keepdim", False))], 1,
            ("dims",))
register_op("reduce_sum", _infer_reduce,
            lambda i, a, b: [i[0].sum(dim=list(a["dims"]), keepdim=a.get("keepdim", False))], 1,
            ("dims",))


def _infer_softmax(types, attrs):
    _float(types[0], "softmax input")
    norm_axis(attrs["dim"], types[0].rank)
    return [types[0]]


register_op("softmax", _infer_softmax, lambda i, a, b: [torch.softmax(i[0], dim=a["dim"])], 1, ("dim",))


def _infer_topk(types, attrs):
    t = types[0]
    dim = norm_axis(attrs.get("dim", -1), t.rank)
    shape = list(t.shape)
    if isinstance(shape[dim], int) and attrs["k"] > shape[dim]:
        raise fail(f"topk k={attrs['k']} exceeds dim size {shape[dim]}")
    shape[dim] = attrs["k"]
    return [t.with_shape(shape), TensorType("i64", tuple(shape))]


def _impl_topk(inputs, attrs, bindings):
    values, indices = torch.topk(inputs[0], attrs["k"], dim=attrs.get("dim", -1))
    return [values, indices]


register_op("topk", _infer_topk, _impl_topk, 1, ("k",))


def _infer_rms_norm(types, attrs):
    x, w = types
    _float(x, "rms_norm input")
    _rank(w, 1, "rms_norm weight")
    _dim_eq(x.shape[-1], w.shape[0], "rms_norm weight size vs last input dim")
    return [x]


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """y = cast_back(x̂ · (offset + w)), x̂ = x · rsqrt(mean(x²) + eps), all in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + w.float())).to(x.dtype)


register_op("rms_norm", _infer_rms_norm,
            lambda i, a, b: [rms_norm_ref(i[0], i[1], a["eps"], a.get("offset", 0.0))], 2, ("eps",),
            doc="zero-centred norms use offset = 1.0 (x̂ · (1 + w))")


def _infer_gated_rms_norm(types, attrs):
    x, w, z = types
    _float(x, "gated_rms_norm input")
    _dim_eq(x.shape[-1], w.shape[0], "gated_rms_norm weight size")
    if z.shape != x.shape:
        raise fail(f"gated_rms_norm gate shape {z} != input {x}")
    return [x]


def gated_rms_norm_ref(x, w, z, eps):
    """out = cast(w ⊙ cast(x̂) ⊙ silu(z.float())); the GDN output norm (plain weight, two roundings)."""
    dtype = x.dtype
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    n = w * n
    return (n.float() * F.silu(z.float())).to(dtype)


register_op("gated_rms_norm", _infer_gated_rms_norm,
            lambda i, a, b: [gated_rms_norm_ref(i[0], i[1], i[2], a["eps"])], 3, ("eps",))


def _infer_l2_norm(types, attrs):
    _float(types[0], "l2_norm input")
    return [types[0]]


register_op("l2_norm", _infer_l2_norm,
            lambda i, a, b: [i[0] * torch.rsqrt(i[0].pow(2).sum(-1, keepdim=True) + a["eps"])], 1,
            ("eps",), doc="x · rsqrt(Σx² + eps) over the last dim")


def _infer_swiglu(types, attrs):
    gate, up = types
    _float(gate, "swiglu gate")
    if gate != up:
        raise fail(f"swiglu gate {gate} and up {up} must have one type")
    return [gate]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the operands' dtype (two roundings in bf16, like the traced chain)."""
    return F.silu(gate) * up


register_op("swiglu", _infer_swiglu, lambda i, a, b: [swiglu_ref(i[0], i[1])], 2,
            doc="%y = swiglu(%gate, %up): silu(gate) * up, the MLP activation (down is a separate linear)")


# ---- linear algebra ----------------------------------------------------------------------------

def _infer_linear(types, attrs):
    x, w = types[0], types[1]
    _same_dtype(types, "linear operands")
    _rank(w, 2, "linear weight")
    _dim_eq(x.shape[-1], w.shape[1], f"linear: input features of {x} vs weight {w}")
    if len(types) == 3:
        _rank(types[2], 1, "linear bias")
        _dim_eq(types[2].shape[0], w.shape[0], "linear bias size")
    return [x.with_shape([*x.shape[:-1], w.shape[0]])]


register_op("linear", _infer_linear,
            lambda i, a, b: [F.linear(i[0], i[1], i[2] if len(i) > 2 else None)], (2, 3),
            doc="y = x Wᵀ (+ bias); W is [out, in] like the checkpoint")


def _infer_matmul(types, attrs):
    a, b = types
    _same_dtype(types, "matmul operands")
    if a.rank < 2 or b.rank < 2:
        raise fail("matmul operands need rank >= 2")
    _dim_eq(a.shape[-1], b.shape[-2], "matmul contraction dim")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [a.with_shape([*batch, a.shape[-2], b.shape[-1]])]


register_op("matmul", _infer_matmul, lambda i, a, b: [torch.matmul(i[0], i[1])], 2)


def _infer_embedding(types, attrs):
    table, ids = types
    _rank(table, 2, "embedding table")
    _int(ids, "embedding ids")
    return [TensorType(table.dtype, (*ids.shape, table.shape[1]))]


register_op("embedding", _infer_embedding, lambda i, a, b: [F.embedding(i[1], i[0])], 2)


# ---- model-level ops (the reference's custom ops) ----------------------------------------------

def _qwen35_ops():
    import reference.ops  # noqa: F401  (registers torch.ops.qwen35.*)

    return torch.ops.qwen35


def _infer_rope(types, attrs):
    x, pos = types
    _float(x, "rope input")
    _int(pos, "rope positions")
    _rank(x, 4, "rope input [B, T, heads, head_dim]")
    _rank(pos, 2, "rope positions [B, T]")
    _dim_eq(x.shape[0], pos.shape[0], "rope batch")
    _dim_eq(x.shape[1], pos.shape[1], "rope sequence")
    if attrs["rotary_dim"] % 2 or (isinstance(x.shape[3], int) and attrs["rotary_dim"] > x.shape[3]):
        raise fail(f"rope rotary_dim {attrs['rotary_dim']} must be even and <= head_dim {x.shape[3]}")
    return [x]


def rope_ref(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Rotate-half partial RoPE on the first `rotary_dim` dims of x [B, T, h, hd].

    cos/sin are computed in fp32 from positions [B, T] and cast to x's dtype before use.
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq                     # [B, T, half]
    emb = torch.cat([freqs, freqs], dim=-1)                               # [B, T, R]
    cos = emb.cos().to(x.dtype)[:, :, None, :]
    sin = emb.sin().to(x.dtype)[:, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


register_op("rope", _infer_rope,
            lambda i, a, b: [rope_ref(i[0], i[1], a["theta"], a["rotary_dim"])], 2,
            ("theta", "rotary_dim"))


def _infer_causal_conv1d(types, attrs):
    x, w, state, lengths = types
    _rank(x, 3, "causal_conv1d x [B, T, C]")
    _rank(w, 2, "causal_conv1d weight [C, K]")
    _rank(state, 3, "causal_conv1d state [B, C, K-1]")
    _int(lengths, "causal_conv1d lengths")
    _dim_eq(x.shape[2], w.shape[0], "causal_conv1d channels")
    _dim_eq(state.shape[1], w.shape[0], "causal_conv1d state channels")
    if isinstance(w.shape[1], int):
        _dim_eq(state.shape[2], w.shape[1] - 1, "causal_conv1d state width (K-1)")
    _dim_eq(state.shape[0], x.shape[0], "causal_conv1d state batch")
    return [x, state]


register_op("causal_conv1d", _infer_causal_conv1d,
            lambda i, a, b: list(_qwen35_ops().causal_conv1d(*i)), 4, foldable=False,
            doc="(y after SiLU, new_state) = causal_conv1d(x, w, state, lengths)")


def _infer_gated_delta_rule(types, attrs):
    q, k, v, g, beta, state = types
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _rank(t, 4, f"gated_delta_rule {name} [B, T, heads, dim]")
    if q.shape != k.shape:
        raise fail(f"gated_delta_rule q {q} and k {k} differ")
    if g.dtype != "f32" or state.dtype != "f32":
        raise fail(f"gated_delta_rule g and state must be f32, got {g.dtype} and {state.dtype}")
    _dim_eq(g.shape, (*v.shape[:3],), "gated_delta_rule g [B, T, nv]")
    _dim_eq(beta.shape, (*v.shape[:3],), "gated_delta_rule beta [B, T, nv]")
    _dim_eq(state.shape, (v.shape[0], v.shape[2], k.shape[3], v.shape[3]),
            "gated_delta_rule state [B, nv, dk, dv]")
    return [v, state]


register_op("gated_delta_rule", _infer_gated_delta_rule,
            lambda i, a, b: list(_qwen35_ops().gated_delta_rule(*i)), 6, foldable=False)


def _infer_attention(types, attrs):
    q, k, v, q_start, kv_len = types
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _rank(t, 4, f"attention {name} [B, heads, len, hd]")
    if k.shape != v.shape:
        raise fail(f"attention k {k} and v {v} differ")
    _dim_eq(q.shape[3], k.shape[3], "attention head_dim")
    _int(q_start, "attention q_start")
    _int(kv_len, "attention kv_len")
    return [q]


register_op("attention", _infer_attention,
            lambda i, a, b: [_qwen35_ops().attention(*i)], 5, foldable=False)


def _infer_moe(types, attrs):
    x, router, gate_up, down = types
    _rank(x, 2, "moe x [N, H]")
    _rank(gate_up, 3, "moe gate_up_proj [E, 2I, H]")
    _dim_eq(router.shape, (gate_up.shape[0], x.shape[1]), "moe router [E, H]")
    _dim_eq(down.shape[0], gate_up.shape[0], "moe experts")
    return [x]


register_op("moe", _infer_moe,
            lambda i, a, b: [_qwen35_ops().moe(*i, a["top_k"], a["norm_topk_prob"])], 4,
            ("top_k", "norm_topk_prob"), foldable=False)


def infer_types(op: str, types: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
    """Run op's type rule, with the arity and required-attribute checks every op shares."""
    spec = get_op(op)
    low, high = spec.arity
    if not low <= len(types) <= high:
        expected = str(low) if low == high else f"{low}..{high}"
        raise fail(f"{op} takes {expected} inputs, got {len(types)}")
    missing = [a for a in spec.required_attrs if a not in attrs]
    if missing:
        raise fail(f"{op} is missing attribute(s) {', '.join(missing)}")
    if spec.infer is None:
        raise fail(f"{op} has no type rule")
    try:
        return spec.infer(types, attrs)
    except (KeyError, IndexError, TypeError) as err:
        raise fail(f"{op}: bad attributes or inputs ({type(err).__name__}: {err})") from None


__all__ = ["OPS", "OpDef", "TypeRuleError", "broadcast_shapes", "get_op", "infer_types",
           "register_op", "resolve_shape", "rms_norm_ref", "gated_rms_norm_ref", "rope_ref"]
