"""Tensors out of memory while a build works: written to a scratch file, mapped back.

Sequential quantization (`qwen35c.quant.sequential`) holds one decoder layer at a time, but the packed
weights it produces used to stay in memory until the build had emitted and checked them: 57 MB a
layer on a 4B model in INT4 (1.8 GB by the last layer, on top of that layer's GPTQ temporaries), the
whole quantized model for a 397B one. The parity check likewise records the artifact's logits
before the reference runs (248K-vocabulary rows: ~1 MB a position, ~0.6 GB for the full prompt set).

`Spill.tensors` writes tensors to a scratch safetensors file, maps the file and unlinks it, and returns
read-only views of the mapping: the bytes are the same, the file disappears with the last view
(nothing is left behind, whatever happens to the process), and pages a reader touched are dropped
again by `release()`. `PackedSpill.put` does it for a layer's packed weights in place. The scratch
directory is the system's temporary directory (`TMPDIR`), or the one given.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from qwen35c.errors import QwenError
from reference.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["PackedSpill", "Spill"]


class Spill:
    def __init__(self, directory: str | Path | None = None, prefix: str = "qwen35c-spill-"):
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
        self.files: list[SafetensorsFile] = []

    def tensors(self, tensors: dict[str, Tensor], what: str = "tensors") -> dict[str, Tensor]:
        """The same tensors as read-only views of a mapped, already unlinked scratch file. A full
        scratch disk is a QwenError naming the file and `what` was being written."""
        if not tensors:
            return {}
        path = self.directory / f"{len(self.files):05d}.safetensors"
        try:
            write_safetensors(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise QwenError(f"{path}: cannot write the {what} ({err.strerror}); point TMPDIR at a "
                            f"directory with room for them") from None
        try:
            file = SafetensorsFile(path)
        finally:
            path.unlink()
        self.files.append(file)
        return {key: file.view(key) for key in tensors}

    def release(self) -> None:
        """Drop every page of the spilled tensors from this process's memory (read back from disk
        when touched again)."""
        for file in self.files:
            file.release_all()

    def close(self) -> None:
        """Remove the scratch directory (its files are unlinked already; the views stay valid)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PackedSpill(Spill):
    def __init__(self, directory: str | Path | None = None):
        super().__init__(directory, prefix="qwen35c-packed-")
        self.spilled: set[str] = set()

    def put(self, weights: dict) -> None:
        """Move the tensors of every packed weight in `weights` (name -> packed weight dataclass) that
        is not on disk yet to disk."""
        names = sorted(set(weights) - self.spilled)
        tensors = {f"{name}#{f.name}": value for name in names for f in dataclasses.fields(weights[name])
                   if isinstance(value := getattr(weights[name], f.name), Tensor)}
        for key, view in self.tensors(tensors, "packed weights (the quantized model)").items():
            name, field = key.split("#")
            setattr(weights[name], field, view)
        self.spilled.update(names)
