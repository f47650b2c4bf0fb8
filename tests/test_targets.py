"""The target registry, `qwen35c targets` and `qwen35c matrix`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from qwen35c.cli import main
from qwen35c.targets import TARGETS


def test_registry_lists_every_design_target():
    assert set(TARGETS) == {"cpu", "cpu-int4", "a100-bf16", "a100-int4", "l40s-fp8", "h100-bf16", "h100-fp8",
                            "h200-fp8", "b200-fp8"}
    assert TARGETS["h200-fp8"].sm == 90 and TARGETS["b200-fp8"].sm == 100 and TARGETS["cpu"].sm is None
    assert all(t.build_blocker() is None for t in TARGETS.values())       # every target builds
    assert all(t.backend == "triton" for t in TARGETS.values() if t.sm is not None)
    assert all(t.build_blocker("tensorrt") is None for t in TARGETS.values() if t.sm is not None)   # bundles
    assert "only the onnx backend builds CPU targets" in TARGETS["cpu"].build_blocker("tensorrt")
    assert "not 'fp8-tensor'" in TARGETS["h100-bf16"].build_blocker("tensorrt", quantize="fp8-tensor")


def test_targets_and_matrix_commands():
    runner = CliRunner()
    result = runner.invoke(main, ["targets"])
    assert result.exit_code == 0 and "h200-fp8" in result.output
    result = runner.invoke(main, ["matrix"])
    jobs = json.loads(result.stdout)["include"]
    assert [j["target"] for j in jobs] == list(TARGETS)
    assert jobs[0]["build"].startswith("qwen35c build") and "verify" in jobs[0]["verify"]
    result = runner.invoke(main, ["matrix", "--format", "github"])
    assert result.stdout.startswith("matrix=") and json.loads(result.stdout[7:])["include"]
