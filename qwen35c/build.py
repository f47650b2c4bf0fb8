"""`build`: checkpoint -> verified artifact, in stages (trace, passes, quantize, emit, write, check).

Each stage is timed and reported through `progress`. The backend is reached only through
`qwen35c.backends.base` (emit, load); the artifact only through `qwen35c.artifact` (atomic
directory, manifest). Labels follow content: a quantized target's pipeline must hold its
`quantize` pass, and a quantized build that quantizes nothing is refused, so an artifact is never
labelled with a precision it does not have.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qwen35c.artifact import (
    COPIED_MODEL_FILES, SCHEMA_VERSION, atomic_directory, check_output, protected_paths, settle, source_hashes,
    tool_versions,
    write_manifest,
)
from qwen35c.errors import QwenError
from reference.stream import return_freed_memory

Progress = Callable[[str, str, "float | None"], None]   # (stage, message, fraction or None)


@dataclass
class BuildReport:
    out: Path
    manifest: dict
    seconds: float
    stages: list[tuple[str, float]]
    warnings: list[str] = field(default_factory=list)


class _Stages:
    def __init__(self, progress: Progress | None):
        self.report = progress or (lambda stage, msg, frac: None)
        self.times: list[tuple[str, float]] = []
        self.t0 = time.perf_counter()

    def start(self, name: str, message: str) -> None:
        self.report(name, message, None)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times.append((name, now - self.t0))
        self.t0 = now


def resolve_pipeline(target, pipeline: str | None, quantize: str | None) -> str:
    """The pipeline text of a build: the target's named pipeline with its `quantize` pass (or the
    `--quantize` override) inserted; a user `--pipeline` must keep a quantized target's quantize."""
    from qwen35c.passes.manager import parse_pipeline, pipeline_to_text

    if pipeline is None:
        return pipeline_to_text(parse_pipeline(target.full_pipeline(quantize)))
    if quantize is not None:
        raise QwenError("--quantize and --pipeline both set the pipeline; put quantize{...} in --pipeline")
    passes = parse_pipeline(pipeline)
    if target.quantize and not any(p.name == "quantize" for p in passes):
        raise QwenError(f"target '{target.name}' is {target.weights}, but --pipeline '{pipeline}' has no quantize "
                        f"pass (add quantize{{{target.quantize}}}, or build an unquantized target)")
    return pipeline_to_text(passes)


def _refuse_empty_quantization(record: dict, model: Path) -> None:
    if record["quantized"]:
        return
    reasons = sorted(set(record.get("kept_reasons", {}).values())) or ["no linear matched the policy"]
    raise QwenError(f"{model}: {record['label']} would quantize no linear of this model "
                    f"({'; '.join(reasons[:3])}); refusing to build an artifact labelled {record['label']}")


