"""Lower the stateful qwen35c IR to an execution plan for the Triton kernel library.

Input: the graph after `TRITON_PIPELINE` (fused GDN, grouped MoE, the match passes for rms_norm /
gated_rms_norm / rope / swiglu, optionally `quantize`, then `insert-state`). Output: a `Plan`, two
programs of steps over named buffers, weights and states:

  prefill  T >= 1 tokens per row from its q_start (0 or on top of the state), right-padded to `lengths`
  decode   one token per row on top of the state

A step is a kernel launch (kernel, spec name, constexprs, grid formula, argument bindings) or one
of the named host ops (HOST_OPS): an embedding gather, index arithmetic on [B]-sized tensors,
the MoE token sort (a few device ops, no sync), the row selection for the LM head. Views (reshape,
split, permute) are free: they become strides and offsets in the bindings.

The lowering is by layer template: every IR op must be in SUPPORTED_OPS (anything else is an error
naming the op and its node), and the launches of each layer are built from the checkpoint names of
its weights and the attributes of its fused nodes (gated_deltanet, rope, rms_norm, topk, ...).
Layouts chosen here (the session allocates them; recorded in the plan's `states`):

  conv state      three tensors per GDN layer, q / k / v channels [B, C_part, W-1]: the conv writes
                  each part contiguous, as the GDN kernels read q, k, v (in_proj_qkv and the conv
                  weight are split by rows at pack time; the concatenation is the IR's [B, C, W-1])
  recurrent state [B, HV, K, V] fp32 (the IR's layout), updated in place
  KV cache        [B, Hkv, S, D] (the IR's layout), positions q_start.. written by kv_cache_write

Bindings: "buf:NAME[+OFFSET]" (activation pool, element offset), "w:NAME" (packed weight),
"state:NAME", "ctl:NAME" (host-made index tensors), "int:EXPR" (integer formula in the program's
variables), "float:VALUE", "dummy" (an unused pointer argument).
"""

from __future__ import annotations

from qwen35c.backends.triton import mode as _mode

_mode.ensure()   # before triton is imported (see mode.py)

import ast
import json
import operator
import re
from dataclasses import asdict, dataclass, field

import triton

from qwen35c.errors import QwenError

PLAN_FORMAT = "qwen35c-triton-plan/2"   # 2: fp8_act_quant takes M and ROWS tokens a program

# The pipeline triton targets use; `{quantize}` is "" or "quantize{...},".
# quantize runs after the match passes: match-swiglu recognises SiLU(linear) * linear, not quantized_linear.
TRITON_PIPELINE = ("cleanup,fuse-deltanet{{chunk-size=64}},lower-moe{{form=grouped}},"
                   "match-gated-rms-norm,match-rms-norm,match-rope,match-swiglu,{quantize}insert-state,cleanup")

SUPPORTED_OPS = {
    "weight", "embedding", "reshape", "permute", "split", "arange", "add", "mul", "sigmoid", "linear",
    "quantized_linear", "rms_norm", "gated_rms_norm", "rope", "swiglu", "gated_deltanet", "kv_cache_update",
    "attention", "softmax", "topk", "reduce_sum", "div", "moe_sort", "moe_gather", "grouped_linear",
    "moe_combine",
}

HOST_OPS = {
    "embedding": "gather rows of the packed embedding table, widened to the activation dtype",
    "positions": "q_start/lengths as int32, per-token positions q_start[b] + t, kv lengths q_start + lengths",
    "gdn_index": "cu_seqlens / chunk indices / chunk offsets of the GDN chunk kernels (prefill)",
    "moe_align": "sort (token, choice) slots by expert, pad each expert to BLOCK_M (device ops, no sync)",
    "select_rows": "the rows the LM head runs on: every token, or each row's last valid token",
}

CHUNK = 64
PROGRAM_ORDER = ("prefill", "decode")


# --------------------------------------------------------------------------------------------- steps

@dataclass
class Launch:
    spec: str                       # the shipped specialisation, e.g. "gemm_bf16_prefill"
    kernel: str                     # the @triton.jit function, e.g. "gemm_kernel"
    grid: list[str]
    args: list[list[str]]           # [[parameter, binding], ...] in the kernel's order
    const: dict                     # constexprs
    num_warps: int = 4
    num_stages: int = 1
    per_row: bool = False           # GDN prefill: once per row when the batch is ragged
    layer: int | None = None
    pads: list[str] = field(default_factory=list)   # per-row: M-row buffers it writes for valid tokens only;
                                                    # the runtime zeroes their padded rows (never left unwritten)

    def text(self) -> str:
        args = " ".join(f"{p}={b}" for p, b in self.args)
        const = " ".join(f"{k}={v}" for k, v in sorted(self.const.items()))
        row = " per-row" if self.per_row else ""
        row += "".join(f" zero-pads={p}" for p in self.pads)
        return (f"launch {self.spec} ({self.kernel}) grid=({', '.join(self.grid)}) warps={self.num_warps} "
                f"stages={self.num_stages}{row} [{const}] {args}")


@dataclass
class HostOp:
    op: str
    args: dict
    layer: int | None = None

    def text(self) -> str:
        return f"host {self.op} " + " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))


@dataclass
class PackedWeight:
    name: str                       # name in weights.safetensors
    source: str                     # IR weight name (a checkpoint name, or `<name>#<part>`)
    dtype: str                      # bf16 | f32 | f8e4m3 | u8
    shape: list[int]
    rows: list[int] | None = None   # [start, stop) row slice of the source (q/k/v split)
    reshape: list[int] | None = None
    quantize: str | None = None     # pack-time quantization of a high-precision source (routed experts)


