"""Streaming safetensors I/O with bounded memory.

Reading memory-maps each file and hands out zero-copy views; `release()` drops a tensor's pages
again, so loading a model costs its weight bytes once, not twice. Writing lays out the header
first and then streams tensors one at a time, so a checkpoint larger than RAM can be written.
The format is the standard one (8-byte little-endian header size, JSON header, raw data); the
`safetensors` library reads what this writes (checked in the tests).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from reference.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    """One memory-mapped .safetensors file: `keys()`, `shape(name)`, `view(name)`, `release(name)`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open ({err.strerror})") from None
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_size,) = struct.unpack("<Q", self._file.read(8))
        if header_size > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_size} header bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(self._file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                  f"expected an object of tensor entries)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._start = 8 + header_size
        self._entries = {}
        data_size = size - self._start
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry {entry!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{path}: tensor '{name}' declares {end - begin} bytes for shape "
                                      f"{list(shape)} {entry['dtype']}")
            if end > data_size:
                raise CheckpointError(f"{path}: truncated file: tensor '{name}' needs bytes up to {end} "
                                      f"but the data section has {data_size}")
            self._entries[name] = (dtype, shape, begin)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > self._start else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def view(self, name: str) -> torch.Tensor:
        """A read-only zero-copy tensor over the mapped bytes (copy it before mutating)."""
        dtype, shape, begin = self._entries[name]
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        import warnings
        with warnings.catch_warnings():  # why: the mapping is read-only; callers copy before writing
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=dtype, count=numel, offset=self._start + begin)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Tell the kernel the tensor's pages are no longer needed (they stay readable, from disk)."""
        dtype, shape, begin = self._entries[name]
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        numel = 1
        for d in shape:
            numel *= d
        page = mmap.PAGESIZE
        lo = (self._start + begin) // page * page
        hi = self._start + begin + numel * dtype.itemsize
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_all(self) -> None:
        """`release` for every tensor of the file at once."""
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._map = None  # views may still reference the mapping; it is freed with them
        self._file.close()


def write_safetensors(path: Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: `specs` gives (name, dtype, shape) in file order, `produce(name)`
    returns each tensor when its turn comes. Peak memory is one tensor."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, "
                                 f"declared {dtype} {list(shape)}")
            data = tensor.detach().contiguous().cpu()
            out.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