def build_artifact(model: str | Path, target_name: str, out: str | Path, *, pipeline: str | None = None,
                   backend: str | None = None, force: bool = False, check: bool = True,
                   progress: Progress | None = None, extra_pipeline_hook=None,
                   quantize: str | None = None, mtp: bool = True) -> BuildReport:
    """Trace, run the pipeline, quantize, emit with the backend, check parity, write `out` atomically.

    `quantize` ("SCHEME [option=value ...]", e.g. "fp8-block128") replaces the target's quantize pass
    options (or adds the pass to an unquantized target's pipeline). A pipeline with a `quantize` pass
    gets its packed weights from `qwen35c.quant.build.prepare`; the recipe, calibration record and
    packed-weight digest go into the manifest's `quantization` section, and the build's own check
    compares the artifact with the quantization-emulating reference (quantization loss is `verify`'s
    job). Quantization and the check's references stream one decoder layer at a time; the check is
    recorded as not run, with the reason, when its estimated peak (`qwen35c.memory`) exceeds the
    memory available. `extra_pipeline_hook(graph) -> graph` runs after the passes (tests: a broken pass).

    A checkpoint with an MTP head gets it compiled too (`mtp=False` skips it), as a second graph
    through the same pipeline, when the backend runs drafts (`Backend.drafts`); the head's weights
    stay high precision (the policy) and a quantized LM head is the main graph's packed one."""
    from qwen35c.backends import get_backend
    from qwen35c.graph.trace import CheckpointWeights, trace_checkpoint
    from qwen35c.passes.manager import PassManager
    from qwen35c.targets import get_target

    start = time.perf_counter()
    stages = _Stages(progress)
    target = get_target(target_name)
    backend_name = backend or target.backend
    blocker = target.build_blocker(backend_name, quantize=quantize)
    if blocker:
        raise QwenError(blocker)
    impl = get_backend(backend_name, where="--backend")
    impl.setup()
    model = Path(model)
    if not (model / "config.json").is_file():
        raise QwenError(f"{model}: not a checkpoint directory (no config.json)")
    protected = protected_paths(model)
    out = check_output(Path(out), force, protected)     # fail before any work; checked again under the lock
    pipeline_text = resolve_pipeline(target, pipeline, quantize)

    stages.start("trace", f"tracing {model}")
    traced = trace_checkpoint(model)
    stages.done("trace")
    stages.start("passes", pipeline_text)
    result = PassManager(pipeline_text, verify_each=True).run(traced.graph)
    graph = result.graph
    if extra_pipeline_hook is not None:
        graph = extra_pipeline_hook(graph)
    stages.done("passes")
    mtp_graph = None
    if mtp and getattr(impl, "drafts", False) and _has_mtp(model):
        from qwen35c.graph.trace import trace_mtp
        from reference.config import load_config

        stages.start("mtp", "tracing and compiling the MTP head")
        mtp_graph = PassManager(pipeline_text, verify_each=True).run(trace_mtp(load_config(model))).graph
        stages.done("mtp")

    prepared = None
    if graph.metadata.get("quantization") is not None:
        from qwen35c.quant.build import prepare

        _refuse_empty_quantization(graph.metadata["quantization"], model)
        meta = graph.metadata["quantization"]
        stages.start("quantize", f"packing {len(meta['quantized'])} linears ({meta['label']})")
        prepared = prepare(model, meta)
        graph.metadata["quantization"] = prepared.record
        if mtp_graph is not None:
            _check_mtp_quantization(mtp_graph, prepared.record)
        stages.done("quantize")
    stages.start("sources", "hashing checkpoint files")
    sources = source_hashes(model)
    stages.done("hash-sources")

    warnings: list[str] = []
    with atomic_directory(out, force, protected) as tmp:
        weights = CheckpointWeights(model)
        ctx = _emit_context(weights, prepared, target, graph, stages)
        ctx.mtp = mtp_graph
        section = impl.emit(graph, tmp, ctx)
        if prepared is not None:
            prepared.release()
        return_freed_memory()          # the emitter's buffers: ~0.7 GB of free heap at 4b otherwise
        stages.done("emit")
        unused = _unused(weights, prepared)
        if unused:
            warnings.append(f"{len(unused)} checkpoint tensors are not part of the model and were not compiled: "
                            + ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
        for name in COPIED_MODEL_FILES:
            if (model / name).is_file():
                shutil.copyfile(model / name, tmp / name)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "versions": tool_versions(),
            "target": target.to_json(),
            "backend": section,
            "engine": impl.engine_status(section),
            "source": {"path": str(model.absolute()), "files": sources,
                       "model_type": graph.metadata.get("model_type")},
            "pipeline": pipeline_text,
            "passes": [{"name": s.name, "changed": s.changed, "num_matches": s.num_matches} for s in result.stats],
            "parity": {"status": "not run", "detail": "--no-check"},
        }
        if prepared is not None:
            manifest["quantization"] = prepared.record
        write_manifest(tmp, manifest)
        settle(tmp)   # durable before the rename, and read back by the check (and verify) in small pages
        blocker = _memory_blocker(weights.config, prepared) if check else None
        if blocker:
            manifest["parity"] = {"status": "not run", "passed": None, "by": "build", "summary": blocker}
            warnings.append(f"the build's parity check did not run: {blocker}")
            write_manifest(tmp, manifest)
        elif check:
            stages.start("check", "parity against the reference")
            manifest["parity"] = _check(impl, tmp, manifest, model, prepared)
            write_manifest(tmp, manifest)
            stages.done("check")
            if not manifest["parity"]["passed"]:
                from qwen35c.verify import ParityFailure

                raise ParityFailure(f"build parity check failed: {manifest['parity']['summary']}; "
                                    f"nothing was written to {out}")
        stages.start("write", f"renaming into {out}")
    return BuildReport(out, manifest, time.perf_counter() - start, stages.times, warnings)


def _has_mtp(model: Path) -> bool:
    """The config declares an MTP layer and the checkpoint holds its tensors (text-only exports of
    Qwen3.5 often drop them)."""
    from reference.checkpoint import Checkpoint
    from reference.config import load_config

    return load_config(model).mtp_num_hidden_layers > 0 and any(n.startswith("mtp.") for n in Checkpoint(model).names())


