"""Compiled artifacts: a directory with manifest.json, the backend payload and copied model files.

manifest.json holds the schema version; qwen35c, torch, onnx and onnxruntime versions; the target;
the sha256 of every source checkpoint file; the full pipeline text (every option spelled out); the
sha256 and size of every artifact file (all files but manifest.json); the engine status; and the
parity summary of the build's own check. Nothing time- or host-dependent is written, so two builds
of the same inputs are byte-identical.

A build writes into a temporary sibling (`.<name>.tmp-<pid>`) and renames it into place at the
end; a failure, SIGINT or SIGTERM removes the temporary directory, so the output path holds a
complete artifact or nothing. An existing output is replaced only with `force`, by renaming it
aside first and deleting it after the new one is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qwen35c.errors import QwenError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COPIED_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class ArtifactError(QwenError):
    """A missing, corrupt, tampered or incompatible artifact (exit 2); the message names the file."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("qwen35c", "torch", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def file_table(directory: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file except the manifest, sorted."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def source_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(Path(model_dir).iterdir())
            if p.is_file() and (p.suffix in (".json", ".safetensors") or p.name == "tokenizer.json")}


def write_manifest(directory: Path, manifest: dict) -> None:
    """Fills manifest["files"] from the directory (in place) and writes manifest.json."""
    manifest["files"] = file_table(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    file = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    if not file.exists():
        raise ArtifactError(f"{file}: missing (not a qwen35c artifact)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{file}: malformed JSON ({err})") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise ArtifactError(f"{file}: no schema_version")
    version = manifest["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ArtifactError(f"{file}: schema version {version} is newer than this qwen35c understands "
                            f"({SCHEMA_VERSION}); upgrade qwen35c")
    for key in ("target", "backend", "files"):
        if key not in manifest:
            raise ArtifactError(f"{file}: missing key '{key}'")
    return manifest


def check_files(directory: str | Path, manifest: dict) -> list[str]:
    """Raise ArtifactError naming the first missing, resized or modified file; returns the files checked."""
    directory = Path(directory)
    for rel, entry in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["size"]:
            raise ArtifactError(f"{path}: size {path.stat().st_size} != {entry['size']} in the manifest (modified)")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (modified or corrupt)")
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.relative_to(directory).as_posix() not in listed)
    if extra:
        raise ArtifactError(f"{directory / extra[0]}: not listed in the manifest (unexpected file)")
    return sorted(manifest["files"])


def open_artifact(directory: str | Path, check: bool = True) -> dict:
    manifest = read_manifest(directory)
    if check:
        check_files(directory, manifest)
    return manifest


# ---- atomic output -------------------------------------------------------------------------------

@contextlib.contextmanager
def _signals_raise():
    """SIGTERM becomes an exception (SIGINT already is) so the cleanup below always runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool):
    """Yields a temporary sibling directory; renames it to `out` on success, removes it otherwise."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise QwenError(f"{out}: already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    done = False
    try:
        with _signals_raise():
            yield tmp
            aside = None
            if out.exists():
                aside = out.parent / f".{out.name}.old-{os.getpid()}"
                os.rename(out, aside)
            os.rename(tmp, out)
            done = True
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- build -----------------------------------------------------------------------------------------

@dataclass
class BuildReport:
    out: Path
    manifest: dict
    seconds: float
    stages: list[tuple[str, float]]


Progress = Callable[[str, str, float | None], None]   # (stage, message, fraction or None)


