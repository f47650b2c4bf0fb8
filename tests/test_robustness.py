"""Hostile and broken inputs, as an attacker or an unlucky user would give them (issue 13).

Every case asserts the exit code (0 ok, 1 parity failure, 2 bad input, 130/143 signals), a one-line
message naming the file, key, tensor or option at fault, no traceback, and that nothing outside the
output was changed or lost. Artifacts and checkpoints are tampered copies of one tiny build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qwen35c.artifact import MANIFEST, PARTIAL_MARKER, write_manifest
from qwen35c.build import build_artifact
from qwen35c.cli import main
from reference.checkpoint import make_random_checkpoint
from reference.safetensors_io import write_safetensors

RUN = ["--prompt-ids", "1,2,3", "--max-new-tokens", "1"]


def cli(*args, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def expect(result, code: int, *needles: str) -> str:
    """The exit code, no traceback, and one error line that names every needle."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    if code == 0:
        return ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("qwen35c: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    return errors[0]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below root with its content hash (symlinks as their target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "art"
    build_artifact(ckpt, "cpu", out)
    return out


@pytest.fixture
def art(artifact, tmp_path):
    """A fresh copy of the artifact to damage."""
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def _edit(art: Path, change, rehash: bool = False) -> None:
    manifest = json.loads((art / MANIFEST).read_text())
    change(manifest)
    if rehash:
        write_manifest(art, manifest)
    else:
        (art / MANIFEST).write_text(json.dumps(manifest))


def _set(path: str, value):
    """A manifest edit: set the value at a path (`backend/states/0/shape`)."""
    def change(m):
        *head, last = path.split("/")
        for key in head:
            m = m[int(key)] if isinstance(m, list) else m[key]
        if isinstance(m, list):
            m[int(last)] = value
        else:
            m[last] = value
    return change


def _del(path: str):
    def change(m):
        *head, last = path.split("/")
        for key in head:
            m = m[key]
        del m[last]
    return change


def _add_file(rel: str):
    return lambda m: m["files"].__setitem__(rel, {"sha256": "0" * 64, "size": 1})


# ---- manifest tampering: verify and run both refuse, naming the key ------------------------------------

MANIFEST_CASES = {
    "model-absolute": (_set("backend/model", "/etc/hostname"), "backend.model"),
    "model-traversal": (_set("backend/model", "../other/model.onnx"), "backend.model"),
    "model-unlisted": (_set("backend/model", "other.onnx"), "not listed in 'files'"),
    "data-traversal": (_set("backend/data", "../../x.data"), "backend.data"),
    "files-traversal": (_add_file("../outside.txt"), 'files["../outside.txt"]'),
    "files-absolute": (_add_file("/etc/hostname"), 'files["/etc/hostname"]'),
    "files-dot": (_add_file("./config.json"), 'files["./config.json"]'),
    "files-manifest": (_add_file("manifest.json"), "reserved"),
    "files-list": (_set("files", ["config.json"]), "key 'files' must be an object"),
    "files-no-size": (_del("files/config.json/size"), "config.json\"].size"),
    "files-size-string": (_set("files/config.json/size", "12"), "config.json\"].size"),
    "files-bad-sha": (_set("files/config.json/sha256", "xyz"), "config.json\"].sha256"),
    "target-string": (_set("target", "cpu"), "key 'target' must be an object"),
    "target-unknown": (_set("target/name", "h100-fp9"), "target.name"),
    "schema-negative": (_set("schema_version", -7), "schema_version"),
    "schema-bool": (_set("schema_version", True), "schema_version"),
    "schema-string": (_set("schema_version", "1"), "schema_version"),
    "schema-newer": (_set("schema_version", 99), "newer"),
    "backend-unknown": (_set("backend/name", "evil"), "backend.name"),
    "backend-not-object": (_set("backend", "onnx"), "key 'backend' must be an object"),
    "state-huge": (_set("backend/states/0/shape", ["B", 10**12, 3]), "backend.states[0].shape[1]"),
    "state-negative": (_set("backend/states/0/shape", ["B", -3, 3]), "backend.states[0].shape[1]"),
    "state-dtype": (_set("backend/states/0/dtype", "f64"), "backend.states[0].dtype"),
    "state-renamed": (_set("backend/states/0/name", "evil_state"), "evil_state"),
    "state-shape-wrong": (_set("backend/states/0/shape", ["B", 7, 3]), "disagrees"),
    "state-dropped": (lambda m: m["backend"]["states"].pop(0), "not in the manifest's interface"),
    "states-not-list": (_set("backend/states", {}), "backend.states"),
    "unknown-key": (_set("evil", 1), "evil"),
    "missing-engine": (_del("engine"), "'engine'"),
    "passes-not-list": (_set("passes", "cleanup"), "key 'passes'"),
    "parity-not-object": (_set("parity", "pass"), "key 'parity'"),
    "versions-not-str": (_set("versions/torch", 2), "versions.torch"),
    "source-files-traversal": (_set("source/files", {"../model.safetensors": "0" * 64}), "source.files"),
    "quantization-added": (_set("quantization", {"precision": "int4", "label": "int4-gptq-g128", "recipe": {},
                                                 "packed_sha256": "0", "quantized": [], "kept": [],
                                                 "not_lowered": []}), "quantization"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_tampered_manifest(art, case):
    change, needle = MANIFEST_CASES[case]
    _edit(art, change)
    before = tree_digest(art)
    for args in (["verify", art], ["run", art, *RUN]):
        expect(cli(*args), 2, needle)
    assert tree_digest(art) == before


@pytest.mark.parametrize("case", ["model-traversal", "state-renamed", "quantization-added"])
def test_tampered_manifest_with_consistent_hashes(art, case, tmp_path):
    """An attacker who also rewrites the file table gets no further."""
    change, needle = MANIFEST_CASES[case]
    _edit(art, change, rehash=True)
    expect(cli("verify", art), 2, needle)


def test_gpu_label_on_a_cpu_artifact_is_not_a_pass(art):
    _edit(art, _set("target/name", "h100-fp8"))
    expect(cli("verify", art), 2, "not verified", "target not run")


# ---- the file system under the manifest ----------------------------------------------------------------

def _symlink_file(art: Path):
    data = (art / "config.json").read_bytes()
    (art / "real.json").write_bytes(data)
    (art / "config.json").unlink()
    (art / "config.json").symlink_to(art / "real.json")
    _edit(art, _set("files/real.json", {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))


def _symlink_dir(art: Path):
    (art / "sub").symlink_to("/etc")


def _fifo(art: Path):
    os.mkfifo(art / "pipe")


def _flip(art: Path):
    data = bytearray((art / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (art / "model.onnx.data").write_bytes(bytes(data))


def _truncate(art: Path):
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[:100])


def _external_data_outside(art: Path):
    import onnx

    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../evil.data"
    (art / "model.onnx").write_bytes(proto.SerializeToString())
    _edit(art, lambda m: None, rehash=True)


def _bad_config(key: str, value):
    def damage(art: Path):
        config = json.loads((art / "config.json").read_text())
        (config.get("text_config") or config)[key] = value
        (art / "config.json").write_text(json.dumps(config))
        _edit(art, lambda m: None, rehash=True)
    return damage


def _manifest_dir(art: Path):
    (art / MANIFEST).unlink()
    (art / MANIFEST).mkdir()


def _manifest_symlink(art: Path):
    (art / "m.json").write_text((art / MANIFEST).read_text())
    (art / MANIFEST).unlink()
    (art / MANIFEST).symlink_to("m.json")


def _manifest_fifo(art: Path):
    (art / MANIFEST).unlink()
    os.mkfifo(art / MANIFEST)


TREE_CASES = {
    "symlinked-file": (_symlink_file, "symlink"),
    "symlinked-dir": (_symlink_dir, "symlink"),
    "fifo": (_fifo, "not a regular file"),
    "flipped-byte": (_flip, "sha256 differs"),
    "truncated": (_truncate, "size"),
    "deleted": (lambda a: (a / "config.json").unlink(), "missing"),
    "extra-file": (lambda a: (a / "stray.bin").write_bytes(b"x"), "unexpected file"),
    "external-data-outside": (_external_data_outside, "external data"),
    "config-rope-theta-string": (_bad_config("rope_parameters", {"rope_theta": "big"}), "rope_theta"),
    "config-intermediate-string": (_bad_config("intermediate_size", "128"), "intermediate_size"),
    "manifest-directory": (_manifest_dir, "directory"),
    "manifest-symlink": (_manifest_symlink, "symlink"),
    "manifest-fifo": (_manifest_fifo, "not a regular file"),
    "manifest-not-json": (lambda a: (a / MANIFEST).write_text("{nope"), "malformed JSON"),
    "manifest-nan": (lambda a: (a / MANIFEST).write_text('{"schema_version": NaN}'), "NaN"),
    "manifest-list": (lambda a: (a / MANIFEST).write_text("[1, 2]"), "must be an object"),
}


@pytest.mark.parametrize("case", sorted(TREE_CASES))
def test_tampered_tree(art, case):
    damage, needle = TREE_CASES[case]
    damage(art)
    for args in (["verify", art], ["run", art, *RUN]):
        expect(cli(*args), 2, needle)


def test_perplexity_of_an_artifact_without_tokenizer(art, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    expect(cli("perplexity", art, "--text", text), 2, "tokenizer.json")


# ---- checkpoint faults: build refuses, naming the file and key or tensor ----------------------------

def _copy_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "ckpt"))


def _config_edit(key: str, value):
    def damage(c: Path):
        config = json.loads((c / "config.json").read_text())
        text = config.get("text_config", config)
        if key == "rope_theta":
            text["rope_parameters"]["rope_theta"] = value
        else:
            text[key] = value
        (c / "config.json").write_text(json.dumps(config))
    return damage


def _sharded(weight_map_value):
    def damage(c: Path):
        names = list(json.loads((c / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
            (c / "model.safetensors").read_bytes()[:8], "little")]))
        names = [n for n in names if n != "__metadata__"]
        index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
        index["weight_map"][names[0]] = weight_map_value
        (c / "model.safetensors.index.json").write_text(json.dumps(index))
    return damage


def _header(header: object):
    def damage(c: Path):
        raw = json.dumps(header).encode()
        (c / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    return damage


def _nan_weight(c: Path):
    from reference.safetensors_io import SafetensorsFile

    src = SafetensorsFile(c / "model.safetensors")
    names = src.keys()
    tensors = {n: src.view(n).clone() for n in names}
    src.close()
    victim = next(n for n in names if n.endswith("mlp.down_proj.weight"))
    tensors[victim][0, 0] = float("nan")
    write_safetensors(c / "model.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                      tensors.__getitem__)


CHECKPOINT_CASES = {
    "index-traversal": (_sharded("../outside.safetensors"), "plain .safetensors file name"),
    "index-absolute": (_sharded("/tmp/x.safetensors"), "plain .safetensors file name"),
    "index-integer": (_sharded(7), "plain .safetensors file name"),
    "index-list": (lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": []}'), "weight_map"),
    "header-list": (_header([1, 2]), "model.safetensors"),
    "header-negative-dim": (_header({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}), "'w'"),
    "nan-weight": (_nan_weight, "NaN"),
    "rope-theta-string": (_config_edit("rope_theta", "big"), "rope_theta"),
    "mtp-string": (_config_edit("mtp_num_hidden_layers", "one"), "mtp_num_hidden_layers"),
    "eps-negative": (_config_edit("rms_norm_eps", -1), "rms_norm_eps"),
    "context-zero": (_config_edit("max_position_embeddings", 0), "max_position_embeddings"),
    "intermediate-string": (_config_edit("intermediate_size", "128"), "intermediate_size"),
    "layers-string": (_config_edit("num_hidden_layers", "8"), "num_hidden_layers"),
    "tie-string": (_config_edit("tie_word_embeddings", "yes"), "tie_word_embeddings"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(ckpt, tmp_path, case):
    damage, needle = CHECKPOINT_CASES[case]
    bad = _copy_ckpt(ckpt, tmp_path)
    damage(bad)
    expect(cli("build", "--model", bad, "--target", "cpu", "-o", tmp_path / "out"), 2, needle)
    assert not (tmp_path / "out").exists()
    if case == "nan-weight":
        expect(cli("inspect", bad), 2, "NaN", "down_proj")
        expect(cli("run", bad, *RUN), 2, "NaN")


def test_unknown_tensors_are_named(ckpt, tmp_path):
    bad = _copy_ckpt(ckpt, tmp_path)
    extra = {"model.language_model.layers.0.mystery.weight": torch.zeros(2)}
    write_safetensors(bad / "extra.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in extra.items()],
                      extra.__getitem__)
    result = cli("build", "--model", bad, "--target", "cpu", "-o", tmp_path / "out")
    expect(result, 0)
    assert "layers.0.mystery.weight" in result.stderr and "warning" in result.stderr


# ---- command-line values -----------------------------------------------------------------------------

CLI_CASES = {
    "max-new-tokens-huge": (["--max-new-tokens", 10**12], "--max-new-tokens"),
    "temperature-nan": (["--temperature", "nan"], "--temperature"),
    "temperature-inf": (["--temperature", "inf"], "--temperature"),
    "top-p-nan": (["--top-p", "nan"], "--top-p"),
    "seed-huge": (["--seed", 2**70], "--seed"),
    "seed-negative": (["--seed", -1], "--seed"),
    "prompt-ids-out-of-vocab": (["--prompt-ids", "99999"], "--prompt-ids"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_run_values(ckpt, case):
    options, needle = CLI_CASES[case]
    args = ["run", ckpt, *options]
    if "--prompt-ids" not in options:
        args += ["--prompt-ids", "1,2"]
    expect(cli(*args), 2, needle)


def test_bad_thread_counts(artifact):
    expect(cli("verify", artifact, "--threads", -3), 2, "--threads")
    expect(cli("run", artifact, *RUN, env={"QWEN35C_THREADS": "100000"}), 2, "QWEN35C_THREADS")


def test_prompt_longer_than_the_context(tmp_path):
    short = make_random_checkpoint("tiny", 0, tmp_path / "short", max_position_embeddings=8)
    expect(cli("run", short, "--prompt-ids", ",".join(["1"] * 9)), 2, "max_position_embeddings")
    expect(cli("run", short, "--prompt-ids", "1,2,3", "--max-new-tokens", 6), 2, "--max-new-tokens")


def test_tokenizer_larger_than_the_model(tmp_path):
    from qwen35c.models import bundled

    small = make_random_checkpoint("tiny", 0, tmp_path / "small", vocab_size=64)
    shutil.copy(bundled("qwen35-tiny") / "tokenizer.json", small / "tokenizer.json")
    expect(cli("run", small, "--prompt", "def fibonacci(n): return n"), 2, "tokenizer.json", "vocab_size")


def test_bogus_quantize_names_the_option(ckpt, tmp_path):
    expect(cli("build", "--model", ckpt, "--quantize", "bogus", "-o", tmp_path / "o"), 2, "--quantize 'bogus'")


def test_run_json_without_tokens_is_valid_json(ckpt):
    result = cli("run", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", 0, "--json")
    expect(result, 0)
    payload = json.loads(result.stdout)          # no NaN: strict JSON
    assert payload["decode_tokens_per_second"] is None and payload["generated_ids"] == []


def test_model_names_resolve_the_same_everywhere():
    expect(cli("ir"), 0)                         # the bundled default, like every other command
    expect(cli("ir", "qwen35-tiny-moe"), 0)
    expect(cli("inspect", "tiny", "--json"), 0)   # a preset, like `ir`
    expect(cli("inspect", "no-such-model"), 2, "no-such-model")


# ---- labels follow content ----------------------------------------------------------------------------

def test_pipeline_without_quantize_is_refused_for_a_quantized_target(ckpt, tmp_path):
    expect(cli("build", "--model", ckpt, "--target", "cpu-int4", "--pipeline", "standard", "-o", tmp_path / "o"),
           2, "cpu-int4", "no quantize pass")


def test_quantizing_nothing_is_refused(tmp_path):
    odd = make_random_checkpoint("tiny", 0, tmp_path / "odd", hidden_size=96, intermediate_size=96)
    expect(cli("build", "--model", odd, "--target", "cpu-int4", "--quantize", "int4-rtn group-size=128", "-o",
               tmp_path / "o"), 2, "would quantize no linear")
    assert not (tmp_path / "o").exists()


def test_quantized_targets_use_their_own_named_pipeline():
    from qwen35c.passes.manager import parse_pipeline, pipeline_to_text
    from qwen35c.targets import TARGETS

    target = TARGETS["cpu-int4"]
    names = [p.name for p in parse_pipeline(target.full_pipeline())]
    named = [p.name for p in parse_pipeline(target.pipeline)]
    assert names == named[:names.index("quantize")] + ["quantize"] + named[names.index("quantize"):]
    assert names[names.index("quantize") + 1] == target.quantize_before
    assert "group-size=128" in pipeline_to_text(parse_pipeline(target.full_pipeline()))


# ---- outputs: nothing that is not ours is ever replaced --------------------------------------------------

@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory with a source tree and a model inside, to aim --force at."""
    root = tmp_path / "work"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('precious')\n")
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("where", ["cwd", "model", "model-parent", "source-tree", "file", "symlink"])
def test_force_never_replaces_what_is_not_ours(ckpt, sandbox, where):
    model = Path(shutil.copytree(ckpt, sandbox / "models" / "tiny"))
    (sandbox / "notes.txt").write_text("mine")
    (sandbox / "link").symlink_to(sandbox / "src")
    out = {"cwd": ".", "model": model, "model-parent": sandbox / "models", "source-tree": sandbox / "src",
           "file": sandbox / "notes.txt", "symlink": sandbox / "link"}[where]
    before = tree_digest(sandbox)
    expect(cli("build", "--model", model, "--force", "-o", out), 2, "--force" if where in ("source-tree", "file",
                                                                                              "symlink") else "refusing")
    assert tree_digest(sandbox) == before


def test_existing_artifact_needs_force(artifact):
    before = tree_digest(artifact)
    expect(cli("build", "--model", "qwen35-tiny", "-o", artifact), 2, "already exists")
    assert tree_digest(artifact) == before


def test_stale_temporaries_of_killed_builds_are_removed(ckpt, tmp_path):
    stale = tmp_path / ".out.tmp-999999"
    stale.mkdir()
    (stale / PARTIAL_MARKER).touch()
    (stale / "model.onnx.data").write_bytes(b"x" * 1000)
    mine = tmp_path / ".out.tmp-1"           # not ours (no marker): kept
    mine.mkdir()
    (mine / "diary.txt").write_text("mine")
    expect(cli("build", "--model", ckpt, "-o", tmp_path / "out"), 0)
    assert not stale.exists() and (mine / "diary.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]


def test_failed_force_swap_restores_the_old_artifact(ckpt, artifact, tmp_path, monkeypatch):
    import qwen35c.artifact as fmt

    out = Path(shutil.copytree(artifact, tmp_path / "out"))
    before = tree_digest(out)
    real_rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                  # the rename of the new artifact into place
            raise OSError(28, "No space left on device", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(fmt, "_renameat2", lambda src, dst, flags: False)   # the fallback path
    monkeypatch.setattr(fmt.os, "rename", flaky)
    expect(cli("build", "--model", ckpt, "--force", "-o", out), 2, "No space left")
    monkeypatch.undo()
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_logits_never_truncates_the_old_file(ckpt, tmp_path, monkeypatch):
    import numpy as np

    target = tmp_path / "logits.npy"
    target.write_bytes(b"old logits")

    def full_disk(file, array):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    expect(cli("run", ckpt, *RUN, "--save-logits", target), 2, "logits.npy", "No space left")
    assert target.read_bytes() == b"old logits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npy"]


def test_save_logits_needs_an_existing_directory(ckpt, tmp_path):
    expect(cli("run", ckpt, *RUN, "--save-logits", tmp_path / "missing" / "l.npy"), 2, "does not exist")
    assert not (tmp_path / "missing").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs and a read-only tmpfs (real ENOSPC / EROFS), where this machine lets us mount."""
    mounts = {"full": tmp_path / "full", "ro": tmp_path / "ro"}
    options = {"full": "size=64k", "ro": "ro,size=64k"}
    done = []
    try:
        for name, path in mounts.items():
            path.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options[name], "tmpfs", str(path)],
                              capture_output=True).returncode != 0:
                pytest.skip("cannot mount a tmpfs here (the injected-error tests cover these paths)")
            done.append(path)
        yield mounts
    finally:
        for path in done:
            subprocess.run(["umount", str(path)], capture_output=True)


def test_full_and_read_only_filesystems(ckpt, small_fs):
    expect(cli("build", "--model", ckpt, "-o", small_fs["full"] / "out"), 2, "No space left")
    assert list(small_fs["full"].iterdir()) == []
    expect(cli("build", "--model", ckpt, "-o", small_fs["ro"] / "out"), 2, "Read-only")
    expect(cli("run", ckpt, *RUN, "--save-logits", small_fs["ro"] / "l.npy"), 2, "Read-only")


# ---- processes: locks and signals ------------------------------------------------------------------

def _spawn_build(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", "from qwen35c.cli import main; main()", "build", "--model",
                             str(ckpt), "-o", str(out), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.05)
    assert predicate(), "timed out"


def test_a_build_holding_the_lock_turns_a_second_away(ckpt, tmp_path):
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as held:          # what a running build holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        expect(cli("build", "--model", ckpt, "-o", out), 2, "another build (pid 4242)")
    expect(cli("build", "--model", ckpt, "-o", out), 0)      # released: the next one goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_concurrent_builds_never_both_succeed(ckpt, tmp_path):
    out = tmp_path / "out"
    procs = [_spawn_build(ckpt, out) for _ in range(2)]
    results = [(p.wait(300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert ("another build" in loser or "already exists" in loser) and "Traceback" not in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    expect(cli("verify", out, "--structure-only"), 0)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_forced_rebuild_keeps_the_old_artifact(ckpt, artifact, tmp_path, sig, code):
    out = Path(shutil.copytree(artifact, tmp_path / "out"))
    before = tree_digest(out)
    proc = _spawn_build(ckpt, out, "--force")
    _wait_for(lambda: any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir()))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "interrupted" in err
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_inside_native_initialisation_is_held_until_it_ends(sig, code, monkeypatch):
    """`signals.deferred()` (around onnx's nanobind import, which aborts the process when a Python
    exception is raised inside it): the handler runs, but the exception comes when the block ends."""
    from qwen35c import signals

    # a fresh first signal each time (an earlier in-process CLI call installed the handlers for good)
    monkeypatch.setattr(signals, "_state", {"raised": False, "deferring": 0, "held": None})
    steps = []
    with signals.interrupts_raise(), pytest.raises(signals.Interrupted) as err:
        with signals.deferred():
            os.kill(os.getpid(), sig)
            for _ in range(1000):       # the handler runs between bytecodes, here: it must not raise
                time.sleep(0)
            steps.append("block ended")
        steps.append("after the block")
    assert steps == ["block ended"] and err.value.exit_code == code
    signals._state["raised"] = False
    with signals.interrupts_raise(), pytest.raises(signals.Interrupted):   # outside a block: at once
        os.kill(os.getpid(), sig)
        for _ in range(1000):
            time.sleep(0)
        steps.append("not reached")
    assert steps == ["block ended"]


def test_a_checkpoint_of_symlinks_like_an_hf_cache_builds(ckpt, tmp_path):
    """Checkpoints may link into a blob store (the HF cache layout); artifacts may not hold links."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for file in ckpt.iterdir():
        shutil.copy(file, blobs / file.name)
        (snapshot / file.name).symlink_to(blobs / file.name)
    expect(cli("build", "--model", snapshot, "-o", tmp_path / "out"), 0)
    expect(cli("verify", tmp_path / "out", "--structure-only"), 0)