def _check_mtp_quantization(graph, record: dict) -> None:
    """The MTP graph may quantize only what the main graph's build packed (its LM head, shared)."""
    own = set((graph.metadata.get("quantization") or {}).get("quantized", []))
    extra = sorted(own - set(record["quantized"]))
    if extra:
        raise QwenError(f"the MTP head would quantize {', '.join(extra[:3])}, which the model's own quantization "
                        f"did not pack; the MTP head stays high precision (exclude mtp.* from the recipe)")


def _emit_context(weights, prepared, target, graph, stages: _Stages):
    from qwen35c.backends.base import EmitContext

    source = weights
    if prepared is not None:
        from qwen35c.passes.quantize import quantized_weight_source
        from qwen35c.quant.recipe import Recipe

        source = quantized_weight_source(weights, Recipe.from_dict(prepared.record["recipe"]), prepared.quantized)

    def release(name: str) -> None:
        if "#" not in name:
            weights.release(name)
        elif prepared is not None:     # packed parts (`<name>#<part>`) come from `prepared`, not the checkpoint
            prepared.release()

    total = max(1, sum(1 for n in graph.nodes if n.op == "weight"))
    seen = [0]

    def on_weight(name: str) -> None:
        seen[0] += 1
        stages.report("emit", name, seen[0] / total)

    return EmitContext(weights=source, release=release, on_weight=on_weight,
                       tied_lm_head=bool(weights.config.tie_word_embeddings), target=target,
                       quantization=prepared.record if prepared is not None else None)


def _unused(weights, prepared) -> list[str]:
    """Checkpoint tensors the build never compiled: not read by the emitter, nor quantized (the
    packed weights of a quantized build come from `prepare`, which reads the checkpoint itself)."""
    import re

    from qwen35c.quant.policy import canonical_name

    packed = set(prepared.record["quantized"]) | set(prepared.record["not_lowered"]) if prepared else set()
    if prepared and prepared.record.get("embedding", "").startswith("shared"):
        packed.add("model.embed_tokens.weight")       # the lookup gathers the tied head's codes
    # per-expert units of a fused checkpoint tensor (quantized_moe) stand for the stacked tensor
    packed |= {re.sub(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$",
                      lambda m: ".experts." + ("down_proj" if m[1] == "down" else "gate_up_proj"), n) for n in packed}
    return [n for n in weights.unused() if not n.startswith("mtp.") and canonical_name(n) not in packed]


def _memory_blocker(config, prepared) -> str | None:
    """Why the check would not fit in this machine's memory (`qwen35c.memory.check_blocker`)."""
    from qwen35c.memory import check_blocker

    precision = "int4" if prepared is not None and prepared.record["precision"] == "int4" else "fp32"
    return check_blocker(config, precision)


def _check(impl, directory: Path, manifest: dict, model: Path, prepared) -> dict:
    """The build's own parity check, on the artifact as written (through the backend's loader),
    against the reference the backend names (the fp32 reference or an emulating one). The artifact
    runs first and its logits are recorded; it is gone before the reference runs (`verify.record`),
    so the check's peak is the larger of the two, not their sum."""
    from qwen35c.targets import lowering_gate
    from qwen35c.verify import PROMPT_SETS, prompt_plan, quick_parity, record

    def run_artifact(prompts: str):
        session = impl.load(directory, manifest, threads=1, lean=True)
        recorded = record(session, prompt_plan(session.config.vocab_size, **PROMPT_SETS[prompts]))
        mode = session.mode
        del session
        return_freed_memory()
        return recorded, mode

    # This gate is statistical (KL and top-1 against the reference's own noise floor on the same
    # prompts): the short set's ~90 positions make a noisy estimate of both.
    # A backend that runs fast checks on the full set (~575 positions); a slow one (the Triton
    # interpreter) on the short set first, and when that fails, the full set decides.
    statistical = lowering_gate(manifest.get("quantization")) == "quantized-activations"
    prompts = getattr(impl, "statistical_check_prompts", "short") if statistical else "short"
    recorded, mode = run_artifact(prompts)
    reference, precision, against = impl.reference(model, manifest, prepared, mode)
    result = quick_parity(recorded, reference, precision, against)
    if not result["passed"] and precision == "quantized-activations" and prompts == "short":
        recorded, _ = run_artifact("full")
        result = quick_parity(recorded, reference, precision, against)
        result["summary"] += " (the short prompt set failed; the full set decided)"
    return result


__all__ = ["BuildReport", "Progress", "build_artifact", "resolve_pipeline"]
