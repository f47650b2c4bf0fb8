"""Memory as a tested property (issue 19): a build's peak RSS is bounded by its largest layer, not the
model. The checkpoint has many narrow layers, so "one layer resident" and "the whole model
resident" are far apart; each build runs in a subprocess that reports its own VmHWM and its RSS
once everything is imported, and the growth must stay under a bound computed from the largest layer
(and, for the check, the artifact's own size) — far below the whole model in fp32."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 64
WIDE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=LAYERS, vocab_size=512,
            mtp_num_hidden_layers=0)

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    from qwen35c.artifact import build_artifact
    from qwen35c.backends.onnx.session import OnnxSession  # noqa: F401  (imported before the baseline)
    from qwen35c.quant import calibrate, build as qbuild
    import onnxruntime  # noqa: F401

    real = calibrate.builtin_calibration
    # fewer calibration tokens keep the test fast; memory per layer is what is measured
    calibrate.builtin_calibration = lambda d, v, **k: real(d, v, max_tokens=1024, seq_len=128)

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    base = status("VmRSS")
    ckpt, target, out = sys.argv[1:4]
    build_artifact(ckpt, target, out)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


def _peak(ckpt: Path, target: str, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), target, str(out)], capture_output=True,
                            text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                      "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def narrow_deep(checkpoint_factory):
    return checkpoint_factory("tiny", **WIDE)


@pytest.mark.parametrize("target", ["cpu-int4", "cpu"])
def test_build_peak_is_bounded_by_the_largest_layer(narrow_deep, target, tmp_path):
    from reference.config import load_config
    from reference.stream import layer_bytes

    config = load_config(narrow_deep)
    layers = layer_bytes(config, torch.float32)
    whole = sum(layers)                                            # the decoder layers alone, fp32
    assert whole >= 30 * max(layers)
    out = tmp_path / target
    measured = _peak(narrow_deep, target, out)
    artifact = sum(f.stat().st_size for f in out.iterdir())        # the ORT session holds this (check)
    growth = measured["peak"] - measured["base"]
    bound = 8 * max(layers) + 1.5 * artifact + (64 << 20)          # a few layers + the artifact + slack
    print(f"{target}: growth {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, "
          f"whole model fp32 {whole / 2**20:.0f} MiB, artifact {artifact / 2**20:.0f} MiB")
    assert growth <= bound, f"{target}: peak grew {growth / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    assert bound < (1.5 * artifact if target == "cpu" else 0) + 0.75 * whole   # the bound can tell them apart


def test_build_records_the_check_as_not_run_when_memory_is_short(checkpoint_factory, tmp_path, monkeypatch):
    import qwen35c.memory
    from qwen35c.artifact import build_artifact

    monkeypatch.setattr(qwen35c.memory, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr(qwen35c.memory, "current_rss", lambda: 0)
    report = build_artifact(checkpoint_factory("tiny"), "cpu", tmp_path / "a")
    parity = report.manifest["parity"]
    assert parity["status"] == "not run" and "not enough memory for the check" in parity["summary"]


def test_build_estimate_does_not_grow_with_the_layer_count():
    from qwen35c.memory import artifact_peak, build_peak
    from reference.checkpoint import preset_config

    short, long = preset_config("35b-a3b", num_hidden_layers=4), preset_config("35b-a3b", num_hidden_layers=8)
    assert artifact_peak(long).total > artifact_peak(short).total          # the artifact holds every layer
    assert build_peak(long, "int4", check=False).total == build_peak(short, "int4", check=False).total
    fp32, int4 = artifact_peak(preset_config("0.8b"), "fp32"), artifact_peak(preset_config("0.8b"), "int4")
    assert int4.parts["weights"] < fp32.parts["weights"] and fp32.parts["prepacked"] > 0   # tied head copy


def test_inspect_reports_both_estimates(checkpoint_factory):
    from qwen35c.commands.inspect import summarize

    info = summarize(checkpoint_factory("tiny"))["memory_estimates"]
    for target in ("cpu", "cpu-int4"):
        assert info["targets"][target]["artifact_runtime_peak"]["total_bytes"] > 0
        assert info["targets"][target]["build_peak"]["total_bytes"] > 0
