"""`qwen35c build --target <gpu target>` then `verify`, `run` and `plan`, through the command line:
the triton backend behind the same seam as onnx, checked under the Triton interpreter (no GPU here).

The test grid is bounded for the suite (the interpreter is slow): one target of each weight format
on a random tiny preset, the short prompt set; the `slow` cases build and verify every GPU target on
every tiny preset and on both bundled models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen35c.cli import main
from qwen35c.targets import TARGETS

GPU_TARGETS = sorted(name for name, t in TARGETS.items() if t.sm is not None)


def _cli(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _build_and_verify(model, target: str, out: Path, quantized: bool) -> dict:
    _cli("build", "--model", model, "--target", target, "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "triton" and manifest["parity"]["passed"]
    skip = ["--skip", "quantization"] if quantized else []
    report = json.loads(_cli("verify", out, "--prompts", "short", "--json", *skip).stdout)
    assert report["status"] == "pass" and report["mode"] == "triton-interpreter, fp32 activations"
    assert report["parity"]["gate"] in ("fp32", "quantized-activations")
    return manifest


@pytest.mark.parametrize("target,preset", [("h100-bf16", "tiny"), ("a100-int4", "tiny-next"),
                                           ("h100-fp8", "tiny-moe")])
def test_gpu_target_builds_verifies_and_runs(checkpoint_factory, tmp_path, target, preset):
    ckpt = checkpoint_factory(preset)
    quantized = TARGETS[target].quantize is not None
    manifest = _build_and_verify(ckpt, target, tmp_path / "art", quantized)
    if quantized:
        q = manifest["quantization"]
        assert q["quantized"] and q["precision"] == TARGETS[target].precision
    kernels = manifest["backend"]["kernels"]
    assert kernels["sm"] == TARGETS[target].sm and kernels["specialisations"]
    out = _cli("run", tmp_path / "art", "--prompt-ids", "1,2,3", "--max-new-tokens", 3, "--json")
    assert len(json.loads(out.stdout)["generated_ids"]) == 3
    plan = _cli("plan", tmp_path / "art").stdout
    assert plan.startswith("plan qwen35c-triton-plan/")


def test_tampered_kernel_and_plan_are_refused(checkpoint_factory, tmp_path):
    art = tmp_path / "art"
    _cli("build", "--model", checkpoint_factory("tiny"), "--target", "h100-bf16", "-o", art, "--no-check")
    manifest = json.loads((art / "manifest.json").read_text())
    cubin = art / manifest["backend"]["kernels"]["files"][0]["file"]
    for victim in (cubin, art / manifest["backend"]["plan"]):
        copy = Path(shutil.copytree(art, tmp_path / f"t-{victim.name}"))
        target = copy / victim.relative_to(art)
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
        for args in (["verify", copy], ["run", copy, "--prompt-ids", "1", "--max-new-tokens", "1"]):
            result = _cli(*args, code=2)
            assert victim.name in result.output and "sha256" in result.output


def test_a_fresh_process_picks_the_interpreter_itself(checkpoint_factory, tmp_path):
    """Without TRITON_INTERPRET in the environment the CLI sets it before Triton is imported."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "from qwen35c.cli import main; main()", "build", "--model",
                           str(checkpoint_factory("tiny")), "--target", "a100-bf16", "-o", str(tmp_path / "a")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "parity: pass" in proc.stderr


def test_plan_of_an_onnx_artifact_says_there_is_none(checkpoint_factory, tmp_path):
    _cli("build", "--model", checkpoint_factory("tiny"), "-o", tmp_path / "cpu", "--no-check")
    assert "no kernel plan" in _cli("plan", tmp_path / "cpu", code=2).output


@pytest.mark.slow
@pytest.mark.parametrize("target", GPU_TARGETS)
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-next"])
def test_every_gpu_target_on_every_tiny_preset(checkpoint_factory, tmp_path, target, preset):
    _build_and_verify(checkpoint_factory(preset), target, tmp_path / "art", TARGETS[target].quantize is not None)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["h100-bf16", "a100-int4", "h100-fp8"])
@pytest.mark.parametrize("model", ["qwen35-tiny", "qwen35-tiny-moe"])
def test_bundled_models_on_gpu_targets(tmp_path, target, model):
    """The trained models, the quantization-loss check included (they have held-out text)."""
    out = tmp_path / "art"
    _cli("build", "--model", model, "--target", target, "-o", out)
    report = json.loads(_cli("verify", out, "--prompts", "short", "--json").stdout)
    assert report["status"] == "pass"