@dataclass
class Plan:
    model: dict
    weights: list[PackedWeight]
    buffers: dict[str, dict]
    states: list[dict]
    variables: dict[str, list]               # per program: [[name, formula], ...] evaluated in order
    programs: dict[str, list]                # "prefill" / "decode" -> [Launch | HostOp]
    notes: list[str] = field(default_factory=list)

    def launches(self) -> list[Launch]:
        return [s for steps in self.programs.values() for s in steps if isinstance(s, Launch)]

    def specialisations(self) -> dict[str, Launch]:
        """spec name -> the first launch that uses it (the compiled kernels the artifact ships)."""
        out: dict[str, Launch] = {}
        for launch in self.launches():
            out.setdefault(launch.spec, launch)
        return out

    def to_json(self) -> dict:
        def step(s):
            return {"launch": asdict(s)} if isinstance(s, Launch) else {"host": asdict(s)}

        return {"format": PLAN_FORMAT, "model": self.model, "weights": [asdict(w) for w in self.weights],
                "buffers": self.buffers, "states": self.states, "variables": self.variables,
                "programs": {k: [step(s) for s in v] for k, v in self.programs.items()}, "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise QwenError(f"plan format {data.get('format')!r} is not {PLAN_FORMAT!r} (built by another qwen35c: "
                            f"rebuild the artifact)")

        def step(s):
            return Launch(**s["launch"]) if "launch" in s else HostOp(**s["host"])

        plan = cls(data["model"], [PackedWeight(**w) for w in data["weights"]], data["buffers"], data["states"],
                   data["variables"], {k: [step(s) for s in v] for k, v in data["programs"].items()},
                   list(data.get("notes", [])))
        plan.check_names()
        return plan

    def check_names(self) -> None:
        """Every buffer, weight and state a launch binds (or zero-pads) is declared: a QwenError naming
        the step otherwise, at load, never a KeyError in the middle of a run."""
        declared = {"buf": set(self.buffers), "w": {w.name for w in self.weights},
                    "state": {s["name"] for s in self.states}}
        for program, steps in self.programs.items():
            for st in steps:
                if not isinstance(st, Launch):
                    continue
                names = [b for _, b in st.args] + [f"buf:{p}" for p in st.pads]
                for binding in names:
                    kind, _, value = binding.partition(":")
                    if kind in declared and value.partition("+")[0] not in declared[kind]:
                        raise QwenError(f"plan: {program} launch {st.spec} (layer {st.layer}) binds {binding}, "
                                        f"which the plan does not declare")

    def text(self) -> str:
        """Deterministic, diffable text form."""
        lines = [f"plan {PLAN_FORMAT} " + json.dumps(self.model, sort_keys=True)]
        lines += [f"note {n}" for n in self.notes]
        for w in self.weights:
            extra = "".join(f" {k}={v}" for k, v in (("rows", w.rows), ("reshape", w.reshape),
                                                       ("quantize", w.quantize)) if v is not None)
            lines.append(f"weight {w.name} {w.dtype}{w.shape} <- {w.source}{extra}")
        for name, b in sorted(self.buffers.items()):
            lines.append(f"buffer {name} {b['dtype']}[{', '.join(map(str, b['shape']))}]")
        for s in self.states:
            lines.append(f"state {s['name']} {s['dtype']}[{', '.join(map(str, s['shape']))}] {s['layout']}")
        for program, steps in sorted(self.programs.items(), key=lambda kv: PROGRAM_ORDER.index(kv[0])):
            lines.append(f"program {program}:")
            for k, v in self.variables.get(program, []):
                lines.append(f"  let {k} = {v}")
            layer = None
            for s in steps:
                if s.layer != layer and s.layer is not None:
                    lines.append(f"  # layer {s.layer}")
                layer = s.layer
                lines.append("  " + s.text())
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- safe formulas

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_CALLS = {"cdiv": triton.cdiv, "min": min, "max": max}


def evaluate(expr: str, env: dict[str, int]) -> int:
    """An integer formula of the plan (names, ints, + - * //, cdiv/min/max); plans are untrusted input."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
            return _CALLS[node.func.id](*(ev(a) for a in node.args))
        raise QwenError(f"plan formula {expr!r}: unsupported term {ast.dump(node)[:60]}")

    try:
        return int(ev(ast.parse(expr, mode="eval")))
    except SyntaxError:
        raise QwenError(f"plan formula {expr!r} does not parse") from None


# ------------------------------------------------------------------------------------ lowering

class _Lowering:
    def __init__(self, graph, act_tag: str):
        self.graph = graph
        self.weights: dict[str, object] = {}          # IR weight name -> Value type
        self.quantized: dict[str, dict] = {}          # linear weight name -> quantized_linear attrs
        self.packed: list[PackedWeight] = []
        self.buffers: dict[str, dict] = {}
        self.act = act_tag
        self.notes: list[str] = []

    # --- IR reading
    def scan(self):
        unsupported = [n for n in self.graph.nodes if n.op not in SUPPORTED_OPS]
        if unsupported:
            n = unsupported[0]
            raise QwenError(f"triton backend: IR op '{n.op}' (node %{n.outputs[0].name}) has no kernel or host op; "
                            f"build with the pipeline {TRITON_PIPELINE.format(quantize='')!r}")
        from qwen35c.backends.triton.experts import expert_format

        record = self.graph.metadata.get("quantization") or {}
        self.not_lowered = set(record.get("not_lowered", []))
        self.expert_fmt = expert_format(record.get("recipe"))
        for n in self.graph.nodes:
            if n.op == "weight":
                self.weights[n.attrs["name"]] = n.outputs[0].type
            elif n.op == "quantized_linear":
                self.quantized[n.attrs["weight"]] = dict(n.attrs)
        self.by_op: dict[str, list] = {}
        for n in self.graph.nodes:
            self.by_op.setdefault(n.op, []).append(n)

    def shape(self, name: str) -> list[int]:
        return [int(d) for d in self.weights[name].shape]

    def has(self, name: str) -> bool:
        return name in self.weights or name in self.quantized

    # --- buffers and weights
    def buf(self, name: str, rows: str, width, dtype: str | None = None) -> str:
        spec = {"shape": [rows, width], "dtype": dtype or "act"}
        if self.buffers.setdefault(name, spec) != spec:
            old = self.buffers[name]
            if old["dtype"] != spec["dtype"] or old["shape"][0] != rows:
                raise QwenError(f"plan buffer {name}: conflicting shapes {old} and {spec}")
            old["shape"][1] = max(old["shape"][1], width)     # one buffer, the widest use
        return name

    def pack(self, name: str, source: str, dtype: str, shape, rows=None, reshape=None, quantize=None) -> str:
        if not any(p.name == name for p in self.packed):
            self.packed.append(PackedWeight(name, source, dtype, list(shape), rows, reshape, quantize))
        return "w:" + name

    def hp(self, name: str, dtype: str = "bf16") -> str:
        """A high-precision weight as it is (bf16, or fp32 for A_log / dt_bias)."""
        if name not in self.weights:
            raise QwenError(f"triton backend: weight {name} is not in the graph")
        return self.pack(name, name, dtype, self.shape(name))

    # --- GEMM
    def gemm(self, phase: str, x: str, weight: str, y: str, m: str, layer, rows=None, x_stride=None,
             y_stride=None, part: str = "") -> list:
        """y[M, N] = x[M, K] @ W.T for a dense, INT4 or FP8 weight (a row slice `rows` for q/k/v parts)."""
        q = self.quantized.get(weight)
        if q is None:
            shape = self.shape(weight)
            if rows is not None:
                shape = [rows[1] - rows[0], shape[1]]
            n, k = shape
            w = self.pack(weight + part, weight, "bf16", shape, rows=rows)
            cfg = dict(_dense_config(phase))
            grid = [f"cdiv({m}, {cfg['BLOCK_M']}) * cdiv({n}, {cfg['BLOCK_N']})"]
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            return [Launch(f"gemm_bf16_{phase}", "gemm_kernel", grid,
                           [["x_ptr", x], ["w_ptr", w], ["y_ptr", y], ["M", f"int:{m}"], ["N", f"int:{n}"],
                            ["K", f"int:{k}"], ["stride_xm", f"int:{x_stride or k}"], ["stride_wn", f"int:{k}"],
                            ["stride_ym", f"int:{y_stride or n}"]], cfg, warps, stages, layer=layer)]
        n, k = int(q["out_features"]), int(q["in_features"])
        if rows is not None:
            n = rows[1] - rows[0]
        if q["format"] == "int4":
            return self._int4(phase, q, weight, part, rows, x, y, m, n, k, layer, x_stride, y_stride)
        if q["format"] == "fp8":
            return self._fp8(phase, q, weight, part, rows, x, y, m, n, k, layer, x_stride, y_stride)
        raise QwenError(f"triton backend: quantized_linear {weight}: format {q['format']!r} has no kernel")

    def _int4(self, phase, q, weight, part, rows, x, y, m, n, k, layer, x_stride, y_stride):
        if q.get("has_g_idx") or q.get("has_pre_scale"):
            raise QwenError(f"triton backend: INT4 linear {weight}: act-order (g_idx) / pre-scale layouts have no kernel")
        if q.get("bits", 4) != 4:
            raise QwenError(f"triton backend: linear {weight}: {q['bits']}-bit codes (head-bits) have no kernel")
        g = int(q["group_size"])
        if k % g:
            raise QwenError(f"triton backend: INT4 linear {weight}: in_features {k} not a multiple of group {g}")
        qw = self.pack(f"{weight}{part}#qweight", f"{weight}#qweight", "u8", [n, k // 2], rows=rows)
        sc = self.pack(f"{weight}{part}#scales", f"{weight}#scales", "f32", [n, k // g], rows=rows)
        zero = bool(q.get("has_zeros"))
        z = self.pack(f"{weight}{part}#zeros", f"{weight}#zeros", "u8", [n, k // g], rows=rows) if zero else qw
        cfg = dict(_int4_config(phase))
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], g)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        cfg.update(GROUP_SIZE=g, HAS_ZERO=zero)
        grid = [f"cdiv({m}, {cfg['BLOCK_M']}) * cdiv({n}, {cfg['BLOCK_N']})"]
        return [Launch(f"gemm_int4_g{g}{'_zp' if zero else ''}_{phase}", "int4_gemm_kernel", grid,
                       [["x_ptr", x], ["qw_ptr", qw], ["s_ptr", sc], ["z_ptr", z], ["y_ptr", y], ["M", f"int:{m}"],
                        ["N", f"int:{n}"], ["K", f"int:{k}"], ["stride_xm", f"int:{x_stride or k}"],
                        ["stride_qn", f"int:{k // 2}"], ["stride_sn", f"int:{k // g}"],
                        ["stride_zn", f"int:{k // g}"], ["stride_ym", f"int:{y_stride or n}"]],
                       cfg, warps, stages, layer=layer)]

    def _fp8(self, phase, q, weight, part, rows, x, y, m, n, k, layer, x_stride, y_stride):
        if q.get("granularity") != "block" or q.get("activations") != "dynamic":
            raise QwenError(f"triton backend: FP8 linear {weight}: only block-128 weights with dynamic 1x128 "
                            f"activations have kernels (got {q.get('granularity')}/{q.get('activations')})")
        if rows is not None and (rows[0] % 128 or (rows[1] % 128 and rows[1] != int(q["out_features"]))):
            raise QwenError(f"triton backend: FP8 linear {weight}: the q/k/v row split {rows} is not on a "
                            f"128-row scale block boundary")
        srows = None if rows is None else [rows[0] // 128, triton.cdiv(rows[1], 128)]
        kb = triton.cdiv(k, 128)
        w = self.pack(f"{weight}{part}#weight", f"{weight}#weight", "f8e4m3", [n, k], rows=rows)
        s = self.pack(f"{weight}{part}#scale", f"{weight}#scale", "f32", [triton.cdiv(n, 128), kb], rows=srows)
        quant, xq, xs = self.act_quant(x, k, m, layer, x_stride)
        cfg = dict(_fp8_config(phase))
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = [f"cdiv({m}, {cfg['BLOCK_M']}) * cdiv({n}, {cfg['BLOCK_N']})"]
        gemm = Launch(f"gemm_fp8_block_{phase}", "fp8_block_gemm_kernel", grid,
                      [["a_ptr", "buf:" + xq], ["a_s_ptr", "buf:" + xs], ["w_ptr", w], ["w_s_ptr", s], ["y_ptr", y],
                       ["M", f"int:{m}"], ["N", f"int:{n}"], ["K", f"int:{k}"], ["stride_am", f"int:{k}"],
                       ["stride_asm", f"int:{kb}"], ["stride_wn", f"int:{k}"], ["stride_wsn", f"int:{kb}"],
                       ["stride_ym", f"int:{y_stride or n}"]], cfg, warps, stages, layer=layer)
        return [quant, gemm]


def _act_quant(self, x: str, k: int, m: str, layer, x_stride=None, names=("fp8_x", "fp8_scale")):
    """fp8_act_quant of x [m, k] into the pool's E4M3 buffers: (launch, codes buffer, scales buffer)."""
    kb = triton.cdiv(k, 128)
    xq = self.buf(names[0], m, k, "xq")
    xs = self.buf(names[1], m, kb, "f32")
    from qwen35c.backends.triton.gemm.fp8 import ACT_QUANT_ROWS as rows
    quant = Launch("fp8_act_quant", "fp8_act_quant_kernel", [f"cdiv({m}, {rows})", f"cdiv({k}, 128)"],
                   [["x_ptr", x], ["q_ptr", "buf:" + xq], ["s_ptr", "buf:" + xs], ["M", f"int:{m}"], ["K", f"int:{k}"],
                    ["stride_xm", f"int:{x_stride or k}"], ["stride_qm", f"int:{k}"], ["stride_sm", f"int:{kb}"]],
                   {"GROUP": 128, "ROWS": rows, "EMULATE_E4M3": "$EMULATE_E4M3"}, 8, 1, layer=layer)
    return quant, xq, xs


_Lowering.act_quant = _act_quant


def _dense_config(phase: str) -> dict:
    from qwen35c.backends.triton.gemm.dense import gemm_config
    return gemm_config(1 if phase == "decode" else 4096)


def _int4_config(phase: str) -> dict:
    from qwen35c.backends.triton.gemm.int4 import int4_gemm_config
    return int4_gemm_config(1 if phase == "decode" else 4096)


def _fp8_config(phase: str) -> dict:
    from qwen35c.backends.triton.gemm.fp8 import fp8_gemm_config
    return fp8_gemm_config(1 if phase == "decode" else 4096)


def _single(nodes, what: str):
    if not nodes:
        raise QwenError(f"triton backend: the graph has no {what}")
    return nodes[0]


class _Model(_Lowering):
    """The layer templates: one method per block kind, each returning its steps for a phase."""

    def dims(self):
        g = self.graph
        types = g.metadata.get("layer_types")
        if not types:
            raise QwenError("triton backend: graph metadata has no layer_types")
        self.types = list(types)
        emb = _single(self.by_op.get("embedding", []), "embedding")
        self.table = emb.inputs[0].producer.attrs["name"]
        vocab, hidden = self.shape(self.table)
        head = g.outputs[0].producer
        if head is None or head.op != "linear":
            raise QwenError("triton backend: the logits are not produced by a linear (the LM head)")
        self.lm_head = head.inputs[1].producer.attrs["name"]
        norms = self.by_op.get("rms_norm", [])
        self.eps = float(_single(norms, "rms_norm").attrs["eps"])
        m = dict(hidden=hidden, vocab=vocab, layers=len(types), layer_types=self.types, eps=self.eps)
        gdn = self.by_op.get("gated_deltanet", [])
        if gdn:
            a = gdn[0].attrs
            conv = gdn[0].inputs[3].producer
            width = self.shape(conv.inputs[0].producer.attrs["name"])[-1]
            m.update(gdn_k_heads=int(a["num_k_heads"]), gdn_v_heads=int(a["num_v_heads"]), gdn_k=int(a["head_k_dim"]),
                     gdn_v=int(a["head_v_dim"]), conv_width=width,
                     gdn_eps=float(_single(self.by_op.get("gated_rms_norm", []), "gated_rms_norm").attrs["eps"]))
        if "full_attention" in self.types:
            rope = _single(self.by_op.get("rope", []), "rope")
            i = self.types.index("full_attention")
            d = self.shape(f"model.layers.{i}.self_attn.q_norm.weight")[0]
            q_out = self._out(f"model.layers.{i}.self_attn.q_proj.weight")
            k_out = self._out(f"model.layers.{i}.self_attn.k_proj.weight")
            m.update(heads=q_out // (2 * d), kv_heads=k_out // d, head_dim=d, rope_theta=float(rope.attrs["theta"]),
                     rotary_dim=int(rope.attrs["rotary_dim"]))
        if self.by_op.get("moe_sort"):
            if len(self.by_op.get("div", [])) < len(self.by_op["moe_sort"]):
                raise QwenError("triton backend: a MoE layer without top-k renormalisation (norm_topk_prob=False) "
                                "has no kernel: moe_route always renormalises")
            m.update(experts=int(self.by_op["moe_sort"][0].attrs["num_experts"]),
                     top_k=int(_single(self.by_op.get("topk", []), "topk").attrs["k"]))
        self.m = m

    def _out(self, weight: str) -> int:
        q = self.quantized.get(weight)
        return int(q["out_features"]) if q else self.shape(weight)[0]

    # --- norms
    def rmsnorm(self, x: str, weight: str, layer, residual: str | None = None) -> Launch:
        from qwen35c.backends.triton.rmsnorm.kernel import rmsnorm_config
        h = self.m["hidden"]
        cfg = rmsnorm_config(h)
        warps = cfg.pop("num_warps")
        res = residual or x
        return Launch("rmsnorm_residual" if residual else "rmsnorm", "rmsnorm_kernel", ["M"],
                      [["x_ptr", x], ["res_ptr", res], ["w_ptr", self.hp(weight)], ["y_ptr", "buf:xn"],
                       ["res_out_ptr", res], ["N", f"int:{h}"], ["stride_x", f"int:{h}"], ["stride_res", f"int:{h}"],
                       ["stride_y", f"int:{h}"], ["stride_res_out", f"int:{h}"], ["eps", f"float:{self.eps!r}"]],
                      dict(cfg, HAS_RESIDUAL=residual is not None), warps, 1, layer=layer)

    # --- Gated DeltaNet
    def gdn(self, phase: str, i: int) -> list:
        from qwen35c.backends.triton.causal_conv1d.kernel import CONV_NUM_WARPS, conv_block_sizes
        from qwen35c.backends.triton.gated_delta_rule import chunk as ck
        from qwen35c.backends.triton.gated_delta_rule import fused_recurrent as fr
        from qwen35c.backends.triton.rmsnorm.kernel import gated_rmsnorm_config

        m, p = self.m, f"model.layers.{i}.linear_attn."
        H, HV, K, V, W = m["gdn_k_heads"], m["gdn_v_heads"], m["gdn_k"], m["gdn_v"], m["conv_width"]
        parts = {"q": (0, H * K), "k": (H * K, 2 * H * K), "v": (2 * H * K, 2 * H * K + HV * V)}
        steps = []
        for part, (r0, r1) in parts.items():
            y = "buf:" + self.buf(f"g{part}", "M", r1 - r0)
            steps += self.gemm(phase, "buf:xn", p + "in_proj_qkv.weight", y, "M", i, rows=[r0, r1], part="@" + part)
        for name, out, width in (("in_proj_z", "gz", HV * V), ("in_proj_b", "gb", HV), ("in_proj_a", "ga", HV)):
            steps += self.gemm(phase, "buf:xn", p + name + ".weight", "buf:" + self.buf(out, "M", width), "M", i)
        conv = p + "conv1d.weight"
        t_spec = 4096 if phase == "prefill" else 1
        for part, (r0, r1) in parts.items():
            c = r1 - r0
            w = self.pack(f"{conv}@{part}", conv, "bf16", [c, W], rows=[r0, r1], reshape=[-1, W])
            bt, bc, bs = conv_block_sizes(t_spec, c, W)
            state = f"state:layers.{i}.conv.{part}"
            steps.append(Launch(
                "causal_conv1d" if phase == "prefill" else "causal_conv1d_update", "causal_conv1d_fwd_kernel",
                [f"cdiv(T, {bt})", f"cdiv({c}, {bc})", "B"],
                [["x", f"buf:g{part}"], ["weight", w], ["bias", "dummy"], ["h0", state], ["ht", state],
                 ["lengths", "ctl:lengths" if phase == "prefill" else "dummy"],
                 ["y", "buf:" + self.buf(f"c{part}", "M", c)], ["T", "int:T"], ["C", f"int:{c}"]],
                dict(W=W, BT=bt, BC=bc, BS=bs, HAS_BIAS=False, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True,
                     HAS_LENGTHS=phase == "prefill", USE_SILU=True), CONV_NUM_WARPS, 1, layer=i))
        a_log, dt_bias = self.hp(p + "A_log", "f32"), self.hp(p + "dt_bias", "f32")
        rec = f"state:layers.{i}.recurrent"
        scale = f"float:{K ** -0.5!r}"
        out = "buf:" + self.buf("gdn_o", "M", HV * V)
        gates = dict(USE_GATE=True, USE_DT_BIAS=True, USE_BETA_SIGMOID=True)
        if phase == "prefill":
            BK, BVh, BVo = ck.chunk_block_sizes(K, V)
            G, beta = "buf:" + self.buf("gdn_G", "M", HV, "f32"), "buf:" + self.buf("gdn_beta", "M", HV, "f32")
            ainv = "buf:" + self.buf("gdn_Ainv", "M", HV * CHUNK, "f32")
            h = "buf:" + self.buf("gdn_h", "NCMAX", HV * K * V, "f32")
            v_new = "buf:" + self.buf("gdn_vnew", "M", HV * V, "f32")
            common = dict(H=H, HV=HV, K=K, BT=CHUNK, BK=BK, USE_L2NORM=True)
            steps += [
                Launch("gdn_chunk_prep", "gdn_chunk_prep_kernel", ["NC", f"{HV}"],
                       [["k", "buf:ck"], ["g", "buf:ga"], ["beta", "buf:gb"], ["A_log", a_log], ["dt_bias", dt_bias],
                        ["G_out", G], ["beta_out", beta], ["Ainv", ainv], ["cu_seqlens", "ctl:cu_seqlens"],
                        ["chunk_indices", "ctl:chunk_indices"]],
                       dict(common, DOT_PRECISION=ck.PREP_DOT_PRECISION, **gates), ck.PREP_NUM_WARPS, 1,
                       per_row=True, layer=i),
                Launch("gdn_chunk_fwd_h", "gdn_chunk_fwd_h_kernel", [f"cdiv({V}, {BVh})", f"N * {HV}"],
                       [["k", "buf:ck"], ["v", "buf:cv"], ["G", G], ["beta", beta], ["Ainv", ainv], ["h", h],
                        ["v_new", v_new], ["h0", rec], ["ht", rec], ["cu_seqlens", "ctl:cu_seqlens"],
                        ["chunk_offsets", "ctl:chunk_offsets"]],
                       dict(common, V=V, BV=BVh, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True,
                            DOT_PRECISION=ck.FWD_DOT_PRECISION), ck.FWD_H_NUM_WARPS, 1, per_row=True, layer=i),
                Launch("gdn_chunk_fwd_o", "gdn_chunk_fwd_o_kernel", [f"cdiv({V}, {BVo})", "NC", f"{HV}"],
                       [["q", "buf:cq"], ["k", "buf:ck"], ["G", G], ["h", h], ["v_new", v_new], ["o", out],
                        ["cu_seqlens", "ctl:cu_seqlens"], ["chunk_indices", "ctl:chunk_indices"], ["scale", scale]],
                       dict(common, V=V, BV=BVo, DOT_PRECISION=ck.FWD_DOT_PRECISION), ck.FWD_O_NUM_WARPS, 1,
                       per_row=True, layer=i, pads=[out.split(":", 1)[1]]),
            ]
        else:
            BK, BV = fr.recurrent_block_sizes(K, V)
            steps.append(Launch(
                "gdn_recurrent", "gdn_fused_recurrent_fwd_kernel", [f"cdiv({V}, {BV})", f"B * {HV}"],
                [["q", "buf:cq"], ["k", "buf:ck"], ["v", "buf:cv"], ["g", "buf:ga"], ["beta", "buf:gb"],
                 ["A_log", a_log], ["dt_bias", dt_bias], ["o", out], ["h0", rec], ["ht", rec], ["hs", "dummy"],
                 ["cu_seqlens", "dummy"], ["scale", scale], ["T", "int:1"]],
                dict(H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, USE_L2NORM=True, **gates, USE_INITIAL_STATE=True,
                     STORE_FINAL_STATE=True, STORE_STEP_STATES=False, IS_VARLEN=False),
                fr.RECURRENT_NUM_WARPS, 1, layer=i))
        cfg = gated_rmsnorm_config(V)
        warps = cfg.pop("num_warps")
        gn = "buf:" + self.buf("gn", "M", HV * V)
        steps.append(Launch("gated_rmsnorm", "gated_rmsnorm_kernel", [f"cdiv(M * {HV}, {cfg['ROWS_PER_PROG']})"],
                            [["x_ptr", out], ["z_ptr", "buf:gz"], ["w_ptr", self.hp(p + "norm.weight")], ["y_ptr", gn],
                             ["ROWS", f"int:M * {HV}"], ["N", f"int:{V}"], ["eps", f"float:{m['gdn_eps']!r}"]],
                            cfg, warps, 1, layer=i))
        steps += self.gemm(phase, gn, p + "out_proj.weight", "buf:out", "M", i)
        return steps

    # --- gated attention
    def attention(self, phase: str, i: int) -> list:
        from qwen35c.backends.triton.attention import kernel as ak
        from qwen35c.backends.triton.elementwise.kernel import kv_cache_write_config
        from qwen35c.backends.triton.rope.kernel import rope_config

        m, p = self.m, f"model.layers.{i}.self_attn."
        hq, hkv, d = m["heads"], m["kv_heads"], m["head_dim"]
        group = hq // hkv
        qg = "buf:" + self.buf("qg", "M", hq * 2 * d)
        kp, vp = "buf:" + self.buf("kp", "M", hkv * d), "buf:" + self.buf("vp", "M", hkv * d)
        steps = self.gemm(phase, "buf:xn", p + "q_proj.weight", qg, "M", i)
        steps += self.gemm(phase, "buf:xn", p + "k_proj.weight", kp, "M", i)
        steps += self.gemm(phase, "buf:xn", p + "v_proj.weight", vp, "M", i)
        inv_freq = self.pack("rope.inv_freq", "rope.inv_freq", "f32", [m["rotary_dim"] // 2])
        for which, src, heads, stride_t, stride_h, norm in (("q", qg, hq, hq * 2 * d, 2 * d, "q_norm"),
                                                             ("k", kp, hkv, hkv * d, d, "k_norm")):
            cfg = rope_config(heads, d)
            warps = cfg.pop("num_warps")
            steps.append(Launch(
                f"qk_norm_rope_{which}", "rope_kernel", ["M", f"cdiv({heads}, {cfg['BLOCK_H']})"],
                [["x_ptr", src], ["w_ptr", self.hp(p + norm + ".weight")], ["pos_ptr", "ctl:pos"],
                 ["inv_freq_ptr", inv_freq], ["y_ptr", "buf:" + self.buf(which, "M", heads * d)], ["H", f"int:{heads}"],
                 ["D", f"int:{d}"], ["stride_xt", f"int:{stride_t}"], ["stride_xh", f"int:{stride_h}"],
                 ["eps", f"float:{self.eps!r}"]],
                dict(cfg, ROTARY_DIM=m["rotary_dim"], HAS_NORM=True), warps, 1, layer=i))
        cfg = kv_cache_write_config(hkv, d)
        warps = cfg.pop("num_warps")
        for src, cache in (("buf:k", "key_cache"), (vp, "value_cache")):
            steps.append(Launch(
                "kv_cache_write", "kv_cache_write_kernel", ["M", f"cdiv({hkv}, {cfg['BLOCK_H']})"],
                [["src_ptr", src], ["cache_ptr", f"state:layers.{i}.{cache}"], ["q_start_ptr", "ctl:q_start"],
                 ["lengths_ptr", "ctl:lengths"], ["T", "int:T"], ["H", f"int:{hkv}"], ["stride_st", f"int:{hkv * d}"],
                 ["stride_sh", f"int:{d}"], ["stride_cb", f"int:{hkv} * S * {d}"], ["stride_ch", f"int:S * {d}"],
                 ["stride_cs", f"int:{d}"]], cfg, warps, 1, layer=i))
        gate = f"{qg}+{d}"
        attn = "buf:" + self.buf("attn", "M", hq * d)
        scale = f"float:{d ** -0.5 * ak.LOG2E!r}"
        if phase == "prefill":
            cfg = ak.prefill_config(d)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            strides = []
            for t, (row, head) in (("q", (hq * d, d)), ("g", (hq * 2 * d, 2 * d)), ("o", (hq * d, d))):
                strides += [[f"stride_{t}b", f"int:T * {row}"], [f"stride_{t}t", f"int:{row}"], [f"stride_{t}h", f"int:{head}"]]
            for t in "kv":      # keys and values from the cache (this step's just written): any q_start
                strides += [[f"stride_{t}b", f"int:{hkv} * S * {d}"], [f"stride_{t}t", f"int:{d}"],
                            [f"stride_{t}h", f"int:S * {d}"]]
            steps.append(Launch(
                "attn_prefill", "attn_prefill_kernel", [f"cdiv(T, {cfg['BLOCK_M']})", f"B * {hq}"],
                [["q_ptr", "buf:q"], ["k_ptr", f"state:layers.{i}.key_cache"], ["v_ptr", f"state:layers.{i}.value_cache"],
                 ["g_ptr", gate], ["o_ptr", attn], ["start_ptr", "ctl:q_start"], ["kv_lens_ptr", "ctl:kv_lens"],
                 ["T", "int:T"], ["HQ", f"int:{hq}"], ["GROUP", f"int:{group}"], *strides, ["qk_scale", scale]],
                dict(cfg, HEAD_DIM=d), warps, stages, layer=i))
        else:
            cfg = ak.decode_config(group)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            part_o = "buf:" + self.buf("attn_part_o", f"B * {hq} * NSPLIT", d, "f32")
            part_lse = "buf:" + self.buf("attn_part_lse", f"B * {hq} * NSPLIT", 1, "f32")
            cache = [["stride_kb", f"int:{hkv} * S * {d}"], ["stride_kh", f"int:S * {d}"], ["stride_ks", f"int:{d}"]]
            steps.append(Launch(
                "attn_decode_split", "attn_decode_split_kernel", [f"B * {hkv}", "NSPLIT"],
                [["q_ptr", "buf:q"], ["k_ptr", f"state:layers.{i}.key_cache"], ["v_ptr", f"state:layers.{i}.value_cache"],
                 ["lens_ptr", "ctl:kv_lens"], ["part_o_ptr", part_o], ["part_lse_ptr", part_lse],
                 ["HKV", f"int:{hkv}"], ["GROUP", f"int:{group}"], ["NUM_SPLITS", "int:NSPLIT"],
                 ["stride_qb", f"int:{hq * d}"], ["stride_qh", f"int:{d}"], *cache,
                 *[[n.replace("k", "v", 1) if n.startswith("stride_k") else n, b] for n, b in cache], ["qk_scale", scale]],
                dict(cfg, HEAD_DIM=d), warps, stages, layer=i))
            steps.append(Launch(
                "attn_decode_combine", "attn_decode_combine_kernel", [f"B * {hq}"],
                [["part_o_ptr", part_o], ["part_lse_ptr", part_lse], ["g_ptr", gate], ["o_ptr", attn],
                 ["HQ", f"int:{hq}"], ["NUM_SPLITS", "int:NSPLIT"], ["stride_gb", f"int:{hq * 2 * d}"],
                 ["stride_gh", f"int:{2 * d}"], ["stride_ob", f"int:{hq * d}"], ["stride_oh", f"int:{d}"]],
                {"HEAD_DIM": d, "BLOCK_S": 64}, 4, 1, layer=i))
        steps += self.gemm(phase, attn, p + "o_proj.weight", "buf:out", "M", i)
        return steps

    # --- MLPs
    def swiglu_mlp(self, phase: str, prefix: str, out: str, layer: int) -> list:
        from qwen35c.backends.triton.elementwise.kernel import swiglu_config
        inter = self._out(prefix + "gate_proj.weight")
        gate, up, act = ("buf:" + self.buf(n, "M", inter) for n in ("gate", "up", "act"))
        # gate/up/act are shared by the dense MLP and the shared expert: row strides are the buffers' widths
        steps = self.gemm(phase, "buf:xn", prefix + "gate_proj.weight", gate, "M", layer, y_stride="$W_gate")
        steps += self.gemm(phase, "buf:xn", prefix + "up_proj.weight", up, "M", layer, y_stride="$W_up")
        cfg = swiglu_config(inter)
        warps = cfg.pop("num_warps")
        steps.append(Launch("swiglu", "swiglu_kernel", ["M", f"cdiv({inter}, {cfg['BLOCK_N']})"],
                            [["g_ptr", gate], ["u_ptr", up], ["y_ptr", act], ["N", f"int:{inter}"],
                             ["stride_g", "int:$W_gate"], ["stride_u", "int:$W_up"], ["stride_y", "int:$W_act"]],
                            cfg, warps, 1, layer=layer))
        steps += self.gemm(phase, act, prefix + "down_proj.weight", out, "M", layer,
                           x_stride="$W_act")
        return steps

    def moe(self, phase: str, i: int) -> list:
        from qwen35c.backends.triton.moe.kernel import expert_gemm_config, route_config

        m, p = self.m, f"model.layers.{i}.mlp."
        h, e, k = m["hidden"], m["experts"], m["top_k"]
        w13, w2 = p + "experts.gate_up_proj", p + "experts.down_proj"
        inter = self.shape(w2)[2]
        router = "buf:" + self.buf("router", "M", e)
        steps = self.gemm(phase, "buf:xn", p + "gate.weight", router, "M", i)
        cfg = route_config(e, k)
        warps = cfg.pop("num_warps")
        topk_w, topk_ids = "buf:" + self.buf("topk_w", "M", k, "f32"), "buf:" + self.buf("topk_ids", "M", k, "i32")
        steps.append(Launch("moe_route", "moe_route_kernel", [f"cdiv(M, {cfg['ROWS']})"],
                            [["logits_ptr", router], ["w_out_ptr", topk_w], ["id_out_ptr", topk_ids], ["N", "int:M"],
                             ["E", f"int:{e}"], ["stride_l", "int:$W_router"]],
                            dict(cfg, TOP_K=k), warps, 1, layer=i))
        cfg = expert_gemm_config(8 if phase == "decode" else 4096 * 8)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        bm = cfg["BLOCK_M"]
        steps.append(HostOp("moe_align", {"ids": topk_ids, "experts": e, "block_m": bm}, layer=i))
        moe_act = "buf:" + self.buf("moe_act", "CAP", inter)
        moe_y = "buf:" + self.buf("moe_y", "SLOTS", h)
        sort = [["sorted_ptr", "ctl:sorted_slots"], ["block_expert_ptr", "ctl:block_expert"],
                ["num_padded_ptr", "ctl:num_padded"]]
        qfmt = None
        if w13 in self.not_lowered:
            from qwen35c.backends.triton.experts import EXPERT_ALGORITHM, why_not

            reason = why_not(self.expert_fmt, h, inter)
            if reason is None:
                qfmt = self.expert_fmt
                note = (f"routed experts quantized at pack time: {qfmt[0]} "
                        f"{'block-128' if qfmt[0] == 'fp8' else f'g{qfmt[1]} symmetric'}, {EXPERT_ALGORITHM}")
            else:
                note = f"routed experts stay bf16: {reason}"
            if note not in self.notes:
                self.notes.append(note)
        if qfmt is not None:
            return steps + self.moe_quantized(phase, i, qfmt, sort, topk_w, moe_act, moe_y)
        steps.append(Launch(f"moe_gate_up_{phase}", "moe_gate_up_kernel", [f"CAP // {bm}", f"cdiv({inter}, {cfg['BLOCK_N']})"],
                            [["x_ptr", "buf:xn"], ["w_ptr", self.hp(w13)], *sort, ["y_ptr", moe_act], ["H", f"int:{h}"],
                             ["INTER", f"int:{inter}"], ["NUM_SLOTS", "int:SLOTS"], ["TOP_K", f"int:{k}"],
                             ["stride_xm", f"int:{h}"], ["stride_we", f"int:{2 * inter * h}"], ["stride_wn", f"int:{h}"],
                             ["stride_ym", "int:$W_moe_act"]], cfg, warps, stages, layer=i))
        steps.append(Launch(f"moe_down_{phase}", "moe_down_kernel", [f"CAP // {bm}", f"cdiv({h}, {cfg['BLOCK_N']})"],
                            [["a_ptr", moe_act], ["w_ptr", self.hp(w2)], *sort, ["topk_w_ptr", topk_w], ["y_ptr", moe_y],
                             ["H", f"int:{h}"], ["INTER", f"int:{inter}"], ["NUM_SLOTS", "int:SLOTS"],
                             ["stride_am", "int:$W_moe_act"], ["stride_we", f"int:{h * inter}"],
                             ["stride_wn", f"int:{inter}"], ["stride_ym", f"int:{h}"]],
                            dict(cfg, HAS_WEIGHT=True), warps, stages, layer=i))
        return steps + self.moe_tail(phase, i)

    def moe_tail(self, phase: str, i: int) -> list:
        """The shared expert (and its sigmoid gate) and the weighted combine into `out`."""
        m, p = self.m, f"model.layers.{i}.mlp."
        h, k = m["hidden"], m["top_k"]
        moe_y = "buf:moe_y"
        steps = []
        shared = self.has(p + "shared_expert.gate_proj.weight")
        if shared:
            steps += self.swiglu_mlp(phase, p + "shared_expert.", "buf:" + self.buf("shared", "M", h), i)
            steps += self.gemm(phase, "buf:xn", p + "shared_expert_gate.weight",
                               "buf:" + self.buf("shared_gate", "M", 1), "M", i)
        block_h = min(1024, triton.next_power_of_2(h))
        steps.append(Launch("moe_combine_shared" if shared else "moe_combine", "moe_combine_kernel",
                            ["M", f"cdiv({h}, {block_h})"],
                            [["y_ptr", moe_y], ["shared_ptr", "buf:shared" if shared else "dummy"],
                             ["gate_ptr", "buf:shared_gate" if shared else "dummy"], ["out_ptr", "buf:out"],
                             ["H", f"int:{h}"], ["stride_gate", "int:1"]],
                            dict(TOP_K=k, HAS_SHARED=shared, BLOCK_H=block_h), 4, 1, layer=i))
        return steps

    def moe_quantized(self, phase: str, i: int, qfmt, sort, topk_w, moe_act, moe_y) -> list:
        """Routed experts over FP8 / INT4 stacked weights (moe/quantized.py), then the shared expert + combine."""
        from qwen35c.backends.triton.moe.quantized import quantized_expert_config

        m, p = self.m, f"model.layers.{i}.mlp."
        h, e, k = m["hidden"], m["experts"], m["top_k"]
        w13, w2 = p + "experts.gate_up_proj", p + "experts.down_proj"
        inter = self.shape(w2)[2]
        kind, group = qfmt
        cfg = quantized_expert_config(8 if phase == "decode" else 4096 * 8, kind, group)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        bm = cfg["BLOCK_M"]
        steps = []
        if kind == "fp8":
            nbi, kbh, nbh, kbi = (triton.cdiv(inter, 128), triton.cdiv(h, 128), triton.cdiv(h, 128),
                                  triton.cdiv(inter, 128))
            parts13 = [("weight", "f8e4m3", [e, 2 * inter, h]), ("scale", "f32", [e, 2 * nbi, kbh])]
            parts2 = [("weight", "f8e4m3", [e, h, inter]), ("scale", "f32", [e, nbh, kbi])]
            w_strides13, s_strides13 = (2 * inter * h, h), (2 * nbi * kbh, kbh)
            w_strides2, s_strides2 = (h * inter, inter), (nbh * kbi, kbi)
            quant, xq, xs = self.act_quant("buf:xn", h, "M", i)
            steps.append(quant)
            x, xs_arg, xs_stride = "buf:" + xq, "buf:" + xs, triton.cdiv(h, 128)
        else:
            parts13 = [("qweight", "u8", [e, 2 * inter, h // 2]), ("scales", "f32", [e, 2 * inter, h // group])]
            parts2 = [("qweight", "u8", [e, h, inter // 2]), ("scales", "f32", [e, h, inter // group])]
            w_strides13, s_strides13 = (2 * inter * h // 2, h // 2), (2 * inter * (h // group), h // group)
            w_strides2, s_strides2 = (h * inter // 2, inter // 2), (h * (inter // group), inter // group)
            nbi = inter // group
            x, xs_arg, xs_stride = "buf:xn", "dummy", 0
        tag = f"{kind}:{group}"
        w13_args = [self.pack(f"{w13}#{part}", w13, dt, shape, quantize=f"{tag}:gate_up:{part}")
                    for part, dt, shape in parts13]
        w2_args = [self.pack(f"{w2}#{part}", w2, dt, shape, quantize=f"{tag}:down:{part}")
                   for part, dt, shape in parts2]
        const = dict(cfg, FORMAT=kind, GROUP=group)
        steps.append(Launch(f"moe_gate_up_{kind}_{phase}", "moe_gate_up_q_kernel",
                            [f"CAP // {bm}", f"cdiv({inter}, {cfg['BLOCK_N']})"],
                            [["x_ptr", x], ["xs_ptr", xs_arg], ["w_ptr", w13_args[0]], ["s_ptr", w13_args[1]], *sort,
                             ["y_ptr", moe_act], ["H", f"int:{h}"], ["INTER", f"int:{inter}"], ["NUM_SLOTS", "int:SLOTS"],
                             ["TOP_K", f"int:{k}"], ["GATE_SCALE_ROWS", f"int:{nbi}"], ["stride_xm", f"int:{h}"],
                             ["stride_xsm", f"int:{xs_stride}"], ["stride_we", f"int:{w_strides13[0]}"],
                             ["stride_wn", f"int:{w_strides13[1]}"], ["stride_se", f"int:{s_strides13[0]}"],
                             ["stride_sn", f"int:{s_strides13[1]}"], ["stride_ym", "int:$W_moe_act"]],
                            const, warps, stages, layer=i))
        if kind == "fp8":
            quant, aq, as_ = self.act_quant(moe_act, inter, "CAP", i, "$W_moe_act", ("fp8_moe_act", "fp8_moe_scale"))
            steps.append(quant)
            a, as_arg, as_stride = "buf:" + aq, "buf:" + as_, triton.cdiv(inter, 128)
            a_stride = inter
        else:
            a, as_arg, as_stride, a_stride = moe_act, "dummy", 0, "$W_moe_act"
        steps.append(Launch(f"moe_down_{kind}_{phase}", "moe_down_q_kernel",
                            [f"CAP // {bm}", f"cdiv({h}, {cfg['BLOCK_N']})"],
                            [["a_ptr", a], ["as_ptr", as_arg], ["w_ptr", w2_args[0]], ["s_ptr", w2_args[1]], *sort,
                             ["topk_w_ptr", topk_w], ["y_ptr", moe_y], ["H", f"int:{h}"], ["INTER", f"int:{inter}"],
                             ["NUM_SLOTS", "int:SLOTS"], ["stride_am", f"int:{a_stride}"],
                             ["stride_asm", f"int:{as_stride}"], ["stride_we", f"int:{w_strides2[0]}"],
                             ["stride_wn", f"int:{w_strides2[1]}"], ["stride_se", f"int:{s_strides2[0]}"],
                             ["stride_sn", f"int:{s_strides2[1]}"], ["stride_ym", f"int:{h}"]],
                            const, warps, stages, layer=i))
        return steps + self.moe_tail(phase, i)

    # --- the whole model, one phase
    def program(self, phase: str) -> list:
        steps: list = [HostOp("embedding", {"table": self.hp(self.table), "out": "buf:" + self.buf("resid", "M", self.m["hidden"])}),
                       HostOp("positions", {"phase": phase})]
        if phase == "prefill" and "linear_attention" in self.types:
            steps.append(HostOp("gdn_index", {"chunk": CHUNK}))
        self.buf("xn", "M", self.m["hidden"])
        self.buf("out", "M", self.m["hidden"])
        for i, kind in enumerate(self.types):
            p = f"model.layers.{i}."
            steps.append(self.rmsnorm("buf:out", p + "input_layernorm.weight", i, "buf:resid") if i else
                         self.rmsnorm("buf:resid", p + "input_layernorm.weight", i))
            if kind == "linear_attention":
                steps += self.gdn(phase, i)
            elif kind == "full_attention":
                steps += self.attention(phase, i)
            else:
                raise QwenError(f"triton backend: layer {i} kind {kind!r} has no template")
            steps.append(self.rmsnorm("buf:out", p + "post_attention_layernorm.weight", i, "buf:resid"))
            if self.has(p + "mlp.gate_proj.weight"):
                steps += self.swiglu_mlp(phase, p + "mlp.", "buf:out", i)
            elif self.has(p + "mlp.experts.gate_up_proj"):
                steps += self.moe(phase, i)
            else:
                raise QwenError(f"triton backend: layer {i} has neither a dense MLP nor routed experts")
        steps.append(self.rmsnorm("buf:out", "model.norm.weight", None, "buf:resid"))
        head_in = "buf:" + self.buf("head_in", "R", self.m["hidden"])
        steps.append(HostOp("select_rows", {"x": "buf:xn", "out": head_in}))
        logits = "buf:" + self.buf("logits", "R", self.m["vocab"])
        steps += self.gemm(phase, head_in, self.lm_head, logits, "R", None)
        return steps


def lower(graph) -> Plan:
    """The stateful IR (TRITON_PIPELINE) -> Plan. Raises QwenError naming the op or weight at fault."""
    from qwen35c.backends.triton import mode

    mode.ensure()                      # the launch configs below come from the kernel modules
    low = _Model(graph, "act")
    low.scan()
    low.dims()
    programs = {phase: low.program(phase) for phase in ("prefill", "decode")}
    widths = {name: b["shape"][1] for name, b in low.buffers.items()}

    def settle(binding: str) -> str:            # "$W_<buffer>": the buffer's final (widest) row stride
        return re.sub(r"\$W_(\w+)", lambda m: str(widths[m.group(1)]), binding)

    configs: dict[str, list] = {}          # one spec name per compiled configuration
    for steps in programs.values():
        for s in steps:
            if isinstance(s, Launch):
                s.args = [[p, settle(b)] for p, b in s.args]
                key = json.dumps([s.kernel, s.const, s.num_warps, s.num_stages], sort_keys=True)
                seen = configs.setdefault(s.spec, [])
                if key not in seen:
                    seen.append(key)
                index = seen.index(key)
                if index:
                    s.spec = f"{s.spec}.{index}"
    m = low.m
    states = []
    for i, kind in enumerate(low.types):
        if kind == "linear_attention":
            H, HV, K, V, W = m["gdn_k_heads"], m["gdn_v_heads"], m["gdn_k"], m["gdn_v"], m["conv_width"]
            for part, c in (("q", H * K), ("k", H * K), ("v", HV * V)):
                states.append({"name": f"layers.{i}.conv.{part}", "ir": f"layers.{i}.conv", "shape": ["B", c, W - 1],
                               "dtype": "act", "layout": f"[B, C_{part}, W-1] channels {part} of the IR's [B, C, W-1]"})
            states.append({"name": f"layers.{i}.recurrent", "ir": f"layers.{i}.recurrent", "shape": ["B", HV, K, V],
                           "dtype": "f32", "layout": "[B, HV, K, V] K-major, fp32, in place"})
        else:
            for cache in ("key_cache", "value_cache"):
                states.append({"name": f"layers.{i}.{cache}", "ir": f"layers.{i}.{cache}",
                               "shape": ["B", m["kv_heads"], "S", m["head_dim"]], "dtype": "act",
                               "layout": "[B, Hkv, S, D], positions q_start.. written by kv_cache_write"})
    variables = {
        "prefill": {"M": "B * T", "NCMAX": f"B * cdiv(T, {CHUNK})"},
        "decode": {"M": "B", "NCMAX": "0"},
    }
    if "experts" in m:
        k, e = m["top_k"], m["experts"]
        from qwen35c.backends.triton.moe.kernel import expert_gemm_config
        for phase, slots in (("prefill", 4096 * 8), ("decode", 8)):
            bm = expert_gemm_config(slots)["BLOCK_M"]
            variables[phase].update(SLOTS=f"M * {k}", CAP=f"cdiv(SLOTS + min({e}, SLOTS) * {bm - 1}, {bm}) * {bm}")
    notes = list(low.notes)
    ordered = {k: [[name, f] for name, f in v.items()] for k, v in variables.items()}   # order matters
    return Plan(m, low.packed, low.buffers, states, ordered, programs, notes)


def plan_text(directory) -> str:
    """The text form of an artifact's plan (for `qwen35c plan ART`)."""
    from pathlib import Path

    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise QwenError(f"{directory / 'manifest.json'}: cannot read ({err})") from None
    backend = manifest.get("backend", {})
    if backend.get("name") != "triton":
        raise QwenError(f"{directory}: not a triton artifact (backend {backend.get('name')!r})")
    return load_plan(directory, backend).text()


def load_plan(directory, backend: dict) -> Plan:
    from pathlib import Path

    file = Path(directory) / backend["plan"]
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise QwenError(f"{file}: cannot read the plan ({err})") from None
    return Plan.from_json(data)


__all__ = ["HOST_OPS", "PLAN_FORMAT", "Plan", "Launch", "HostOp", "PackedWeight", "SUPPORTED_OPS",
           "TRITON_PIPELINE", "evaluate", "load_plan", "lower", "plan_text"]
