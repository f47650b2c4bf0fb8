"""The tensorrt backend, stage 1: the bundle (TensorRT-dialect ONNX + the plugins' PTX), its CPU check
on ONNX Runtime with the plugins' reference implementations, the plugins' kernels against those
references under the Triton interpreter, and stage 2 refusing plainly where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from qwen35c.backends.tensorrt import plugins
from qwen35c.backends.tensorrt.bundle import DOMAINS, check_bundle
from qwen35c.cli import main
from qwen35c.errors import QwenError

BUNDLED = Path(__file__).resolve().parents[2] / "qwen35c" / "models"


def _cli(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "bundle"
    _cli("build", "--model", BUNDLED / "qwen35-tiny", "--target", "h100-bf16", "--backend", "tensorrt", "-o", out)
    return out


def test_bundle_verifies_at_the_fp32_gate_and_says_the_engine_was_not_verified(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["metrics"]["max_abs"] <= 1e-4
    assert manifest["engine"]["status"] == "not built"
    report = json.loads(_cli("verify", bundle, "--json").stdout)
    assert report["status"] == "pass" and report["parity"]["gate"] == "fp32"
    assert report["mode"].startswith("TensorRT bundle on onnxruntime CPU")
    engine = next(c for c in report["checks"] if c["name"] == "engine")
    assert engine["status"] == "skipped" and "not verified" in engine["detail"]


def test_bundle_is_in_tensorrt_dialect(bundle):
    check_bundle(bundle / "model.onnx")       # checker with the plugin schemas + strict shape inference
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import} == {"": 23, "qwen35c": 1}
    assert {n.domain for n in model.graph.node} <= set(DOMAINS)
    nodes = [n for n in model.graph.node if n.domain == "qwen35c"]
    assert sorted({n.op_type for n in nodes}) == ["CausalConv1d", "GatedDeltaRule"]
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"qwen35c" and attrs["aot"] == 1
    shaped = {v.name for v in model.graph.value_info}
    assert all(o in shaped for n in nodes for o in n.output if o not in {x.name for x in model.graph.output})


def test_plugin_ptx_is_shipped_for_the_target_sm_and_hashed(bundle, tmp_path):
    import shutil

    from qwen35c.artifact import ArtifactError
    from qwen35c.runtime import open_checked

    manifest = json.loads((bundle / "manifest.json").read_text())
    section = manifest["backend"]["plugins"]
    assert section["sm"] == 90 and {k["id"] for k in section["kernels"]} == {
        "qwen35c::CausalConv1d", "qwen35c::GatedDeltaRule"}
    for row in section["kernels"]:
        ptx = (bundle / row["ptx"]).read_text()
        assert ".target sm_90" in ptx and f".entry {row['kernel']}" in ptx
        assert row["ptx"] in manifest["files"]
        # exactly TensorRT's arguments (inputs, scalars, outputs): Triton's trailing scratch pointers dropped
        signature = ptx[ptx.index(f".entry {row['kernel']}("):].split(")", 1)[0]
        assert signature.count(".param") == len(row["arguments"]) and row["dropped_params"] == 2
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    ptx = copy / section["kernels"][0]["ptx"]
    ptx.write_text(ptx.read_text().replace("sm_90", "sm_80"))
    with pytest.raises(ArtifactError, match=section["kernels"][0]["ptx"]):
        open_checked(copy)


def _inputs(defn, B, T, lengths, seed):
    """Random inputs of a plugin; for Fp8Linear, x [B, T] and FP8 block-quantized weights [3 * T, T]."""
    from qwen35c.backends.triton.gemm.naive import fp8_quantize_weight_blocks

    g = torch.Generator().manual_seed(seed)
    if defn.op == "Fp8Linear":
        w, scale = fp8_quantize_weight_blocks(torch.randn(3 * T, T, generator=g))
        return [(torch.randn(B, T, generator=g) * 3).numpy(), w.view(torch.uint8).numpy(), scale.numpy()]
    if defn.op == "Fp8ExpertLinear":    # B * T slots over 3 experts [3T, T]
        pairs = [fp8_quantize_weight_blocks(torch.randn(3 * T, T, generator=g)) for _ in range(3)]
        return [(torch.randn(B * T, T, generator=g) * 3).numpy(), torch.randint(0, 3, (B * T,), generator=g).numpy(),
                torch.stack([p[0] for p in pairs]).view(torch.uint8).numpy(), torch.stack([p[1] for p in pairs]).numpy()]
    env = {"x": [B, T], "q": [B, T]}
    arrays = []
    for port in defn.inputs:
        shape = [plugins.evaluate(f, env) for f in port.shape]
        env[port.name] = shape
        arrays.append(np.asarray(lengths, np.int64) if port.dtype == "i64" else torch.randn(*shape, generator=g).numpy())
    return arrays


@pytest.mark.parametrize("T", [1, 63, 64, 65, 129])
def test_plugin_kernels_match_their_references_with_the_plugin_binding(T):
    """Each adapter kernel (TensorRT's argument order, the plugin's grid and scalars) under the
    interpreter against the reference implementation the CPU check runs: grouped value heads,
    non-zero initial state, a ragged batch (the GDN's padded steps masked as the bundle masks them);
    Fp8Linear over K = T (partial 128-groups at 63, 65, 129), E4M3 emulated in fp32 as the interpreter needs."""
    from qwen35c.backends.tensorrt import kernels

    dims = {"H": 2, "HV": 4, "K": 16, "V": 32, "W": 4}
    lengths = [T, max(1, T // 2)]
    for defn in plugins.plugin_defs(dims):
        arrays = _inputs(defn, 2, T, lengths, seed=T)
        if defn.op == "GatedDeltaRule":
            for gate in (3, 4):
                arrays[gate][1, lengths[1]:] = -np.inf
        want = plugins.reference(defn.op, arrays, defn.attrs)
        assert [w.shape for w in want] == plugins.output_shapes(defn, [a.shape for a in arrays])
        ins = [torch.from_numpy(a.copy()) for a in arrays]
        ins = [t.view(torch.float8_e4m3fn) if p.dtype == "e4m3" else t for p, t in zip(defn.inputs, ins)]
        outs = [torch.full(w.shape, float("nan")) for w in want]
        for i, port in enumerate(defn.outputs):
            if port.aliases:
                outs[i] = ins[[p.name for p in defn.inputs].index(port.aliases)]
        shapes = {p.name: list(a.shape) for p, a in zip(defn.inputs, arrays)}
        grid = tuple(plugins.evaluate(g, shapes) for g in defn.grid)
        scalars = [plugins.evaluate(f, shapes) for _, f in defn.scalars]
        const = dict(defn.constexprs, **({"EMULATE_E4M3": True} if "EMULATE_E4M3" in defn.constexprs else {}))
        getattr(kernels, defn.kernel)[grid](*ins, *scalars, *outs, **const, num_warps=defn.num_warps)
        for port, got, ref in zip(defn.outputs, outs, want):
            tol = dict(atol=1e-4, rtol=1e-5) if defn.op.startswith("Fp8") else dict(atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got, torch.from_numpy(ref), **tol, msg=f"{defn.op}.{port.name}")


def test_masked_steps_leave_the_recurrent_state_as_after_the_valid_prefix():
    """a = b = -inf at a step (the bundle's padding) is exactly no step at all: masked steps run on
    the state the valid prefix left give that state back bit for bit. (Two calls, not a padded call
    against a shorter one: the q/k L2 norms of a [B, T] batch may round a last bit differently with T,
    as torch vectorises the reduction by shape.)"""
    defn = next(d for d in plugins.plugin_defs({"H": 1, "HV": 2, "K": 16, "V": 16, "W": 4})
                if d.op == "GatedDeltaRule")
    arrays = _inputs(defn, 1, 9, [9], seed=1)
    prefix = [a[:, :5] if a.ndim == 3 else a for a in arrays]
    masked = [a[:, 5:].copy() if a.ndim == 3 else a for a in arrays]
    for gate in (3, 4):
        masked[gate][:] = -np.inf
    _o, after_prefix = plugins.reference(defn.op, prefix, defn.attrs)
    masked[-1] = after_prefix.copy()
    _o, after_masked = plugins.reference(defn.op, masked, defn.attrs)
    assert not np.array_equal(after_prefix, arrays[-1])
    assert np.array_equal(after_masked, after_prefix)


def test_describe_runs_without_tensorrt(bundle):
    out = subprocess.run([sys.executable, "-m", "qwen35c.backends.tensorrt.plugins", "--describe", str(bundle)],
                         capture_output=True, text=True, check=True)
    described = json.loads(out.stdout)
    assert [p["id"] for p in described["plugins"]] == ["qwen35c::CausalConv1d", "qwen35c::GatedDeltaRule"]   # used ones
    gdn = described["plugins"][1]
    assert gdn["outputs"][1]["aliases"] == "state" and gdn["attrs"] == {"H": 2, "HV": 4, "K": 64, "V": 64}


def test_engine_exits_3_and_writes_nothing_without_tensorrt(bundle, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = _cli("engine", bundle, "-o", tmp_path / "engine", code=3)
    assert "TensorRT is not installed" in result.output and not (tmp_path / "engine").exists()


def test_engine_reads_the_source_checkpoint_only_once_it_hashes_as_recorded(bundle, tmp_path, monkeypatch):
    """Stage 2 runs the engine against the source checkpoint the manifest names: a changed one is
    refused, naming the file, before any engine is built or anything written (TensorRT stood in for)."""
    import shutil

    from qwen35c.artifact import ArtifactError
    from qwen35c.backends.tensorrt import engine as trt_engine
    from qwen35c.engine import build_engine

    copy, source = tmp_path / "bundle", tmp_path / "source"
    shutil.copytree(bundle, copy)
    shutil.copytree(BUNDLED / "qwen35-tiny", source)
    with open(source / "config.json", "a") as f:
        f.write("\n")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["path"] = str(source)
    (copy / "manifest.json").write_text(json.dumps(manifest))

    def no_build(*args):
        raise AssertionError("the engine was built from an unchecked source")

    monkeypatch.setattr(trt_engine, "engine_blocker", lambda sm: None)
    monkeypatch.setattr(trt_engine, "build_plan", no_build)
    with pytest.raises(ArtifactError, match="config.json: differs from the checkpoint"):
        build_engine(copy, tmp_path / "engine", say=lambda *a: None)
    assert not (tmp_path / "engine").exists()


def test_fp8_bundle_runs_the_fp8_plugin_and_verifies(tmp_path):
    out = tmp_path / "fp8"
    _cli("build", "--model", BUNDLED / "qwen35-tiny", "--target", "h100-fp8", "--backend", "tensorrt", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["precision"] == "quantized-activations"
    assert manifest["backend"]["ops"]["qwen35c::Fp8Linear"] == len(manifest["quantization"]["quantized"])
    assert "DequantizeLinear" not in manifest["backend"]["ops"]          # FP8 block DQ: not TensorRT's
    check_bundle(out / "model.onnx")
    assert {k["id"] for k in manifest["backend"]["plugins"]["kernels"]} >= {"qwen35c::Fp8Linear"}


def test_unsupported_recipes_are_refused_by_name(tmp_path, checkpoint_factory):
    result = _cli("build", "--target", "h100-bf16", "--backend", "tensorrt", "--quantize", "fp8-tensor", "-o",
                  tmp_path / "b", code=2)
    assert "lowers INT4 (W4A16) and FP8 block-128 recipes, not 'fp8-tensor'" in result.output
    assert not (tmp_path / "b").exists()


def test_fp8_moe_bundle_runs_routed_experts_in_fp8(tmp_path):
    """The bundled MoE model at h100-fp8: every linear through Fp8Linear, the routed experts (gate and up
    quantized on their own, as the triton pack does) through Fp8ExpertLinear, within the gate."""
    out = tmp_path / "fp8-moe"
    _cli("build", "--model", BUNDLED / "qwen35-tiny-moe", "--target", "h100-fp8", "--backend", "tensorrt", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    layers = len(manifest["quantization"]["not_lowered"]) // 2
    assert manifest["parity"]["passed"] and manifest["backend"]["ops"]["qwen35c::Fp8ExpertLinear"] == 3 * layers


def test_int4_bundle_is_w4a16_blocked_dequantize_and_verifies(tmp_path):
    out = tmp_path / "int4"
    _cli("build", "--model", BUNDLED / "qwen35-tiny", "--target", "a100-int4", "--backend", "tensorrt", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["metrics"]["max_abs"] <= 1e-4 and manifest["parity"]["precision"] == "fp32"
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(manifest["quantization"]["quantized"])
    for n in dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4
        assert {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} == {"axis": 0, "block_size": 128}
    report = json.loads(_cli("verify", out, "--json", "--prompts", "short", "--skip", "quantization").stdout)
    assert report["status"] == "pass"


def test_int4_routed_experts_are_dequantized_from_int4(checkpoint_factory, tmp_path):
    """Experts whose dims the group divides are INT4 (RTN, as the triton pack stores them) and the
    bundle matches the emulating reference that quantizes them the same way."""
    ckpt = checkpoint_factory("tiny-moe", hidden_size=128, moe_intermediate_size=128)
    out = tmp_path / "moe-int4"
    _cli("build", "--model", ckpt, "--target", "a100-int4", "--backend", "tensorrt", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["not_lowered"] and not manifest["backend"]["notes"]
    assert manifest["parity"]["metrics"]["max_abs"] <= 1e-4
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and {a.name: a.i for a in n.attribute}.get("axis") == 2]
    assert len(blocked) == 2 * len(manifest["quantization"]["not_lowered"]) // 2 > 0


@pytest.mark.parametrize("model,target", [("qwen35-tiny-moe", "a100-bf16")])
def test_moe_bundle_builds_and_verifies(tmp_path, model, target):
    out = tmp_path / "moe"
    _cli("build", "--model", BUNDLED / model, "--target", target, "--backend", "tensorrt", "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["metrics"]["max_abs"] <= 1e-4 and manifest["backend"]["plugins"]["sm"] == 80


def test_grouped_key_heads_preset_builds(checkpoint_factory, tmp_path):
    """Qwen3-Next's layout (its own tensor names, grouped value heads) through the same plugins."""
    out = tmp_path / "next"
    _cli("build", "--model", checkpoint_factory("tiny-next"), "--target", "h100-bf16", "--backend", "tensorrt",
         "-o", out)
    assert json.loads((out / "manifest.json").read_text())["parity"]["metrics"]["max_abs"] <= 1e-4


def test_serving_entry_parses_as_a_triton_model_config(bundle):
    """serving/config.pbtxt (what `qwen35c engine` puts beside the engine): platform tensorrt_plan,
    every state as implicit sequence state with the engine I/O's names, shapes and dtypes."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    manifest = json.loads((bundle / "manifest.json").read_text())
    config = text_format.Parse((bundle / "serving" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    states = {s.input_name: s for s in config.sequence_batching.state}
    assert set(states) == {s["name"] for s in manifest["backend"]["states"]}
    for spec in manifest["backend"]["states"]:
        state = states[spec["name"]]
        assert state.output_name == spec["output"] and state.data_type == model_config_pb2.TYPE_FP32
        assert list(state.dims) == [4096 if d == "S" else d for d in spec["shape"][1:]]
    assert "serving/config.pbtxt" in manifest["files"]


def test_every_gemm_runs_on_bf16_weights_and_the_check_widens_them(bundle):
    """In the bundle (strongly typed, as TensorRT reads it) every MatMul / Gemm takes bf16 operands;
    `widen_bf16` (the CPU check's view) leaves no bf16 compute, only exact casts of bf16 initializers."""
    from qwen35c.backends.tensorrt.bundle import widen_bf16

    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle / "model.onnx"), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert gemms and all(types[i] == onnx.TensorProto.BFLOAT16 for n in gemms for i in n.input[:2])
    wide = widen_bf16(onnx.load(str(bundle / "model.onnx"), load_external_data=False))
    casts = {n.output[0] for n in wide.graph.node if n.op_type == "Cast"
             and onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.BFLOAT16}
    assert not casts
    bf16 = [t.name for t in wide.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    widened = {n.input[0] for n in wide.graph.node if n.op_type == "Cast" and n.name.endswith("__widen")}
    assert bf16 and set(bf16) == widened


def test_register_tensorrt_wires_shapes_grids_and_scalars(bundle, monkeypatch):
    """`register_tensorrt` against a stand-in for TensorRT's `tensorrt.plugin` API whose symbolic dims
    are plain ints: what it registers describes the shapes `output_shapes` computes, aliases the
    recurrent state, and launches the shipped kernel on the plugin's grid with its scalars. (The
    real API has never been available here; this checks our side of the binding.)"""
    import inspect
    import types

    registered, aot = {}, {}

    class Desc:
        def __init__(self, shape):
            self.shape_expr = list(shape)

        def aliased(self):
            return ("alias", tuple(self.shape_expr))

    class Launch:
        pass

    plugin = types.SimpleNamespace(
        TensorDesc=Desc, ShapeExprs=lambda n: [None] * n, from_shape_expr=lambda shape, dtype: tuple(shape),
        KernelLaunchParams=Launch, SymIntExprs=lambda n: [None] * n, SymInt32=int,
        register=lambda name: (lambda fn: registered.setdefault(name, fn)),
        aot_impl=lambda name: (lambda fn: aot.setdefault(name, fn)))
    trt = types.SimpleNamespace(__version__="10.15.1", float32="f32", plugin=plugin)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    manifest = json.loads((bundle / "manifest.json").read_text())
    ids = plugins.register_tensorrt(bundle, manifest["backend"])
    assert ids == ["qwen35c::CausalConv1d", "qwen35c::GatedDeltaRule"]
    dims = manifest["backend"]["plugins"]["dims"]
    rows = {r["id"]: r for r in manifest["backend"]["plugins"]["kernels"]}
    for defn in plugins.plugin_defs(dims):
        if defn.id not in ids:
            continue
        arrays = _inputs(defn, 3, 7, [7, 2, 5], seed=0)
        descs = [Desc(a.shape) for a in arrays]
        assert [p.name for p in inspect.signature(registered[defn.id]).parameters.values()] == \
            [p.name for p in defn.inputs] + list(defn.attrs)
        outs = registered[defn.id](*descs, **defn.attrs)
        want = plugins.output_shapes(defn, [a.shape for a in arrays])
        for port, got, shape in zip(defn.outputs, outs, want):
            assert got == (("alias", shape) if port.aliases else shape)
        name, ptx, launch, extra = aot[defn.id](*descs, **defn.attrs, outputs=outs, tactic=0)
        shapes = {p.name: list(a.shape) for p, a in zip(defn.inputs, arrays)}
        assert name == rows[defn.id]["kernel"] and ptx == (bundle / rows[defn.id]["ptx"]).read_text()
        assert (launch.grid_x, launch.grid_y, launch.grid_z) == tuple(plugins.evaluate(g, shapes) for g in defn.grid)
        assert launch.block_x == 32 * defn.num_warps and extra == [plugins.evaluate(f, shapes) for _, f in defn.scalars]


def test_only_unused_trailing_ptx_params_are_dropped():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n"
           "{\n\tld.param.b64 %rd1, [k_param_0];\n\tld.param.b32 %r1, [k_param_1];\n}\n")
    out, dropped = plugins.drop_trailing_params(ptx, "k", 2)
    assert dropped == 1 and "k_param_2" not in out and out.count("\t.param ") == 2 and "k_param_1\n)" in out
    with pytest.raises(QwenError, match="trailing parameter 1 is used"):
        plugins.drop_trailing_params(ptx, "k", 1)
