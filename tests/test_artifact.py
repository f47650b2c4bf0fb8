"""Artifacts: byte-identical rebuilds, atomic writes (nothing left after a failure or a kill),
--force, and tamper detection by `verify` and `run` (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen35c.build import build_artifact
from qwen35c.cli import main
from qwen35c.errors import QwenError


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory("tiny")


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "art"
    build_artifact(ckpt, "cpu", out)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_manifest_contents(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["target"]["name"] == "cpu"
    assert {"qwen35c", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert "insert-state" in m["pipeline"] and "model.safetensors" in m["source"]["files"]
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "config.json", "mtp.onnx", "mtp.onnx.data"}
    assert m["backend"]["mtp"]["model"] == "mtp.onnx" and "hidden f32[B,T,64]" in m["backend"]["interface"]["outputs"]
    assert m["engine"]["status"] == "ready" and m["parity"]["status"] == "pass"


def test_two_builds_are_byte_identical(ckpt, artifact, tmp_path):
    again = tmp_path / "again"
    build_artifact(ckpt, "cpu", again)
    assert _files(again) == _files(artifact)


def test_existing_output_needs_force(ckpt, artifact, tmp_path):
    with pytest.raises(QwenError, match="already exists"):
        build_artifact(ckpt, "cpu", artifact)
    out = tmp_path / "forced"
    out.mkdir()
    build_artifact(ckpt, "cpu", out, force=True)              # an empty directory may be replaced
    (out / "config.json").write_text("{}")                     # so may an artifact (even a corrupt one)
    build_artifact(ckpt, "cpu", out, force=True)
    assert _files(out) == _files(artifact)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_nothing(ckpt, tmp_path):
    out = tmp_path / "broken"

    def explode(graph):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_artifact(ckpt, "cpu", out, extra_pipeline_hook=explode)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_killed_build_leaves_nothing(ckpt, tmp_path, sig):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "from qwen35c.cli import main; main()", "build", "--model",
                             str(ckpt), "--target", "cpu", "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".killed.tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert any(p.name.startswith(".killed.tmp") for p in tmp_path.iterdir()), "build never started writing"
    proc.send_signal(sig)
    proc.wait(60)
    assert proc.returncode == 128 + sig           # 130 for SIGINT, 143 for SIGTERM, after the cleanup
    assert list(tmp_path.iterdir()) == []


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name, data in _files(src).items():
        (dst / name).write_bytes(data)
    return dst


@pytest.mark.parametrize("damage", ["flip", "flip-mtp", "delete", "schema", "mtp-escape", "extra"])
def test_tampering_is_refused(artifact, tmp_path, damage):
    art = _copy(artifact, tmp_path / "t")
    if damage.startswith("flip"):
        name = "mtp.onnx.data" if damage == "flip-mtp" else "model.onnx.data"
        data = bytearray((art / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (art / name).write_bytes(bytes(data))
    elif damage == "mtp-escape":    # the draft head's graph redirected outside the artifact
        m = json.loads((art / "manifest.json").read_text())
        m["backend"]["mtp"]["model"] = "../mtp.onnx"
        (art / "manifest.json").write_text(json.dumps(m))
        name = "backend.mtp.model"
    elif damage == "delete":
        (art / "config.json").unlink()
        name = "config.json"
    elif damage == "schema":
        m = json.loads((art / "manifest.json").read_text())
        m["schema_version"] = 99
        (art / "manifest.json").write_text(json.dumps(m))
        name = "manifest.json"
    else:
        (art / "stray.bin").write_bytes(b"x")
        name = "stray.bin"
    runner = CliRunner()
    for args in (["verify", str(art)], ["run", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert name in result.output


def test_unbuildable_targets_fail_clearly(ckpt, tmp_path):
    runner = CliRunner()
    for target, backend in (("cpu-int4", "tensorrt"), ("a100-bf16", "onnx"), ("cpu", "triton")):
        result = runner.invoke(main, ["build", "--model", str(ckpt), "--target", target, "--backend", backend,
                                      "-o", str(tmp_path / target)])
        assert result.exit_code == 2 and ("not" in result.output or "only" in result.output), result.output
    assert list(tmp_path.iterdir()) == []
    result = runner.invoke(main, ["build", "--model", str(ckpt), "--target", "nope", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown target" in result.output


def test_run_on_artifact_matches_checkpoint(artifact, ckpt, tmp_path):
    import numpy as np

    runner = CliRunner()
    outs = []
    for model in (artifact, ckpt):
        path = tmp_path / f"{model.name}.npy"
        result = runner.invoke(main, ["run", str(model), "--prompt-ids", "3,1,4,1,5,9,2,6", "--max-new-tokens", "4",
                                      "--save-logits", str(path), "--json"])
        assert result.exit_code == 0, result.output
        outs.append((json.loads(result.stdout)["generated_ids"], np.load(path)))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1].shape == outs[1][1].shape and np.abs(outs[0][1] - outs[1][1]).max() <= 1e-4
