"""One loading API for everything qwen35c can run: `load(path) -> Session`.

A checkpoint directory gives a `ReferenceSession` (the eager reference model); compiled artifacts
give their backend's session. Every session has `prefill`, `decode` and `generate` with the same
meaning, so `run`, `perplexity` and `verify` do not care which one they hold.
"""

from __future__ import annotations

from pathlib import Path

from qwen35c.runtime.session import GenerationResult, ReferenceSession, Session, load_tokenizer

__all__ = ["GenerationResult", "ReferenceSession", "Session", "load", "load_tokenizer"]


def load(path: str | Path, dtype: str = "float32") -> Session:
    """Open a checkpoint directory (or, once built, a compiled artifact) for inference."""
    path = Path(path)
    if (path / "manifest.json").exists():
        from qwen35c.errors import QwenError

        raise QwenError(f"{path}: compiled artifacts are not loadable yet (no backend runtime in this build)")
    return ReferenceSession.from_checkpoint(path, dtype)
