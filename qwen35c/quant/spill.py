"""Packed weights out of memory while a model is quantized.

Sequential quantization (`qwen35c.quant.sequential`) holds one decoder layer at a time, but the packed
weights it produces used to stay in memory until the build had emitted and checked them: 57 MB a
layer on a 4B model in INT4 (1.8 GB by the last layer, on top of that layer's GPTQ temporaries), the
whole quantized model for a 397B one. `PackedSpill.put` writes a layer's packed tensors to a scratch
safetensors file as soon as they exist, maps the file and unlinks it, and replaces the tensors with
read-only views of the mapping: the bytes are the same, the file disappears with the last view
(nothing is left behind, whatever happens to the process), and pages the emitter or the check
touch are dropped again by `release()`. The scratch directory is the system's temporary directory
(`TMPDIR`), or the one given.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from qwen35c.errors import QwenError
from reference.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["PackedSpill"]


class PackedSpill:
    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix="qwen35c-packed-", dir=directory))
        self.files: list[SafetensorsFile] = []
        self.spilled: set[str] = set()

    def put(self, weights: dict) -> None:
        """Move the tensors of every packed weight in `weights` (name -> packed weight dataclass) that
        is not on disk yet to disk."""
        names = sorted(set(weights) - self.spilled)
        tensors = {f"{name}#{f.name}": value for name in names for f in dataclasses.fields(weights[name])
                   if isinstance(value := getattr(weights[name], f.name), Tensor)}
        if not tensors:
            return
        path = self.directory / f"{len(self.files):05d}.safetensors"
        try:
            write_safetensors(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise QwenError(f"{path}: cannot write the packed weights ({err.strerror}); point TMPDIR at a "
                            f"directory with room for the quantized model") from None
        try:
            file = SafetensorsFile(path)
        finally:
            path.unlink()
        self.files.append(file)
        for key in tensors:
            name, field = key.split("#")
            setattr(weights[name], field, file.view(key))
        self.spilled.update(names)

    def release(self) -> None:
        """Drop every page of the spilled tensors from this process's memory (read back from disk
        when touched again)."""
        for file in self.files:
            file.release_all()

    def close(self) -> None:
        """Remove the scratch directory (its files are unlinked already; the views stay valid)."""
        shutil.rmtree(self.directory, ignore_errors=True)
