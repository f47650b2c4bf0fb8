"""The tensorrt backend behind the interface of `qwen35c.backends.base`: a stage-1 bundle.

emit: `model.onnx` + `model.onnx.data` in TensorRT's dialect (bundle.py), checked by the ONNX checker
and strict shape inference with the plugin schemas, and `plugins/<spec>.ptx`: each plugin's kernel
compiled for the target's SM (plugins.py), hashed like every artifact file. The engine is stage 2
(`qwen35c engine`, engine.py): the manifest says `engine: not built` with the reason.
load: the bundle's own model.onnx on ONNX Runtime's CPU provider, the plugin nodes executed by their
reference implementations (onnxruntime-extensions Python ops): everything in the engine but
TensorRT's own kernels and fusions, checked against the triton backend's emulating reference
(bf16-rounded weights, the recipe's quantized weights) at the lowering gate.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen35c.backends.base import EmitContext
from qwen35c.errors import QwenError
from qwen35c.backends.onnx.backend import _annotate, _check_model, _graph_section, _validate_graph


class TensorRTBackend:
    name = "tensorrt"
    drafts = False

    def setup(self) -> None:
        from qwen35c.backends.triton.mode import ensure

        ensure()            # the plugin kernels are the Triton library's (compiled in a child process)

    def emit(self, graph, out_dir: Path, ctx: EmitContext) -> dict:
        from qwen35c.backends.tensorrt.bundle import DOMAINS, TensorRTEmitter, check_bundle
        from qwen35c.backends.tensorrt.plugins import compile_kernels

        emitter = TensorRTEmitter(graph, _bf16_weights(ctx.weights), out_dir, on_weight=ctx.on_weight,
                                  release=ctx.release, tied_lm_head=ctx.tied_lm_head)
        emitted = emitter.emit()
        if ctx.quantization is not None:
            _annotate(emitted.model_file, {"qwen35c.quantization": json.dumps(ctx.quantization, sort_keys=True)})
        check_bundle(emitted.model_file)
        section = {"name": self.name, **_graph_section(emitted), "opset": 23, "domains": list(DOMAINS),
                   "activations": "bf16 GEMMs (bf16 weights), fp32 elsewhere", "strongly_typed": True, "min_tensorrt": "10.15",
                   "plugins": None, "notes": emitter.notes}
        if emitter.used:
            section["plugins"] = compile_kernels(emitter.plugin_dims, sorted(emitter.used), ctx.target.sm, out_dir)
        section["serving"] = _serving_entry(section, graph.outputs[0].type.shape[-1], out_dir)
        return section

    def engine_status(self, section: dict) -> dict:
        from qwen35c.backends.tensorrt.engine import engine_blocker

        reason = engine_blocker((section.get("plugins") or {}).get("sm")) or "build writes the bundle only"
        return {"status": "not built",
                "detail": f"stage 1 bundle ({reason}); `qwen35c engine BUNDLE -o DIR` builds and verifies the "
                          f"engine where TensorRT >= 10.15 and the target's GPU are"}

    def validate(self, section: dict, check, files: dict) -> None:
        check.int(section.get("opset"), "backend.opset", 1, 25)
        _validate_graph(section, "backend", check, files)
        plugins = section.get("plugins")
        if plugins is None:
            return
        check.dict(plugins, "backend.plugins")
        check.int(plugins.get("sm"), "backend.plugins.sm", 70, 200)
        check.str(plugins.get("triton_version"), "backend.plugins.triton_version")
        if plugins.get("dims") is not None:
            for name, value in check.dict(plugins["dims"], "backend.plugins.dims").items():
                check.int(value, f"backend.plugins.dims.{name}", 1, 1 << 16)
        for i, row in enumerate(check.list(plugins.get("kernels"), "backend.plugins.kernels")):
            at = f"backend.plugins.kernels[{i}]"
            check.dict(row, at)
            check.listed(row.get("ptx"), f"{at}.ptx", files)
            for key in ("id", "spec", "kernel"):
                check.str(row.get(key), f"{at}.{key}")
            check.int(row.get("num_warps"), f"{at}.num_warps", 1, 32)
            check.int(row.get("shared"), f"{at}.shared", 0, 1 << 20)
        serving = check.dict(section.get("serving"), "backend.serving")
        check.listed(serving.get("config"), "backend.serving.config", files)

    def reference(self, model_dir: Path, manifest: dict, prepared, mode: str | None):
        """The triton backend's emulating reference (bf16-rounded weights, the recipe's quantized
        weights) at the lowering gate: the bundle computes in fp32 what a triton artifact computes
        under the interpreter. Unquantized, from a checkpoint that stores its weights in bf16 (rounding
        them changes nothing): the streamed reference, one layer resident (the same logits, bit for
        bit). `prepared` is not reused (the emulation rounds its weights in place)."""
        from qwen35c.backends.triton.emit import emulating_reference
        from qwen35c.targets import lowering_gate

        record = manifest.get("quantization")
        if record is None and _stored_bf16(model_dir):
            import torch

            from qwen35c.runtime.session import ReferenceSession, load_tokenizer
            from reference.stream import StreamedModel

            streamed = StreamedModel(model_dir, torch.float32)
            return (ReferenceSession(streamed, load_tokenizer(model_dir), model_dir), "fp32",
                    "reference (streamed; the checkpoint's weights are bf16)")
        what = "bf16-rounded weights" + (f", {record['label']}" if record else "")
        return emulating_reference(model_dir, record), lowering_gate(record), f"emulating reference ({what})"

    def load(self, directory: Path, manifest: dict, threads: int | None = None, lean: bool = False,
             drafting: bool = False):
        if drafting:
            raise QwenError(f"{directory}: {self.name} artifacts hold no MTP head (the onnx backend compiles one)")
        from qwen35c.backends.onnx.session import OnnxSession
        from qwen35c.backends.tensorrt.bundle import widen_bf16
        from qwen35c.backends.tensorrt.plugins import register_onnxruntime

        _check_model(directory, manifest)
        session = OnnxSession(directory, manifest, threads=threads, arena=not lean,
                              custom_ops=register_onnxruntime(), rewrite=widen_bf16)
        session.mode = ("TensorRT bundle on onnxruntime CPU (plugin nodes: reference implementations; "
                        "bf16 widened: fp32 activations)")
        return session


SERVING_NAME = "qwen35c"


def _serving_entry(section: dict, vocab: int, out_dir: Path) -> dict:
    """The Triton Inference Server entry of the engine this bundle builds: `serving/config.pbtxt`
    (platform tensorrt_plan; the states as implicit sequence state; batch and cache within the
    engine's optimization profile). `qwen35c engine` writes it beside the engine as a model repository."""
    from qwen35c.backends.tensorrt.engine import MAX_BATCH, MAX_CACHE
    from qwen35c.export import triton_config

    folder = out_dir / "serving"
    folder.mkdir()
    text = triton_config(SERVING_NAME, section, vocab, MAX_BATCH, MAX_CACHE, platform="tensorrt_plan",
                         kind="KIND_GPU")
    (folder / "config.pbtxt").write_text(text)
    return {"config": "serving/config.pbtxt", "name": SERVING_NAME, "max_batch_size": MAX_BATCH,
            "max_length": MAX_CACHE}


def _stored_bf16(model_dir: Path) -> bool:
    """Whether every weight a bf16 target rounds is stored in bf16 already (safetensors headers only)."""
    import torch

    from qwen35c.backends.triton.emit import bf16_weight
    from reference.safetensors_io import SafetensorsFile

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        file = SafetensorsFile(path)
        try:
            if any(file.dtype(n).is_floating_point and file.dtype(n) != torch.bfloat16 and bf16_weight(n)
                   for n in file.keys()):
                return False
        finally:
            file.close()
    return True


def _bf16_weights(weights):
    """The checkpoint's weights as a bf16 GPU target holds them: rounded to bf16 (kept fp32 in the graph),
    but for what the triton pack keeps fp32 (A_log, dt_bias) and the packed parts of quantized weights."""
    import torch

    from qwen35c.backends.triton.emit import bf16_weight

    def get(name: str):
        tensor = weights(name)
        if "#" in name or not tensor.is_floating_point() or not bf16_weight(name):
            return tensor
        return tensor.to(torch.bfloat16).to(tensor.dtype)

    return get


BACKEND = TensorRTBackend()
