"""Backends: each lowers the stateful IR into files and loads them back as a `Session`.

The seam (`base.Backend`) is all that `build`, `verify`, `runtime.load` and the commands know of
a backend: `emit(...)` writes the payload and returns the manifest's `backend` section,
`validate(section, ...)` checks that section's types and that every file it names is listed (so
hash-checked), and `load(directory, manifest)` returns a session. Backends are imported lazily.
"""

from __future__ import annotations

import importlib

from qwen35c.errors import QwenError

# name -> "module:attribute" of its Backend instance
REGISTRY = {
    "onnx": "qwen35c.backends.onnx.backend:BACKEND",
    "triton": "qwen35c.backends.triton.backend:BACKEND",
    "tensorrt": "qwen35c.backends.tensorrt.backend:BACKEND",
}


def get_backend(name: str, where: str = "backend"):
    """The Backend registered as `name`; a QwenError naming `where` for an unknown one."""
    if name not in REGISTRY:
        raise QwenError(f"{where}: unknown backend '{name}' (known: {', '.join(REGISTRY)})")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["REGISTRY", "get_backend"]
