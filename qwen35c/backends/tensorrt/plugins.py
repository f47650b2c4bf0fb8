"""The TensorRT plugins of a qwen35c bundle: what TensorRT lacks for Qwen3.5, one Triton kernel each.

    qwen35c::CausalConv1d    the GDN's depthwise causal conv + SiLU over concat(state, x), and the
                             conv state at each row's end (lengths): x [B, T, C], weight [C, W],
                             state [B, C, W-1], lengths i64[B] -> y [B, T, C], state_out [B, C, W-1]
    qwen35c::GatedDeltaRule  the gated delta rule, token by token, with the gates, the q/k L2 norms and
                             the dk^-0.5 scale inside: q, k [B, T, H*K], v [B, T, HV*V], a, b [B, T, HV]
                             (raw projections), A_log, dt_bias [HV], state fp32 [B, HV, K, V] ->
                             o [B, T, HV*V], state_out (aliased to state: updated in place)
    qwen35c::Fp8Linear       y = x @ W^T for FP8 block-128 weights (E4M3 bytes, typed uint8 in the graph,
                             fp32 `weight_scale_inv` [N/128, K/128]) with x quantized per token per
                             128-channel group inside the kernel (the official Qwen FP8 recipe):
                             x [M, K], weight [N, K], scale -> y [M, N]
    qwen35c::Fp8ExpertLinear the same for routed experts, one slot (token, choice) a row: x [S, K],
                             experts i64[S], weight [E, N, K] (E4M3 bytes), scale [E, N/128, K/128]
                             -> y [S, N]

A step whose a and b are -inf leaves the recurrent state exactly as it is (softplus(-inf) = 0, so the
decay is exp(-0) = 1; sigmoid(-inf) = 0, so the update is 0): the bundle masks right padding that way.
The conv's state_out is a second buffer, not an alias: its T-blocks run in parallel and the block that
writes the new state may run before one that reads the old.

Why one kernel per plugin: a TensorRT ahead-of-time plugin (`tensorrt.plugin.aot_impl`) returns one
compiled kernel and its launch; the engine then runs without Python. Per-model constants (heads, head
dims, conv width, scale) are baked into the kernel's specialisation (AOT plugins do not keep their
attributes in the engine); the ONNX nodes carry them too, for the parser and the CPU check.
TensorRT launches an AOT kernel with (input pointers, extra scalar arguments, output pointers): the
adapters in `kernels.py` take that order and call the library's kernels.

This module describes the plugins without TensorRT or a GPU (`python -m qwen35c.backends.tensorrt.plugins
--describe BUNDLE`), holds their reference implementations (the kernels' naive twins with the plugin's
exact binding: the CPU check runs them as ONNX Runtime custom ops, the tests run each adapter kernel
under the interpreter against them), compiles the adapters to PTX for the bundle's SM (in a child
process without TRITON_INTERPRET) and, where TensorRT >= 10.9 is installed, registers them
(`register_tensorrt`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qwen35c.errors import QwenError

NAMESPACE = "qwen35c"
PLUGIN_DIR = "plugins"
MIN_TENSORRT = (10, 9)


@dataclass(frozen=True)
class Port:
    name: str
    dtype: str                       # f32 | i64 | e4m3 (E4M3 bytes: uint8 in the graph, fp8 in the kernel)
    shape: tuple[str, ...]           # dimension formulas over the inputs' dims ("x_0": dim 0 of x)
    aliases: str | None = None       # an output written in place into this input


@dataclass(frozen=True)
class PluginDef:
    op: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attrs: dict                      # per-model constants: ONNX attributes, baked into the kernel
    kernel: str                      # adapter in kernels.py
    constexprs: dict
    scalars: tuple[tuple[str, str], ...]   # extra i32 kernel arguments: (name, formula)
    grid: tuple[str, str, str]
    num_warps: int
    doc: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        return f"{NAMESPACE}::{self.op}"

    @property
    def spec(self) -> str:
        """The compiled specialisation's name: the op and a digest of its constants."""
        digest = hashlib.sha256(json.dumps([self.attrs, self.constexprs, self.num_warps],
                                           sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.op}_{digest}"

    def to_json(self) -> dict:
        return {"id": self.id, "spec": self.spec, **asdict(self)}


# ------------------------------------------------------------------------------------- formulas

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _formula(formula: str, dim, cdiv):
    """Walk a dimension formula (ints, `port_axis` names, + - * //, cdiv(a, b)); `dim(port, axis)`
    gives a name's value, `cdiv` the ceiling division, over ints or TensorRT's symbolic dims."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            port, _, axis = node.id.rpartition("_")
            return dim(port, int(axis))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "cdiv" and len(node.args) == 2:
            return cdiv(ev(node.args[0]), ev(node.args[1]))
        raise QwenError(f"plugin formula {formula!r}: unsupported expression")

    return ev(ast.parse(formula, mode="eval"))


def evaluate(formula: str, dims: dict[str, list[int]]) -> int:
    """A dimension formula over concrete input shapes."""
    return _formula(formula, lambda port, axis: int(dims[port][axis]), lambda a, b: -(-a // b))


# ------------------------------------------------------------------------------------ the plugins

def model_dims(node_attrs: dict, conv_width: int) -> dict:
    """The per-model constants of the plugins, from a fused `gated_deltanet` node's attributes."""
    a = node_attrs
    return {"H": int(a["num_k_heads"]), "HV": int(a["num_v_heads"]), "K": int(a["head_k_dim"]),
            "V": int(a["head_v_dim"]), "W": int(conv_width)}


def plugin_defs(dims: dict | None) -> list[PluginDef]:
    """The plugins for one model's GDN dims (see `model_dims`; None: a model without GDN layers)."""
    from qwen35c.backends.triton.mode import ensure

    ensure()
    from qwen35c.backends.tensorrt.kernels import FP8_TILE, conv_block_sizes, recurrent_block_sizes

    bm, bn = FP8_TILE
    fp8 = PluginDef(
        "Fp8Linear",
        (Port("x", "f32", ("x_0", "x_1")), Port("weight", "e4m3", ("weight_0", "x_1")),
         Port("scale", "f32", ("cdiv(weight_0, 128)", "cdiv(x_1, 128)"))),
        (Port("y", "f32", ("x_0", "weight_0")),),
        {}, "fp8_plugin_kernel", {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 1, "EMULATE_E4M3": False},
        (("M", "x_0"), ("N", "weight_0"), ("K", "x_1")), (f"cdiv(x_0, {bm}) * cdiv(weight_0, {bn})", "1", "1"), 4,
        "y = fp8 block-128 GEMM of x quantized per token per 128 channels (E4M3, s = amax/448) and W")
    experts = PluginDef(
        "Fp8ExpertLinear",
        (Port("x", "f32", ("x_0", "x_1")), Port("experts", "i64", ("x_0",)),
         Port("weight", "e4m3", ("weight_0", "weight_1", "x_1")),
         Port("scale", "f32", ("weight_0", "cdiv(weight_1, 128)", "cdiv(x_1, 128)"))),
        (Port("y", "f32", ("x_0", "weight_1")),),
        {}, "fp8_expert_plugin_kernel", {"BLOCK_N": 64, "EMULATE_E4M3": False},
        (("N", "weight_1"), ("K", "x_1")), ("x_0", "cdiv(weight_1, 64)", "1"), 4,
        "y[s] = fp8 block-128 GEMV of x[s] (quantized per 128 channels) and expert experts[s]'s W")
    if dims is None:
        return [fp8, experts]
    H, HV, K, V, W = dims["H"], dims["HV"], dims["K"], dims["V"], dims["W"]
    C = 2 * H * K + HV * V
    BT, BC, BS = conv_block_sizes(4096, C, W)      # one specialisation serves prefill and decode
    BK, BV = recurrent_block_sizes(K, V)
    conv = PluginDef(
        "CausalConv1d",
        (Port("x", "f32", ("x_0", "x_1", str(C))), Port("weight", "f32", (str(C), str(W))),
         Port("state", "f32", ("x_0", str(C), str(W - 1))), Port("lengths", "i64", ("x_0",))),
        (Port("y", "f32", ("x_0", "x_1", str(C))), Port("state_out", "f32", ("x_0", str(C), str(W - 1)))),
        {"C": C, "W": W}, "conv_plugin_kernel",
        {"C": C, "W": W, "BT": BT, "BC": BC, "BS": BS}, (("T", "x_1"),),
        (f"cdiv(x_1, {BT})", f"cdiv({C}, {BC})", "x_0"), 4,
        "y = silu(depthwise causal conv over concat(state, x)); state_out = the W-1 inputs before lengths[b]")
    gdn = PluginDef(
        "GatedDeltaRule",
        (Port("q", "f32", ("q_0", "q_1", str(H * K))), Port("k", "f32", ("q_0", "q_1", str(H * K))),
         Port("v", "f32", ("q_0", "q_1", str(HV * V))), Port("a", "f32", ("q_0", "q_1", str(HV))),
         Port("b", "f32", ("q_0", "q_1", str(HV))), Port("A_log", "f32", (str(HV),)),
         Port("dt_bias", "f32", (str(HV),)), Port("state", "f32", ("q_0", str(HV), str(K), str(V)))),
        (Port("o", "f32", ("q_0", "q_1", str(HV * V))),
         Port("state_out", "f32", ("q_0", str(HV), str(K), str(V)), aliases="state")),
        {"H": H, "HV": HV, "K": K, "V": V}, "gdn_plugin_kernel",
        {"H": H, "HV": HV, "K": K, "V": V, "BK": BK, "BV": BV, "SCALE": K ** -0.5}, (("T", "q_1"),),
        (f"cdiv({V}, {BV})", f"q_0 * {HV}", "1"), 4,
        "the gated delta rule token by token (gates, q/k L2 norm and dk^-0.5 inside); state in place")
    return [conv, gdn, fp8, experts]


def output_shapes(defn: PluginDef, input_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The output shapes the plugin declares, for concrete input shapes (checked against them)."""
    dims = {port.name: list(shape) for port, shape in zip(defn.inputs, input_shapes)}
    for port, shape in zip(defn.inputs, input_shapes):
        want = tuple(evaluate(f, dims) for f in port.shape)
        if tuple(shape) != want:
            raise QwenError(f"{defn.id}: input {port.name} has shape {tuple(shape)}, the plugin takes {want}")
    return [tuple(evaluate(f, dims) for f in port.shape) for port in defn.outputs]


# ------------------------------------------------------------------------ reference implementations

def reference(op: str, inputs: list[np.ndarray], attrs: dict) -> list[np.ndarray]:
    """What the plugin computes, by the kernels' fp32 naive twins with the plugin's binding."""
    import torch

    from qwen35c.backends.triton.causal_conv1d.naive import naive_causal_conv1d
    from qwen35c.backends.triton.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    if op == "CausalConv1d":
        x, weight, state, lengths = t
        y, final = naive_causal_conv1d(x, weight, None, state, output_final_state=True, lengths=lengths,
                                       activation="silu")
        return [y.numpy(), final.numpy()]
    if op == "Fp8Linear":
        from qwen35c.backends.triton.gemm.naive import fp8_linear

        x, weight, scale = t
        return [fp8_linear(x.float(), weight.view(torch.float8_e4m3fn), scale).numpy()]
    if op == "Fp8ExpertLinear":
        from qwen35c.backends.triton.gemm.naive import fp8_linear

        x, experts, weight, scale = t
        w8 = weight.view(torch.float8_e4m3fn)
        y = torch.zeros(x.shape[0], weight.shape[1])
        for e in experts.unique().tolist():
            rows = (experts == e).nonzero().flatten()
            y[rows] = fp8_linear(x[rows].float(), w8[e], scale[e])
        return [y.numpy()]
    if op == "GatedDeltaRule":
        q, k, v, a, b, a_log, dt_bias, state = t
        H, HV, K, V = (int(attrs[n]) for n in ("H", "HV", "K", "V"))
        B, T = q.shape[:2]
        o, final = naive_recurrent_gated_delta_rule(
            q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V), a, b, scale=K ** -0.5,
            initial_state=state.clone(), use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=a_log,
            dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, inplace_final_state=True)
        return [o.reshape(B, T, HV * V).numpy(), final.numpy()]
    raise QwenError(f"{NAMESPACE}::{op}: no such plugin")


_registered_ort = False


def register_onnxruntime() -> str:
    """Register the reference implementations as ONNX Runtime custom ops (onnxruntime-extensions'
    Python ops, op type `qwen35c::Name`); returns the library path for SessionOptions."""
    global _registered_ort
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise QwenError("the TensorRT bundle's CPU check needs onnxruntime-extensions "
                        "(pip install onnxruntime-extensions): its plugin nodes run as Python custom ops") from None
    if not _registered_ort:
        types = {"f32": PyCustomOpDef.dt_float, "i64": PyCustomOpDef.dt_int64, "e4m3": PyCustomOpDef.dt_uint8}
        for defn in plugin_defs({"H": 1, "HV": 1, "K": 16, "V": 16, "W": 4}):   # ports only; dims from attrs
            def run(*args, _op=defn.op, **attrs):
                return tuple(reference(_op, list(args), attrs))

            onnx_op(op_type=defn.id, inputs=[types[p.dtype] for p in defn.inputs],
                    outputs=[types[p.dtype] for p in defn.outputs],
                    attrs={name: PyCustomOpDef.dt_int64 for name in defn.attrs})(run)
        _registered_ort = True
    return get_library_path()


# --------------------------------------------------------------------------- compiled kernels (PTX)

def compile_kernels(dims: dict | None, ops: list[str], sm: int, out_dir: Path, timeout: float = 900) -> dict:
    """Compile the adapters of the plugins `ops` for `sm` into out_dir/plugins (a child Python without
    TRITON_INTERPRET); the manifest's `backend.plugins` section, sha256 per file."""
    import triton

    import qwen35c

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(qwen35c.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    from qwen35c.backends.triton.mode import AOT_ENV

    env[AOT_ENV] = "1"
    folder = Path(out_dir) / PLUGIN_DIR
    cmd = [sys.executable, "-m", "qwen35c.backends.tensorrt.plugins", "--compile",
           json.dumps({"dims": dims, "ops": sorted(ops)}), str(sm), str(folder)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise QwenError(f"compiling the TensorRT plugins' kernels for sm_{sm} failed: {tail[:300]}")
    rows = json.loads(done.stdout)
    for row in rows:
        row["sha256"] = hashlib.sha256((folder / row["ptx"]).read_bytes()).hexdigest()
        row["ptx"] = f"{PLUGIN_DIR}/{row['ptx']}"
    return {"sm": sm, "triton_version": triton.__version__, "dims": dims, "kernels": rows}


def _compile_here(what: dict, sm: int, folder: Path) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen35c.backends.tensorrt import kernels
    from qwen35c.backends.triton.aot import ptx_version_for

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for defn in plugin_defs(what["dims"]):
        if defn.op not in what["ops"]:
            continue
        fn = getattr(kernels, defn.kernel)
        tags = {"f32": "*fp32", "i64": "*i64", "e4m3": "*fp8e4nv"}
        sig = {p.name: tags[p.dtype] for p in defn.inputs}
        sig.update({name: "i32" for name, _ in defn.scalars})
        sig.update({(p.name if p.name not in sig else p.name + "_out"): tags[p.dtype] for p in defn.outputs})
        order = list(fn.arg_names)
        full = {a: sig.get(a, "constexpr") for a in order}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(order) if full[a].startswith("*")}
        src = ASTSource(fn=fn, signature=full, constexprs=dict(defn.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                                  options={"num_warps": defn.num_warps, "num_stages": 1,
                                           "ptx_version": ptx_version_for(sm)})
        arguments = [a for a in order if full[a] != "constexpr"]
        meta = compiled.metadata
        if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
            raise QwenError(f"{defn.id}: the compiled kernel needs Triton scratch memory, which a TensorRT "
                            f"AOT launch cannot pass")
        ptx, dropped = drop_trailing_params(compiled.asm["ptx"], meta.name, len(arguments))
        path = folder / f"{defn.spec}.ptx"
        path.write_text(ptx)
        _ptxas(path, sm)
        rows.append({"id": defn.id, "spec": defn.spec, "ptx": f"{defn.spec}.ptx", "kernel": meta.name,
                     "num_warps": defn.num_warps, "shared": int(meta.shared), "arguments": arguments,
                     "dropped_params": dropped})
    return rows


def drop_trailing_params(ptx: str, kernel: str, keep: int) -> tuple[str, int]:
    """The PTX with only the kernel's first `keep` parameters. Triton appends scratch pointers (global,
    profile) after the user's arguments; TensorRT's AOT launch passes exactly inputs, extra scalars and
    outputs, so a longer signature would make the driver read past its argument array. Only
    parameters the body never references are dropped (checked); returns (ptx, how many dropped)."""
    import re

    head = re.search(rf"\.entry {re.escape(kernel)}\(\n(.*?)\n\)", ptx, re.DOTALL)
    if head is None:
        raise QwenError(f"PTX of {kernel}: no .entry signature found")
    params = head.group(1).split(",\n")
    if len(params) < keep:
        raise QwenError(f"PTX of {kernel}: {len(params)} parameters, fewer than its {keep} arguments")
    body = ptx[head.end():]
    for i in range(keep, len(params)):
        if re.search(rf"\b{re.escape(kernel)}_param_{i}\b", body):
            raise QwenError(f"PTX of {kernel}: trailing parameter {i} is used by the kernel; cannot drop it")
    return ptx[:head.start(1)] + ",\n".join(params[:keep]) + ptx[head.end(1):], len(params) - keep


def _ptxas(path: Path, sm: int) -> None:
    """Assemble the shipped PTX for sm with the ptxas Triton compiles with: the file TensorRT gets is valid."""
    from triton.backends.nvidia import compiler as nv

    arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"
    done = subprocess.run([nv.get_ptxas(sm).path, f"-arch={arch}", str(path), "-o", os.devnull],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise QwenError(f"{path.name}: ptxas rejects the shipped PTX for sm_{sm}: {done.stderr.strip()[:300]}")


# ------------------------------------------------------------------------------------ TensorRT

def register_tensorrt(bundle: Path, section: dict) -> list[str]:
    """Register the bundle's plugins with TensorRT's plugin registry (tensorrt.plugin, >= 10.9):
    shapes and aliasing from `plugin_defs`, ahead-of-time implementations returning the bundle's own
    PTX (hash-checked by the artifact loader before this runs). Returns the registered ids.
    Not executed on the project's machines (no TensorRT); `bench/gpu_tensorrt.py` runs it."""
    import inspect

    import tensorrt as trt
    import tensorrt.plugin as trtp

    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise QwenError(f"TensorRT {trt.__version__} has no ahead-of-time Python plugins (needs >= 10.9)")
    compiled = {row["id"]: row for row in section["plugins"]["kernels"]}
    ids = []
    for defn in plugin_defs(section["plugins"]["dims"]):
        if defn.id not in compiled:
            continue
        row = compiled[defn.id]
        ptx = (bundle / row["ptx"]).read_text()
        # tensorrt.plugin reads the signature: inputs, then attributes (then outputs, tactic for aot);
        # the functions take them by position or by name and use only the inputs
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        ports = [inspect.Parameter(p.name, positional, annotation=trtp.TensorDesc) for p in defn.inputs]
        attrs = [inspect.Parameter(n, positional, annotation=int) for n in defn.attrs]

        def inputs_of(args, kwargs, d):
            return {p.name: (args[i] if i < len(args) else kwargs[p.name]) for i, p in enumerate(d.inputs)}

        def describe(*args, _d=defn, **kwargs):
            by_name = inputs_of(args, kwargs, _d)
            outs = []
            for port in _d.outputs:
                if port.aliases:
                    outs.append(by_name[port.aliases].aliased())
                    continue
                shape = trtp.ShapeExprs(len(port.shape))
                for i, formula in enumerate(port.shape):
                    shape[i] = _shape_expr(formula, by_name)
                outs.append(trtp.from_shape_expr(shape, dtype=trt.float32))
            return tuple(outs)

        describe.__signature__ = inspect.Signature(ports + attrs, return_annotation=tuple[trtp.TensorDesc, ...])
        trtp.register(defn.id)(describe)

        def aot(*args, _d=defn, _row=row, _ptx=ptx, **kwargs):
            by_name = inputs_of(args, kwargs, _d)
            launch = trtp.KernelLaunchParams()
            launch.grid_x, launch.grid_y, launch.grid_z = (_shape_expr(g, by_name) for g in _d.grid)
            launch.block_x = _row["num_warps"] * 32
            launch.shared_mem = _row["shared"]
            extra = trtp.SymIntExprs(len(_d.scalars))
            for i, (_name, formula) in enumerate(_d.scalars):
                extra[i] = trtp.SymInt32(_shape_expr(formula, by_name))
            return _row["kernel"], _ptx, launch, extra

        aot.__signature__ = inspect.Signature(
            ports + attrs + [inspect.Parameter("outputs", positional),
                             inspect.Parameter("tactic", positional, annotation=int)])
        trtp.aot_impl(defn.id)(aot)
        ids.append(defn.id)
    return ids


def _shape_expr(formula: str, inputs: dict):
    """A dimension formula over TensorRT's symbolic input dims (TensorDesc.shape_expr)."""
    return _formula(formula, lambda port, axis: inputs[port].shape_expr[axis], lambda a, b: (a + b - 1) // b)


# ------------------------------------------------------------------------------------------ CLI

def describe_bundle(bundle: Path) -> dict:
    """The plugins a bundle uses, as its manifest records them (no TensorRT, no Triton compile)."""
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        dims = manifest["backend"]["plugins"]["dims"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise QwenError(f"{bundle}/manifest.json: not a TensorRT bundle ({type(err).__name__}: {err})") from None
    used = {row["id"] for row in manifest["backend"]["plugins"]["kernels"]}
    return {"namespace": NAMESPACE, "dims": dims,
            "plugins": [d.to_json() for d in plugin_defs(dims) if d.id in used]}


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qwen35c.backends.tensorrt.plugins")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--describe", metavar="BUNDLE", help="print the bundle's plugin declarations as JSON")
    group.add_argument("--compile", nargs=3, metavar=("DIMS", "SM", "DIR"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    try:
        if ns.describe:
            json.dump(describe_bundle(Path(ns.describe)), sys.stdout, indent=1, sort_keys=True)
            print()
        else:
            dims, sm, folder = ns.compile
            json.dump(_compile_here(json.loads(dims), int(sm), Path(folder)), sys.stdout)
    except QwenError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))


__all__ = ["NAMESPACE", "PLUGIN_DIR", "Port", "PluginDef", "compile_kernels", "describe_bundle", "evaluate",
           "model_dims", "output_shapes", "plugin_defs", "reference", "register_onnxruntime", "register_tensorrt"]
