"""`qwen35c engine`: stage 2 of the tensorrt backend, driven like `build` drives stage 1.

The bundle is opened through the artifact loader (every file hash-checked, the plugins' PTX
included); `backends/tensorrt/engine.py` builds the engine where TensorRT and a GPU of the bundle's
SM are (`EngineUnavailable`, exit 3, otherwise: checked before anything is written). The engine then
runs the verify prompt set against the bundle's own reference (the backend's `reference`, over
the source checkpoint once it hashes as recorded), and `out`
becomes a Triton Inference Server model repository (`NAME/config.pbtxt` from the bundle,
`NAME/1/model.plan`) with `engine.json` (TensorRT version, GPU, the bundle manifest's digest, the
parity report), written atomically; a failed parity check writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qwen35c.errors import QwenError


def build_engine(bundle: str | Path, out: str | Path, force: bool = False, say=print) -> dict:
    from qwen35c.artifact import MANIFEST, artifact_file, atomic_directory, check_output, protected_paths
    from qwen35c.backends.tensorrt.engine import (MAX_BATCH, MAX_CACHE, MAX_TOKENS, EngineSession,
                                                  EngineUnavailable, build_plan, engine_blocker, gpu_name)
    from qwen35c.runtime import open_checked
    from qwen35c.verify import PROMPT_SETS, ParityFailure, prompt_plan, quick_parity, record, source_checkpoint

    bundle, out = Path(bundle), Path(out)
    manifest, backend = open_checked(bundle)
    section = manifest["backend"]
    if section["name"] != "tensorrt":
        raise QwenError(f"{bundle}: a {section['name']} artifact, not a TensorRT bundle (build one with "
                        f"--backend tensorrt)")
    sm = (section.get("plugins") or {}).get("sm") or manifest["target"]["sm"]
    blocker = engine_blocker(sm)
    if blocker:
        raise EngineUnavailable(f"engine not built: {blocker}; nothing was written to {out}")
    protected = protected_paths(bundle)
    check_output(out, force, protected)
    source = source_checkpoint(bundle, manifest, say=say)
    plan = build_plan(bundle, manifest, say)
    with atomic_directory(out, force, protected) as tmp:
        entry = tmp / section["serving"]["name"]
        (entry / "1").mkdir(parents=True)
        (entry / "1" / "model.plan").write_bytes(plan)
        (entry / "config.pbtxt").write_bytes(artifact_file(bundle, manifest, section["serving"]["config"]).read_bytes())
        session = EngineSession(bundle, manifest, plan)
        say("running the engine on the verify prompt set")
        recorded = record(session, prompt_plan(session.config.vocab_size, **PROMPT_SETS["full"]))
        reference, gate, against = backend.reference(source, manifest, None, session.mode)
        report = quick_parity(recorded, reference, gate, against)
        import tensorrt as trt

        engine = {"tensorrt": trt.__version__, "sm": sm, "gpu": gpu_name(),
                  "bundle": {"path": str(bundle.absolute()),
                             "manifest_sha256": hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()},
                  "profile": {"batch": MAX_BATCH, "tokens": MAX_TOKENS, "cache": MAX_CACHE}, "parity": report}
        (tmp / "engine.json").write_text(json.dumps(engine, indent=1, sort_keys=True) + "\n")
        if not report["passed"]:
            raise ParityFailure(f"engine parity check failed: {report['summary']}; nothing was written to {out}")
    return engine


__all__ = ["build_engine"]
