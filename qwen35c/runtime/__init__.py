"""One loading API for everything qwen35c can run: `load(path) -> Session`.

A checkpoint directory gives a `ReferenceSession` (the eager reference model); compiled artifacts
give their backend's session. Every session has `prefill`, `decode` and `generate` with the same
meaning, so `run`, `perplexity` and `verify` do not care which one they hold.
"""

from __future__ import annotations

from pathlib import Path

from qwen35c.runtime.generation import GenerationResult
from qwen35c.runtime.session import ReferenceSession, Session, load_tokenizer

__all__ = ["GenerationResult", "ReferenceSession", "Session", "is_artifact_dir", "load", "load_tokenizer",
           "open_checked"]


def is_artifact_dir(path: str | Path) -> bool:
    """A directory with a manifest.json entry (of any kind: `open_checked` says whether it is valid)."""
    import os

    return os.path.lexists(Path(path) / "manifest.json")


def open_checked(path: str | Path, check: bool = True):
    """The one artifact validator of `verify`, `run`, `perplexity` and `load`: the manifest's types
    and paths, the backend's own section, then (with `check`) every file's size and sha256.
    Returns (manifest, backend)."""
    from qwen35c.artifact import MANIFEST, ManifestChecker, check_files, read_manifest
    from qwen35c.backends import get_backend

    path = Path(path)
    manifest = read_manifest(path)
    backend = get_backend(manifest["backend"]["name"], where=f"{path / MANIFEST}: key 'backend.name'")
    backend.validate(manifest["backend"], ManifestChecker(path / MANIFEST), manifest["files"])
    if check:
        check_files(path, manifest)
    return manifest, backend


def load(path: str | Path, dtype: str = "float32", *, check: bool = True, threads: int | None = None,
         drafting: bool = False) -> Session:
    """Open a checkpoint directory or a compiled artifact (a directory with manifest.json).

    Artifacts are validated and checked against their manifest first (every file's size and sha256;
    `check=False` skips the hashing, for a caller that just did it); `dtype` applies to checkpoints
    only (an artifact's precision is fixed by its target). `drafting=True` opens an artifact's model
    joined with its MTP head, for `generate(..., speculative=K, drafter="mtp")` (the same session
    `Session.drafting()` gives, without loading the plain model first).
    """
    path = Path(path)
    if is_artifact_dir(path):
        manifest, backend = open_checked(path, check=check)
        return backend.load(path, manifest, threads=threads, drafting=drafting)
    return ReferenceSession.from_checkpoint(path, dtype)