def build_artifact(model: str | Path, target_name: str, out: str | Path, *, pipeline: str | None = None,
                   backend: str | None = None, force: bool = False, check: bool = True,
                   progress: Progress | None = None, extra_pipeline_hook=None,
                   quantize: str | None = None) -> BuildReport:
    """Trace, run the pipeline, lower with the backend, check parity, write the artifact atomically.

    `quantize` ("SCHEME [option=value ...]", e.g. "fp8-block128") replaces the target's quantize pass
    options (or adds the pass to an unquantized target's pipeline); ignored when `pipeline` is given.
    A pipeline with a `quantize` pass gets its packed weights from `qwen35c.quant.build.prepare`
    (calibrated on the built-in calibration set when the recipe needs data); the recipe, calibration
    record and packed-weight digest go into the manifest's `quantization` section and the ONNX
    model's metadata, and the build's own check compares the artifact with the
    quantization-emulating reference at the fp32 gate (quantization loss is `verify`'s job).
    Quantization and the check's references stream one decoder layer at a time; the check is
    recorded as not run, with the reason, when its estimated peak (`qwen35c.memory`) exceeds the
    memory available."""
    from qwen35c.targets import get_target

    report = progress or (lambda stage, msg, frac: None)
    target = get_target(target_name)
    backend = backend or target.backend
    blocker = target.build_blocker(backend, quantize=None if pipeline else quantize)
    if blocker:
        raise QwenError(blocker)
    model = Path(model)
    if not (model / "config.json").is_file():
        raise QwenError(f"{model}: not a checkpoint directory (no config.json)")
    out = Path(out)
    if out.exists() and not force:
        raise QwenError(f"{out}: already exists (use --force to replace it)")

    from qwen35c.graph.trace import CheckpointWeights, trace_checkpoint
    from qwen35c.passes.manager import PassManager, parse_pipeline, pipeline_to_text

    start = time.perf_counter()
    stages: list[tuple[str, float]] = []

    def stage_done(name: str, t0: float) -> float:
        now = time.perf_counter()
        stages.append((name, now - t0))
        return now

    pipeline_text = pipeline_to_text(parse_pipeline(pipeline or target.full_pipeline(quantize)))
    t0 = time.perf_counter()
    report("trace", f"tracing {model}", None)
    traced = trace_checkpoint(model)
    t0 = stage_done("trace", t0)
    report("passes", pipeline_text, None)
    result = PassManager(pipeline_text, verify_each=True).run(traced.graph)
    graph = result.graph
    if extra_pipeline_hook is not None:  # tests: a deliberately broken pass
        graph = extra_pipeline_hook(graph)
    t0 = stage_done("passes", t0)
    report("sources", "hashing checkpoint files", None)
    sources = source_hashes(model)
    t0 = stage_done("hash-sources", t0)

    prepared = None
    if graph.metadata.get("quantization") is not None:
        from qwen35c.quant.build import prepare

        report("quantize", f"packing {len(graph.metadata['quantization']['quantized'])} linears "
                           f"({graph.metadata['quantization']['label']})", None)
        prepared = prepare(model, graph.metadata["quantization"])
        graph.metadata["quantization"] = prepared.record
        t0 = stage_done("quantize", t0)

    with atomic_directory(out, force) as tmp:
        weights = CheckpointWeights(model)
        source, release = weights, weights.release
        if prepared is not None:
            from qwen35c.passes.quantize import quantized_weight_source
            from qwen35c.quant.recipe import Recipe

            source = quantized_weight_source(weights, Recipe.from_dict(prepared.record["recipe"]), prepared.quantized)

            def release(name: str) -> None:
                if "#" not in name:
                    weights.release(name)
        total = sum(1 for n in graph.nodes if n.op == "weight")
        seen = [0]

        def on_weight(name: str) -> None:
            seen[0] += 1
            report("emit", name, seen[0] / max(total, 1))

        if backend != "onnx":  # pragma: no cover - blocked above
            raise QwenError(f"backend '{backend}' is not implemented")
        from qwen35c.backends.onnx.emit import emit_onnx

        emitted = emit_onnx(graph, source, tmp, on_weight=on_weight, release=release,
                            tied_lm_head=bool(weights.config.tie_word_embeddings))
        if prepared is not None:
            _annotate_onnx(emitted.model_file, {"qwen35c.quantization": json.dumps(prepared.record, sort_keys=True)})
        t0 = stage_done("emit", t0)
        for name in COPIED_MODEL_FILES:
            if (model / name).is_file():
                shutil.copyfile(model / name, tmp / name)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "versions": tool_versions(),
            "target": target.to_json(),
            "backend": {"name": backend, "model": emitted.model_file.name, "data": emitted.data_file.name,
                        "opset": 23, "domains": ["", "com.microsoft"], "min_onnxruntime": "1.32",
                        "states": [s.to_json() for s in emitted.states], "ops": emitted.ops,
                        "nodes": emitted.num_nodes, "interface": {
                            "inputs": ["input_ids i64[B,T]", "q_start i64[B]", "lengths i64[B]",
                                       "logit_positions i64[B,P]", "<states>"],
                            "outputs": ["logits f32[B,P,V]", "<state>.out"]}},
            "engine": {"status": "ready", "detail": "ONNX Runtime (CPUExecutionProvider) loads the model at run time"},
            "source": {"path": str(model.absolute()), "files": sources,
                       "model_type": graph.metadata.get("model_type")},
            "pipeline": pipeline_text,
            "passes": [{"name": s.name, "changed": s.changed, "num_matches": s.num_matches} for s in result.stats],
            "parity": {"status": "not run"},
        }
        if prepared is not None:
            manifest["quantization"] = prepared.record
        write_manifest(tmp, manifest)
        blocker = _memory_blocker(weights.config, prepared) if check else None
        if blocker:
            manifest["parity"] = {"status": "not run", "by": "build", "summary": blocker}
            write_manifest(tmp, manifest)
        elif check:
            report("check", "parity against the reference", None)
            from qwen35c.verify import quick_parity

            if prepared is None:
                manifest["parity"] = quick_parity(tmp, model, target.precision)
            else:
                from qwen35c.runtime.session import ReferenceSession

                emulation = ReferenceSession(prepared.emulated())
                from qwen35c.verify import lowering_gate

                manifest["parity"] = quick_parity(tmp, model, lowering_gate(prepared.record), reference=emulation,
                                                  against="quantization-emulating reference")
            write_manifest(tmp, manifest)
            t0 = stage_done("check", t0)
            if not manifest["parity"].get("passed", False):
                from qwen35c.verify import ParityFailure

                raise ParityFailure(f"build parity check failed: {manifest['parity']['summary']}; "
                                    f"nothing was written to {out}")
        report("write", f"renaming into {out}", None)
    return BuildReport(out, manifest, time.perf_counter() - start, stages)


def _memory_blocker(config, prepared) -> str | None:
    """Why the check would not fit in this machine's memory (`qwen35c.memory.check_blocker`)."""
    from qwen35c.memory import check_blocker

    precision = "int4" if prepared is not None and prepared.record["precision"] == "int4" else "fp32"
    return check_blocker(config, precision)


def _annotate_onnx(model_file: Path, props: dict[str, str]) -> None:
    """Add metadata_props to an emitted model.onnx (external data untouched; deterministic bytes)."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    for key, value in sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    model_file.write_bytes(proto.SerializeToString(deterministic=True))


__all__ = ["ArtifactError", "BuildReport", "MANIFEST", "SCHEMA_VERSION", "atomic_directory", "build_artifact",
           "check_files", "open_artifact", "read_manifest", "write_manifest"]
