"""fuse-deltanet: the whole GDN core of a layer becomes one `gated_deltanet` op.

Replaces

    y, conv' = causal_conv1d(mixed, reshape(conv_w), conv_state, lengths)     # conv + SiLU
    q, k, v  = split(y) -> reshape each to heads
    beta     = sigmoid(b)
    g        = mul(neg(exp(A_log)), softplus(add(a, dt_bias)))               # casts to f32 allowed
    o, S'    = gated_delta_rule(q, k, v, g, beta, S)                          # head repeat, L2 norm

by

    o, conv', S' = gated_deltanet(mixed, a, b, conv_w, A_log, dt_bias, conv_state, S, lengths)
                   {num_k_heads, num_v_heads, head_k_dim, head_v_dim, chunk_size, layer}

The fused op has a chunked prefill form (chunk_size tokens per chunk, WY/UT transform: a unit
lower-triangular solve per chunk, then one sequential pass over chunks) and a recurrent decode
form (T = 1), chosen by the sequence length at run time. Steps t >= lengths[b] are masked
(g = 0, beta = 0), so right padding never reaches the recurrent state. insert-state gives the op
a tenth input, `commit` [B] <= lengths: the returned states hold only the first commit[b] tokens
while the outputs cover all lengths[b] (what a speculative verify step needs). Its naive twin,
`gated_deltanet_naive`, composes the reference model's eager ops with the same signature.

Contract:
  requires: the traced GDN spelling above (after `cleanup`, so f32->f32 casts are gone).
  ensures:  every matched gated_delta_rule and its conv are replaced; unmatched ones stay as they
            are, with the reason recorded by the tracer. Does not pick a kernel; backends map
            `gated_deltanet` to theirs.
Options: chunk-size (16, 32 or 64; default 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from qwen35c.graph.ir import Graph, Node, TensorType
from qwen35c.graph.ops import TypeRuleError, register_op
from qwen35c.passes.manager import Pass, PassResult, register_pass
from qwen35c.passes.rewrite import Rule, apply_rules, fail

L2_EPS = 1e-6


# ---- the fused op: type rule, implementation, naive twin ------------------------------------

def _infer_gated_deltanet(types, attrs):
    mixed, a, b, conv_w, a_log, dt_bias, conv_state, state, lengths, *commit = types
    nk, nv, dk, dv = (attrs[k] for k in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim"))
    channels = 2 * nk * dk + nv * dv
    if mixed.rank != 3 or mixed.shape[2] != channels:
        raise TypeRuleError(f"gated_deltanet: mixed must be [B, T, {channels}], got {mixed}")
    if a.shape != (*mixed.shape[:2], nv) or b.shape != a.shape:
        raise TypeRuleError(f"gated_deltanet: a and b must be [B, T, {nv}], got {a} and {b}")
    if conv_w.rank != 2 or conv_w.shape[0] != channels:
        raise TypeRuleError(f"gated_deltanet: conv weight must be [{channels}, K], got {conv_w}")
    if state.dtype != "f32" or state.shape != (mixed.shape[0], nv, dk, dv):
        raise TypeRuleError(f"gated_deltanet: state must be f32[B, {nv}, {dk}, {dv}], got {state}")
    if lengths.dtype != "i64" or any(c.dtype != "i64" or c.shape != lengths.shape for c in commit):
        raise TypeRuleError("gated_deltanet: lengths (and commit) must be i64[B]")
    o = TensorType(mixed.dtype, (*mixed.shape[:2], nv, dv))
    return [o, conv_state, state]


def _gates(a, b, a_log, dt_bias, lengths, start=None):
    """beta = sigmoid(b) (model dtype), g = -exp(A_log) softplus(a + dt_bias) (f32); both 0 outside
    steps start[b] <= t < lengths[b] (start 0 by default), so those steps leave the state as it is."""
    beta = torch.sigmoid(b)
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    steps = torch.arange(a.shape[1])
    valid = steps < lengths.view(-1, 1)
    if start is not None:
        valid &= steps >= start.view(-1, 1)
    valid = valid[..., None]                                                        # [B, T, 1]
    return g.masked_fill(~valid, 0.0), beta.masked_fill(~valid, 0)


def _split_at_commit(delta_rule, o_state, gates, lengths, commit):
    """The commit split of the fused op's reference. `delta_rule(g, beta, state) -> (o, state')`
    runs the rule on the step's q/k/v; `o_state` is its result with the gates of steps < commit
    (so state' is the state after `commit` tokens: what is kept). Outputs of steps commit..lengths-1
    continue from that state with the earlier steps masked, which leave it unchanged."""
    o, state = o_state
    if commit is None or bool((commit >= lengths).all()):
        return o, state
    later, _ = delta_rule(*gates(lengths, commit), state)
    first = (torch.arange(o.shape[1]) < commit.view(-1, 1)).view(*commit.shape, -1, *[1] * (o.dim() - 2))
    return torch.where(first, o, later), state


def gated_deltanet_naive(mixed, a, b, conv_w, a_log, dt_bias, conv_state, state, lengths, commit=None, *,
                         num_k_heads, num_v_heads, head_k_dim, head_v_dim, chunk_size=64):
    """The naive twin: the reference's eager conv and recurrent delta rule, step by step; the state
    is kept after `commit` tokens (default: lengths), the outputs cover `lengths` tokens. Written
    apart from the op's commit split: the outputs are an ordinary step's over every valid token,
    the state that of a second run over the committed tokens alone."""
    from reference.ops import causal_conv1d_eager, recurrent_gated_delta_rule

    batch, length, _ = mixed.shape
    kept = lengths if commit is None else commit
    y, conv_new = causal_conv1d_eager(mixed, conv_w, conv_state, kept)
    key = num_k_heads * head_k_dim
    q, k, v = y.split([key, key, num_v_heads * head_v_dim], dim=-1)
    q = q.reshape(batch, length, num_k_heads, head_k_dim)
    k = k.reshape(batch, length, num_k_heads, head_k_dim)
    v = v.reshape(batch, length, num_v_heads, head_v_dim)

    def rule(g, beta, s):
        return recurrent_gated_delta_rule(q, k, v, g, beta, s)

    o, final = rule(*_gates(a, b, a_log, dt_bias, lengths), state)
    if commit is not None:
        _, final = rule(*_gates(a, b, a_log, dt_bias, commit), state)
    return o, conv_new, final


def _delta_rule_recurrent(q, k, v, g, beta, state):
    """q, k [B, H, T, dk] (normalised, scaled), v [B, H, T, dv], g/beta [B, H, T]; fp32."""
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t]
        delta = (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, kt)) * beta[:, :, t, None]
        state = state + kt[..., :, None] * delta[..., None, :]
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", state, q[:, :, t])
    return out, state


def _delta_rule_chunked(q, k, v, g, beta, state, chunk: int):
    """WY/UT chunked form. Per chunk c with gamma = cumsum(g) inside the chunk:
      A = strict_tril((beta k) kᵀ ⊙ exp(gamma_i - gamma_j));  (I + A) U = beta v;  (I + A) W = beta e^gamma k
      V' = U - W S;  O = (q e^gamma) S + (q kᵀ ⊙ Gamma) V';  S = e^gamma_last S + (k e^(gamma_last - gamma))ᵀ V'
    """
    batch, heads, length, _ = q.shape
    pad = (-length) % chunk
    if pad:  # padded steps have g = beta = k = 0: they change neither outputs nor the state
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = q.shape[2] // chunk
    q, k, v = (t.reshape(batch, heads, n, chunk, t.shape[-1]) for t in (q, k, v))
    g, beta = g.reshape(batch, heads, n, chunk), beta.reshape(batch, heads, n, chunk)
    gamma = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    system = (kb @ k.transpose(-1, -2)) * decay
    system = system.tril(-1) + torch.eye(chunk)                                  # I + strict part
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * gamma.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * gamma.exp()[..., None]
    k_decayed = k * (gamma[..., -1:] - gamma).exp()[..., None]
    out = torch.empty_like(v)
    for c in range(n):
        v_new = u[:, :, c] - w[:, :, c] @ state
        out[:, :, c] = q_decayed[:, :, c] @ state + scores[:, :, c] @ v_new
        state = state * gamma[:, :, c, -1].exp()[..., None, None] + k_decayed[:, :, c].transpose(-1, -2) @ v_new
    return out.reshape(batch, heads, n * chunk, -1)[:, :, :length], state


def gated_deltanet_ref(mixed, a, b, conv_w, a_log, dt_bias, conv_state, state, lengths, commit=None, *,
                       num_k_heads, num_v_heads, head_k_dim, head_v_dim, chunk_size=64):
    """The fused op: conv + SiLU (reference op), gates, head repeat, L2 norm, then the chunked
    (T > 1) or recurrent (T = 1) delta rule in fp32.

    `commit` [B] (<= lengths, default lengths) is how many of the step's tokens enter the returned
    conv and recurrent states; outputs cover all `lengths` tokens. A speculative verify step feeds
    its drafts after the tokens it commits: the drafts get outputs but leave no trace in the state."""
    from reference.ops import causal_conv1d_eager

    batch, length, _ = mixed.shape
    kept = lengths if commit is None else commit
    y, conv_new = causal_conv1d_eager(mixed, conv_w, conv_state, kept)
    key = num_k_heads * head_k_dim
    q, k, v = y.split([key, key, num_v_heads * head_v_dim], dim=-1)
    ratio = num_v_heads // num_k_heads
    q = q.reshape(batch, length, num_k_heads, head_k_dim).repeat_interleave(ratio, dim=2)
    k = k.reshape(batch, length, num_k_heads, head_k_dim).repeat_interleave(ratio, dim=2)
    v = v.reshape(batch, length, num_v_heads, head_v_dim)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))                    # [B, H, T, d]
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2_EPS) * head_k_dim ** -0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2_EPS)

    def rule(g, beta, s):
        g, beta = g.transpose(1, 2).float(), beta.transpose(1, 2).float()
        if length == 1:
            o, s = _delta_rule_recurrent(q, k, v, g, beta, s.float())
        else:
            o, s = _delta_rule_chunked(q, k, v, g, beta, s.float(), chunk_size)
        return o.transpose(1, 2), s                                             # [B, T, H, dv]

    def gates(end, start=None):
        return _gates(a, b, a_log, dt_bias, end, start)

    o, state = _split_at_commit(rule, rule(*gates(kept), state), gates, lengths, commit)
    return o.contiguous().to(mixed.dtype), conv_new, state


_ATTRS = ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")
register_op("gated_deltanet", _infer_gated_deltanet,
            lambda i, a, b: list(gated_deltanet_ref(*i, **{k: a[k] for k in _ATTRS},
                                                    chunk_size=a.get("chunk_size", 64))),
            (9, 10), _ATTRS, foldable=False,
            doc="(o, conv_state', state') = gated_deltanet(mixed, a, b, conv_w, A_log, dt_bias, "
                "conv_state, state, lengths[, commit])")


# ---- the rewrite -----------------------------------------------------------------------------

def _skip_casts(value):
    while value.producer is not None and value.producer.op == "cast" and value.producer.attrs["dtype"] == "f32":
        value = value.producer.inputs[0]
    return value


def _producer(value, op: str):
    node = value.producer
    return node if node is not None and node.op == op else None


class FuseGatedDeltaNet(Rule):
    """Replaces causal_conv1d -> split -> reshape(q, k, v), sigmoid(b), -exp(A_log)·softplus(a + dt_bias)
    -> gated_delta_rule by one gated_deltanet."""

    anchor = "gated_delta_rule"

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def match(self, graph: Graph, node: Node):
        q, k, v, g, beta, state = node.inputs
        shaped = [_producer(x, "reshape") for x in (q, k, v)]
        if not all(shaped):
            return fail("q, k or v is not a reshape", node)
        splits = [r.inputs[0].producer for r in shaped]
        split = splits[0]
        if split is None or split.op != "split" or any(s is not split for s in splits) \
                or [r.inputs[0] for r in shaped] != split.outputs or split.attrs["dim"] != 2:
            return fail("q, k, v are not the three parts of one split along channels", node)
        conv = _producer(split.inputs[0], "causal_conv1d")
        if conv is None or split.inputs[0] is not conv.outputs[0]:
            return fail("the split does not read a causal_conv1d output", split)
        users = graph.users()
        if len(users.get(id(conv.outputs[0]), [])) != 1 or any(len(users.get(id(o), [])) != 1 for o in split.outputs):
            return fail("the conv output or a split part has other users", conv)
        sig = _producer(beta, "sigmoid")
        if sig is None:
            return fail("beta is not sigmoid(b)", node)
        mul = _producer(g, "mul")
        if mul is None:
            return fail("g is not a product", node)
        neg, soft = (_producer(x, op) for x, op in zip(mul.inputs, ("neg", "softplus")))
        if neg is None or soft is None:
            return fail("g is not neg(...) * softplus(...)", mul)
        exp = _producer(neg.inputs[0], "exp")
        add = _producer(soft.inputs[0], "add")
        if exp is None or add is None:
            return fail("g is not -exp(A_log) * softplus(a + dt_bias)", mul)
        a_log = _skip_casts(exp.inputs[0])
        a, dt_bias = _skip_casts(add.inputs[0]), add.inputs[1]
        conv_w = conv.inputs[1]
        if a.type.rank != 3 or dt_bias.type.rank != 1 or a_log.type.rank != 1:
            return fail("gate operands have unexpected ranks", add)
        nk, dk = q.type.shape[2], q.type.shape[3]
        nv, dv = v.type.shape[2], v.type.shape[3]
        return {"conv": conv, "a": a, "b": sig.inputs[0], "a_log": a_log, "dt_bias": dt_bias,
                "conv_w": conv_w, "state": state,
                "dims": {"num_k_heads": nk, "num_v_heads": nv, "head_k_dim": dk, "head_v_dim": dv}}

    def rewrite(self, graph, node, conv, a, b, a_log, dt_bias, conv_w, state, dims):
        mixed, _w, conv_state, lengths = conv.inputs
        attrs = {**dims, "chunk_size": self.chunk_size, "layer": node.attrs.get("layer")}
        inputs = [mixed, a, b, conv_w, a_log, dt_bias, conv_state, state, lengths]
        types = _infer_gated_deltanet([x.type for x in inputs], attrs)
        layer = attrs["layer"]
        fused = graph.add_node("gated_deltanet", inputs, types, attrs,
                               names=[f"L{layer}.gdn_out", f"L{layer}.conv_state_new",
                                      f"L{layer}.recurrent_state_new"], before=node)
        graph.replace_all_uses(node.outputs[0], fused.outputs[0])
        graph.replace_all_uses(node.outputs[1], fused.outputs[2])
        graph.replace_all_uses(conv.outputs[1], fused.outputs[1])


@dataclass
class FuseDeltaNetOptions:
    chunk_size: Literal[16, 32, 64] = field(default=64, metadata={"help": "tokens per chunk in prefill"})


@register_pass
class FuseDeltaNet(Pass):
    name = "fuse-deltanet"
    Options = FuseDeltaNetOptions

    def run(self, graph: Graph) -> PassResult:
        n = apply_rules(graph, [FuseGatedDeltaNet(self.options.chunk_size)], self.tracer)
        if n:
            from qwen35c.passes.cleanup import DeadCodeElimination

            DeadCodeElimination().run(graph)
        return PassResult(graph, bool(n), n)


FuseDeltaNet.__doc__ = __doc__

__all__ = ["FuseDeltaNet", "gated_deltanet_naive", "gated_deltanet_ref"]
