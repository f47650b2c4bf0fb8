"""The triton backend behind the interface of `qwen35c.backends.base`: emit, validate, load."""

from __future__ import annotations

from pathlib import Path

from qwen35c.artifact import ArtifactError, artifact_file
from qwen35c.backends.base import EmitContext
from qwen35c.errors import QwenError


class TritonBackend:
    name = "triton"

    def setup(self) -> None:
        from qwen35c.backends.triton.mode import ensure

        ensure()

    def emit(self, graph, out_dir: Path, ctx: EmitContext) -> dict:
        from qwen35c.backends.triton.emit import emit_triton

        return emit_triton(graph, ctx.weights, out_dir, ctx.target, on_weight=ctx.on_weight, release=ctx.release,
                           tied_lm_head=ctx.tied_lm_head).backend

    def engine_status(self, section: dict) -> dict:
        kernels = section.get("kernels")
        if kernels:
            return {"status": "ready", "detail": f"{len(kernels['specialisations'])} kernels compiled for "
                                                 f"sm_{kernels['sm']} by Triton {kernels['triton_version']} "
                                                 f"shipped; without that GPU the same plan runs under the "
                                                 f"Triton interpreter"}
        return {"status": "ready", "detail": "no compiled kernels shipped: runs under the Triton interpreter only"}

    def validate(self, section: dict, check, files: dict) -> None:
        for key in ("plan", "plan_text", "weights"):
            check.listed(section.get(key), f"backend.{key}", files)
        check.str(section.get("plan_format"), "backend.plan_format")
        if section.get("sm") is not None:
            check.int(section["sm"], "backend.sm", 70, 200)
        check.list(section.get("states"), "backend.states")
        kernels = section.get("kernels")
        if kernels is None:
            return
        check.dict(kernels, "backend.kernels")
        check.str(kernels.get("triton_version"), "backend.kernels.triton_version")
        check.int(kernels.get("sm"), "backend.kernels.sm", 70, 200)
        folder = check.relpath(kernels.get("dir"), "backend.kernels.dir")
        for i, entry in enumerate(check.list(kernels.get("files"), "backend.kernels.files")):
            check.dict(entry, f"backend.kernels.files[{i}]")
            check.listed(entry.get("file"), f"backend.kernels.files[{i}].file", files)
        for i, spec in enumerate(check.list(kernels.get("specialisations"), "backend.kernels.specialisations")):
            check.str(spec, f"backend.kernels.specialisations[{i}]")
            for suffix in (".json", ".cubin"):
                check.listed(f"{folder}/{spec}{suffix}", f"backend.kernels.specialisations[{i}]", files)

    def reference(self, model_dir: Path, manifest: dict, prepared, mode: str | None):
        """Under the interpreter (fp32 activations) the emulating reference: bf16-rounded weights, the
        recipe's quantized weights and routed experts, at the fp32 gate (FP8 with dynamic activations:
        the quantized-activations gate). On a GPU (bf16 activations) the same reference at the
        target's precision gate. `prepared` is not reused: the emulation rounds its weights in place."""
        from qwen35c.backends.triton.emit import emulating_reference
        from qwen35c.targets import get_target, lowering_gate

        record = manifest.get("quantization")
        reference = emulating_reference(model_dir, record)
        what = "bf16-rounded weights" + (f", {record['label']}" if record else "")
        if (mode or "").startswith("cuda"):
            return reference, get_target(manifest["target"]["name"]).precision, f"emulating reference ({what})"
        return reference, lowering_gate(record), f"emulating reference ({what}, fp32 activations)"

    def load(self, directory: Path, manifest: dict, threads: int | None = None, lean: bool = False,
             drafting: bool = False):
        if drafting:
            raise QwenError(f"{directory}: {self.name} artifacts hold no MTP head (the onnx backend compiles one)")
        self.setup()
        from qwen35c.backends.triton.session import TritonSession

        plan = artifact_file(directory, manifest, manifest["backend"]["plan"])
        try:
            return TritonSession(directory, manifest, threads=threads)
        except (KeyError, TypeError, ValueError, IndexError) as err:   # a plan that is not one
            raise ArtifactError(f"{plan}: malformed execution plan ({type(err).__name__}: {err})") from None


BACKEND = TritonBackend()
