"""The artifact format: manifest schema and validator, the file table, safe atomic outputs.

An artifact is a directory: `manifest.json` plus the files it lists. The manifest holds the schema
version; tool versions; the target; the sha256 of every source checkpoint file; the full pipeline
text; the sha256 and size of every other file (`files`); the backend section (what the runtime
opens, validated by the backend); the engine status; the parity summary of the build's own check.
Nothing time- or host-dependent is written, so two builds of the same inputs are byte-identical.

An artifact is untrusted input. `open_artifact` accepts it only when:
  * `manifest.json` is a regular file holding a JSON object whose every key has the right type
    (`validate_manifest`; a bad value names its key);
  * every path it names is a plain relative path inside the artifact (no `..`, no absolute path,
    no symlink on the way), and every path the backend opens is listed in `files` (the backend's
    `validate` checks its own section: `qwen35c.runtime.open_artifact_checked`);
  * the tree holds only regular files and directories (no symlink, FIFO, device), exactly the
    listed files plus the manifest, each of the recorded size and sha256.
The runtime opens only files that `artifact_file` resolved after that check.

Outputs never destroy what is not ours (`atomic_directory`, `atomic_file`): a build writes into a
temporary sibling under an exclusive lock on the output name and renames it into place; `force`
replaces only an empty directory or a qwen35c artifact (never the model directory, the current
directory or one of their parents), atomically (`renameat2(RENAME_EXCHANGE)`, or two renames that
are undone on failure, with SIGINT/SIGTERM held off between them); stale temporary siblings of
killed builds are removed by the next build to the same path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen35c.errors import QwenError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COPIED_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
PARTIAL_MARKER = ".qwen35c-partial"      # inside a temporary build directory until it is renamed into place
_MAX_MANIFEST_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(QwenError):
    """A missing, corrupt, tampered or incompatible artifact (exit 2); the message names the file or key."""


# ---- reading -------------------------------------------------------------------------------------

def _open_regular(path: Path, follow: bool = False):
    """Open a regular file for reading without blocking on a FIFO, nor following a symlink unless
    `follow` (checkpoints may be symlinks into a cache; artifacts never hold one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ArtifactError(f"{path}: is a symlink (artifacts hold regular files only)") from None
        raise ArtifactError(f"{path}: cannot open ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def sha256_file(path: Path, chunk: int = 1 << 22, follow: bool = False) -> str:
    digest = hashlib.sha256()
    with _open_regular(path, follow) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("qwen35c", "torch", "onnx", "onnxruntime", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def safe_relpath(rel: Any) -> bool:
    """A plain relative POSIX path that stays inside its directory."""
    if not isinstance(rel, str) or not rel or len(rel) > 1024 or "\\" in rel or "\0" in rel:
        return False
    return not rel.startswith("/") and all(part not in ("", ".", "..") for part in rel.split("/"))


def _walk(directory: Path) -> list[str]:
    """Relative paths of every file below `directory`; raises on a symlink or a special file."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"{path}: is a symlink (artifacts hold regular files only)")
            if stat.S_ISREG(mode):
                found.append(path.relative_to(directory).as_posix())
            elif not stat.S_ISDIR(mode):
                raise ArtifactError(f"{path}: not a regular file or directory")
    return sorted(found)


def file_table(directory: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file except the manifest, sorted."""
    table = {}
    for rel in _walk(directory):
        if rel in (MANIFEST, PARTIAL_MARKER):
            continue
        path = directory / rel
        table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def source_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of the checkpoint's json and safetensors files (symlinks followed: an HF cache's
    snapshot directory links into its blob store)."""
    return {p.name: sha256_file(p, follow=True) for p in sorted(Path(model_dir).iterdir())
            if p.is_file() and (p.suffix in (".json", ".safetensors") or p.name == "tokenizer.json")}


def _read_json(file: Path) -> Any:
    try:
        mode = os.lstat(file).st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{file}: missing (not a qwen35c artifact)") from None
    except OSError as err:
        raise ArtifactError(f"{file}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ArtifactError(f"{file}: is {kind}; a manifest must be a regular file")
    with _open_regular(file) as f:
        raw = f.read(_MAX_MANIFEST_BYTES + 1)
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{file}: larger than {_MAX_MANIFEST_BYTES >> 20} MiB (not a manifest)")
    try:
        return json.loads(raw, parse_constant=lambda c: _reject_constant(file, c))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ArtifactError(f"{file}: malformed JSON ({err})") from None


def _reject_constant(file: Path, constant: str):
    raise ArtifactError(f"{file}: {constant} is not valid JSON")


# ---- the manifest schema -------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ManifestChecker:
    """Type checks that name the manifest key at fault (`target.name`, `files["a/b"].size`)."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, key: str, why: str) -> ArtifactError:
        return ArtifactError(f"{self.file}: key '{key}' {why}")

    def dict(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object, got {type(value).__name__}")
        return value

    def str(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {type(value).__name__}")
        return value

    def int(self, value: Any, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f"an integer in [{minimum}, {maximum}]" if maximum is not None else f"an integer >= {minimum}"
            raise self.fail(key, f"must be {bound}, got {value!r}")
        return value

    def list(self, value: Any, key: str) -> list:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {type(value).__name__}")
        return value

    def relpath(self, value: Any, key: str) -> str:
        if not safe_relpath(value):
            raise self.fail(key, f"must be a plain relative path inside the artifact, got {value!r}")
        return value

    def listed(self, value: Any, key: str, files: dict) -> str:
        """A path the runtime opens: plain, relative, and covered by `files` (so hash-checked)."""
        self.relpath(value, key)
        if value not in files:
            raise self.fail(key, f"names '{value}', which is not listed in 'files' (not hash-checked)")
        return value


_REQUIRED = ("schema_version", "versions", "target", "backend", "engine", "source", "pipeline", "passes",
             "parity", "files")
_OPTIONAL = ("quantization",)


def validate_manifest(manifest: Any, file: Path) -> dict:
    """Raise ArtifactError naming the first key with a missing or mistyped value; returns the manifest."""
    from qwen35c.targets import TARGETS

    c = ManifestChecker(file)
    c.dict(manifest, "<manifest>")
    if "schema_version" not in manifest:
        raise ArtifactError(f"{file}: no schema_version (not a qwen35c manifest)")
    version = manifest["schema_version"]
    if not _is_int(version) or version < 1:
        raise c.fail("schema_version", f"must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{file}: schema version {version} is newer than this qwen35c understands "
                            f"({SCHEMA_VERSION}); upgrade qwen35c")
    for key in _REQUIRED:
        if key not in manifest:
            raise ArtifactError(f"{file}: missing key '{key}'")
    unknown = sorted(set(manifest) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise c.fail(unknown[0], "is not part of schema version 1")
    for name, value in c.dict(manifest["versions"], "versions").items():
        c.str(value, f"versions.{name}")
    files = c.dict(manifest["files"], "files")
    for rel, entry in files.items():
        key = f'files["{rel}"]'
        c.relpath(rel, key)
        if rel in (MANIFEST, PARTIAL_MARKER):
            raise c.fail(key, "names a reserved file")
        c.dict(entry, key)
        if not isinstance(entry.get("sha256"), str) or not _HEX64.fullmatch(entry["sha256"]):
            raise c.fail(f"{key}.sha256", "must be 64 lowercase hex digits")
        c.int(entry.get("size"), f"{key}.size")
    target = c.dict(manifest["target"], "target")
    name = c.str(target.get("name"), "target.name")
    if name not in TARGETS:
        raise c.fail("target.name", f"is '{name}', not a known target ({', '.join(TARGETS)})")
    backend = c.dict(manifest["backend"], "backend")
    c.str(backend.get("name"), "backend.name")   # the section itself: the backend's own `validate`
    engine = c.dict(manifest["engine"], "engine")
    c.str(engine.get("status"), "engine.status")
    source = c.dict(manifest["source"], "source")
    c.str(source.get("path"), "source.path")
    for rel, digest in c.dict(source.get("files"), "source.files").items():
        if not safe_relpath(rel) or "/" in rel:
            raise c.fail(f"source.files[\"{rel}\"]", "must be a file name")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise c.fail(f"source.files[\"{rel}\"]", "must be 64 lowercase hex digits")
    c.str(manifest["pipeline"], "pipeline")
    for i, entry in enumerate(c.list(manifest["passes"], "passes")):
        c.dict(entry, f"passes[{i}]")
    parity = c.dict(manifest["parity"], "parity")
    c.str(parity.get("status"), "parity.status")
    if "quantization" in manifest:
        _validate_quantization(c, manifest["quantization"])
    return manifest


def _validate_quantization(c: ManifestChecker, q: Any) -> None:
    from qwen35c.targets import GATES

    c.dict(q, "quantization")
    precision = c.str(q.get("precision"), "quantization.precision")
    if precision not in GATES:
        raise c.fail("quantization.precision", f"is '{precision}', expected one of {', '.join(GATES)}")
    c.str(q.get("label"), "quantization.label")
    c.dict(q.get("recipe"), "quantization.recipe")
    c.str(q.get("packed_sha256"), "quantization.packed_sha256")
    for key in ("quantized", "kept", "not_lowered"):
        for i, name in enumerate(c.list(q.get(key), f"quantization.{key}")):
            c.str(name, f"quantization.{key}[{i}]")


def read_manifest(directory: str | Path) -> dict:
    """The validated manifest of `directory` (files not yet hash-checked: see `check_files`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    file = directory / MANIFEST
    return validate_manifest(_read_json(file), file)


def check_files(directory: str | Path, manifest: dict) -> list[str]:
    """Raise ArtifactError naming the first unexpected, missing, resized or modified file; returns the
    files checked. Sizes are compared before any file is hashed."""
    directory = Path(directory)
    present = set(_walk(directory))
    listed = manifest["files"]
    extra = sorted(present - set(listed) - {MANIFEST})
    if extra:
        raise ArtifactError(f"{directory / extra[0]}: not listed in the manifest (unexpected file)")
    for rel, entry in sorted(listed.items()):
        path = directory / rel
        if rel not in present:
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = os.lstat(path).st_size
        if size != entry["size"]:
            raise ArtifactError(f"{path}: size {size} != {entry['size']} in the manifest (modified)")
    for rel, entry in sorted(listed.items()):
        if sha256_file(directory / rel) != entry["sha256"]:
            raise ArtifactError(f"{directory / rel}: sha256 differs from the manifest (modified or corrupt)")
    return sorted(listed)


def open_artifact(directory: str | Path, check: bool = True) -> dict:
    manifest = read_manifest(directory)
    if check:
        check_files(directory, manifest)
    return manifest


def artifact_file(directory: Path, manifest: dict, rel: str) -> Path:
    """The path of a file the runtime may open: it must be listed (and so was hash-checked)."""
    if not safe_relpath(rel) or rel not in manifest["files"]:
        raise ArtifactError(f"{Path(directory) / MANIFEST}: '{rel}' is not a listed artifact file")
    return Path(directory) / rel


def write_manifest(directory: Path, manifest: dict) -> None:
    """Fills manifest["files"] from the directory (in place) and writes manifest.json."""
    manifest["files"] = file_table(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")


def is_artifact(directory: Path) -> bool:
    """True for a directory holding exactly a valid manifest and the files it lists (not hashed)."""
    try:
        manifest = read_manifest(directory)
        return set(_walk(directory)) == set(manifest["files"]) | {MANIFEST}
    except (QwenError, OSError):
        return False


# ---- safe outputs --------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False when this kernel, libc or filesystem lacks it (the caller falls back)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM are delivered after the block, never between two renames."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def protected_paths(*extra: Path) -> list[Path]:
    """Directories an output may never replace: these, the current directory, the home directory."""
    return [Path(p).resolve() for p in (*extra, Path.cwd(), Path.home())]


def _refuse_unsafe_target(out: Path, protected: list[Path]) -> None:
    real = out.resolve()
    for p in protected:
        if real == p or real in p.parents:
            raise QwenError(f"{out}: refusing to replace {'it' if real == p else 'a parent of ' + str(p)} "
                            f"(the model directory, the current directory and their parents are never replaced)")


# What `force` may replace besides an empty directory: (predicate, what it is). Exports have their own.
ARTIFACT_OUTPUT = (is_artifact, "a qwen35c artifact (a valid manifest.json and only the files it lists)")


def _replaceable(out: Path, ours=ARTIFACT_OUTPUT) -> str | None:
    """Why `out` may not be replaced by --force, or None."""
    mode = os.lstat(out).st_mode
    if stat.S_ISLNK(mode):
        return "it is a symlink"
    if not stat.S_ISDIR(mode):
        return "it is not a directory"
    if not any(out.iterdir()) or ours[0](out):
        return None
    return f"it is neither empty nor {ours[1]}"


@contextlib.contextmanager
def _name_lock(parent: Path, name: str) -> Iterator[None]:
    """An exclusive flock on `.NAME.lock` beside the output; a second build to the same path fails."""
    path = parent / f".{name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QwenError(f"{parent / name}: another build (pid {holder}) is writing it; "
                            f"wait for it or choose another output") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it after we opened it: lock the new file
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _remove_stale(parent: Path, name: str, ours=ARTIFACT_OUTPUT) -> None:
    """Remove temporary siblings left by killed builds of the same output (we hold its lock, so no
    live build owns them): ours carry the partial marker, or are an old artifact being deleted."""
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    for entry in parent.iterdir():
        if not entry.name.startswith(prefixes) or entry.is_symlink() or not entry.is_dir():
            continue
        if (entry / PARTIAL_MARKER).is_file() or not any(entry.iterdir()) or ours[0](entry):
            shutil.rmtree(entry, ignore_errors=True)


def check_output(out: Path, force: bool, protected: list[Path] | None = None, ours=ARTIFACT_OUTPUT) -> Path:
    """The absolute output path, after refusing what a build may not write to: an existing path
    without `force`; with it, anything but an empty directory or one of `ours` (a qwen35c artifact
    unless told otherwise); always a protected directory or one of its parents (`protected_paths`)."""
    out = Path(os.path.abspath(out))
    if out.parent == out:
        raise QwenError(f"{out}: not a valid output directory")
    _refuse_unsafe_target(out, protected if protected is not None else protected_paths())
    if os.path.lexists(out):
        if not force:
            raise QwenError(f"{out}: already exists (use --force to replace it)")
        why = _replaceable(out, ours)
        if why:
            raise QwenError(f"{out}: --force refuses to replace it: {why}")
    return out


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool, protected: list[Path] | None = None,
                     ours=ARTIFACT_OUTPUT) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it becomes `out` atomically, on any failure
    or signal it is removed and an existing `out` is left as it was."""
    from qwen35c.signals import interrupts_raise

    out = check_output(out, force, protected, ours)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QwenError(f"{out.parent}: cannot create ({err.strerror})") from None
    with interrupts_raise(), _name_lock(out.parent, out.name):
        _remove_stale(out.parent, out.name, ours)
        check_output(out, force, protected, ours)       # again, under the lock
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).touch()
        committed = False
        try:
            yield tmp
            (tmp / PARTIAL_MARKER).unlink()
            committed = _commit(tmp, out, force, ours)
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, out: Path, force: bool, ours=ARTIFACT_OUTPUT) -> bool:
    """Put `tmp` at `out`. With an existing `out` (allowed by `force`, checked again now) the two
    are exchanged atomically and the old one deleted; otherwise a no-replace rename."""
    with _signals_held():
        if not os.path.lexists(out):
            if not _renameat2(tmp, out, _RENAME_NOREPLACE):
                if os.path.lexists(out):
                    raise QwenError(f"{out}: appeared during the build; nothing replaced")
                os.rename(tmp, out)
            return True
        why = _replaceable(out, ours) if force else "it exists"
        if why:
            raise QwenError(f"{out}: changed during the build and {why}; nothing replaced")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if _renameat2(tmp, out, _RENAME_EXCHANGE):
            os.rename(tmp, old)
        else:
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)   # restore the old artifact
                raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def settle(directory: Path) -> None:
    """Make the files just written to `directory` durable (fsync) and drop them from the page cache.

    The pages a write leaves cached can be large folios (ext4 caches up to 2 MiB per folio), and a
    memory-mapped read maps the whole folio it faults on: a check that gathers a few hundred random
    rows of a just-written 1 GB embedding table counted all of it in its RSS (0.8B cpu-int4 build:
    1.4 GiB of mapped file pages). Read back from disk, a random row costs a page or so."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, what: str = "output") -> Iterator[Any]:
    """A binary file object whose content appears at `path` only when the block succeeds (written
    to a temporary sibling, fsynced, renamed). The parent directory must exist; an OSError names
    the path."""
    from qwen35c.signals import interrupts_raise

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QwenError(f"{path}: {what} directory {parent} does not exist")
    if path.is_dir():
        raise QwenError(f"{path}: {what} is a directory")
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with interrupts_raise():
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    except OSError as err:
        raise QwenError(f"{err.filename or path}: cannot write {what} ({err.strerror})") from None


__all__ = ["ArtifactError", "COPIED_MODEL_FILES", "MANIFEST", "ManifestChecker", "SCHEMA_VERSION", "artifact_file", "atomic_directory",
           "atomic_file", "check_files", "file_table", "is_artifact", "open_artifact", "protected_paths",
           "read_manifest", "safe_relpath", "settle", "sha256_file", "source_hashes", "tool_versions", "validate_manifest",
           "write_manifest"]
