"""The process's memory, through glibc and Linux: hand freed heap back, keep big blocks off the
heap, drop the clean pages of mapped weight files. No torch here: the ONNX runtime uses it too.
Every function is a no-op where glibc or /proc is missing."""

from __future__ import annotations

import contextlib
from pathlib import Path


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc `malloc_trim`): a dropped layer's buffers
    would otherwise stay in the process's RSS as fragmented free heap."""
    if _libc():
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def freed_blocks_unmapped():
    """While inside, glibc serves every allocation of 128 KiB or more from its own mapping, unmapped
    as soon as it is freed (`mallopt(M_MMAP_THRESHOLD)`). By default a freed mapped block raises
    glibc's threshold to its size, so a later run's intermediates of up to that size come from the
    heap and stay there, free but resident: ONNX Runtime without its arena (a lean session) held
    about twice its working set that way (0.8b cpu-int4, the check's full prompt set: a run's peak
    over the loaded session 711 -> 541 MiB, the runs 7-20% slower). On leaving, the threshold is
    32 MiB, where glibc's own dynamic one ends up (setting it turns the dynamic one off for good;
    torch code runs as fast as with the default, unlike at 128 KiB)."""
    if _libc():
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        if _LIBC:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def drop_mapped_pages(files: list[Path]) -> int:
    """Drop the resident pages of this process's mappings of `files` that hold no private copy of a
    page (smaps `Anonymous: 0 kB`: nothing was written through them), with madvise(MADV_DONTNEED).
    Such a page is the file's own bytes; touching it again maps it back from the page cache, so
    nothing changes but the resident set. Returns the bytes of the mappings dropped.

    Why: ONNX Runtime maps each external initializer and reads it all while prepacking. Where the
    prepacked copy replaces the original, ORT unmaps it; where another node still reads the
    original, every page stays resident beside the packed copy (cpu-int4's shared 8-bit table:
    the LM head's MatMulNBits packs it, the embedding's GatherBlockQuantized reads a row a token)."""
    wanted = {str(Path(f).resolve()) for f in files}
    if not wanted or not _libc():
        return 0
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    dropped, mapping = 0, None
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):   # a mapping's header line
            mapping = head if len(head) == 6 and head[5] in wanted else None
        elif mapping is not None and line.startswith("Anonymous:"):
            if line.split()[1] == "0":
                lo, hi = (int(x, 16) for x in mapping[0].split("-"))
                if _LIBC.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
                    dropped += hi - lo
            mapping = None
    return dropped


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC = None
_M_MMAP_THRESHOLD = -3
_MADV_DONTNEED = 4

__all__ = ["drop_mapped_pages", "freed_blocks_unmapped", "return_freed_memory"]
