"""The data split of the bundled tiny models: the running interpreter's standard library.

Every `*.py` under `sysconfig.get_paths()['stdlib']`, sorted by relative path, minus test suites,
`site-packages` and generated tables, is training data, except the files in `HELD_OUT`, which are
used only for evaluation (held-out perplexity, quantization loss). Offline on every machine.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

__all__ = ["EXCLUDED_DIRS", "HELD_OUT", "corpus_digest", "corpus_facts", "corpus_files", "read_text",
           "stdlib_dir"]

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}
# Held out for evaluation (relative to the stdlib dir; present in every CPython >= 3.9).
HELD_OUT = ["bisect.py", "colorsys.py", "fractions.py", "graphlib.py", "heapq.py", "json/encoder.py",
            "queue.py", "shlex.py", "statistics.py", "textwrap.py"]



def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(split: str) -> list[Path]:
    """The sorted training ('train') or held-out ('heldout') files of this interpreter's stdlib."""
    root = stdlib_dir()
    if split == "heldout":
        return [root / name for name in HELD_OUT if (root / name).exists()]
    held = {root / name for name in HELD_OUT}
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS or path in held or not path.is_file():
            continue
        files.append(path)
    return files


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def corpus_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    root = stdlib_dir()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def corpus_facts() -> dict:
    root = stdlib_dir()
    train, held = corpus_files("train"), corpus_files("heldout")
    return {
        "source": "Python standard library *.py files of the training interpreter",
        "python": platform.python_version(),
        "stdlib_dir": str(root),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "train_files": len(train),
        "train_bytes": sum(f.stat().st_size for f in train),
        "train_sha256": corpus_digest(train),
        "heldout_files": [f.relative_to(root).as_posix() for f in held],
        "heldout_bytes": sum(f.stat().st_size for f in held),
        "heldout_sha256": corpus_digest(held),
    }
