"""One loading API for everything qwen35c can run: `load(path) -> Session`.

A checkpoint directory gives a `ReferenceSession` (the eager reference model); compiled artifacts
give their backend's session. Every session has `prefill`, `decode` and `generate` with the same
meaning, so `run`, `perplexity` and `verify` do not care which one they hold.
"""

from __future__ import annotations

from pathlib import Path

from qwen35c.runtime.session import GenerationResult, ReferenceSession, Session, load_tokenizer

__all__ = ["GenerationResult", "ReferenceSession", "Session", "load", "load_tokenizer"]


def load(path: str | Path, dtype: str = "float32", *, check: bool = True, threads: int | None = None) -> Session:
    """Open a checkpoint directory or a compiled artifact (a directory with manifest.json).

    Artifacts are checked against their manifest first (every file's size and sha256; `check=False`
    skips it); `dtype` applies to checkpoints only (an artifact's precision is fixed by its target).
    """
    path = Path(path)
    if (path / "manifest.json").exists():
        from qwen35c.artifact import open_artifact
        from qwen35c.errors import QwenError

        manifest = open_artifact(path, check=check)
        backend = manifest["backend"].get("name")
        if backend == "onnx":
            from qwen35c.backends.onnx.session import OnnxSession

            return OnnxSession(path, manifest, threads=threads)
        raise QwenError(f"{path}: artifacts of backend '{backend}' cannot be run by this install")
    return ReferenceSession.from_checkpoint(path, dtype)
