"""Tensors out of memory while a build works: written to a scratch file, mapped back.

Sequential quantization (`qwen35c.quant.sequential`) holds one decoder layer at a time, but the packed
weights it produces used to stay in memory until the build had emitted and checked them: 57 MB a
layer on a 4B model in INT4 (1.8 GB by the last layer, on top of that layer's GPTQ temporaries), the
whole quantized model for a 397B one. The parity check likewise records the artifact's logits
before the reference runs (248K-vocabulary rows: ~1 MB a position, ~0.6 GB for the full prompt set).

`Spill.tensors` writes tensors to a scratch safetensors file that has no name (Linux O_TMPFILE; else one
unlinked as soon as it is mapped), maps it, and returns read-only views of the mapping: the bytes are
the same, the file disappears with the last view (nothing is left behind, whatever happens to the
process), and pages a reader touched are dropped again by `release()`. `PackedSpill.put` does it for
a layer's packed weights in place. The scratch directory is the system's temporary directory
(`TMPDIR`), or the one given.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
from pathlib import Path

from torch import Tensor

from qwen35c.errors import QwenError
from reference.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["PackedSpill", "Spill"]


class Spill:
    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory or tempfile.gettempdir())
        self.files: list[SafetensorsFile] = []

    def tensors(self, tensors: dict[str, Tensor], what: str = "tensors") -> dict[str, Tensor]:
        """The same tensors as read-only views of a mapped scratch file that has no name: an O_TMPFILE
        inode where the filesystem offers it (a process killed mid-write leaves nothing behind), else
        a named file unlinked as soon as it is mapped. A full scratch disk is a QwenError naming the
        directory and what was being written."""
        if not tensors:
            return {}
        fd, name = _scratch(self.directory)
        path = Path(f"/proc/self/fd/{fd}") if name is None else name
        try:
            write_safetensors(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__)
            file = SafetensorsFile(path)
        except OSError as err:
            raise QwenError(f"{self.directory}: cannot write the {what} to a scratch file ({err.strerror}); "
                            f"point TMPDIR at a directory with room for them") from None
        finally:
            os.close(fd)
            if name is not None:
                name.unlink(missing_ok=True)
        self.files.append(file)
        return {key: file.view(key) for key in tensors}

    def release(self) -> None:
        """Drop every page of the spilled tensors from this process's memory (read back from disk
        when touched again)."""
        for file in self.files:
            file.release_all()


def _scratch(directory: Path) -> tuple[int, Path | None]:
    """A read-write scratch file in `directory`: (fd, None) for an unnamed O_TMPFILE inode, else
    (fd, path) of a fresh named one."""
    try:
        if hasattr(os, "O_TMPFILE"):
            try:
                return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), None
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
        fd, name = tempfile.mkstemp(prefix="qwen35c-spill-", suffix=".safetensors", dir=directory)
        return fd, Path(name)
    except OSError as err:
        raise QwenError(f"{directory}: cannot create a scratch file ({err.strerror}); point TMPDIR at a "
                        f"writable directory") from None


class PackedSpill(Spill):
    def __init__(self, directory: str | Path | None = None):
        super().__init__(directory)
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
