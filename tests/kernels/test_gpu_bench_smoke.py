"""bench/gpu_kernels.py --cpu-smoke: the prepared H200 script's code path, run here under the interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"
FAMILIES = ("gated_delta_rule", "causal_conv1d", "rmsnorm", "rope", "attention", "moe", "gemm")


def test_gpu_bench_cpu_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| shape | case | status |" in proc.stdout
    report = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["skipped"] == []
    for family in FAMILIES:
        fam = report["families"][family]
        assert fam["status"] == "checked" and fam["checked"] >= 1 and fam["passed"] == fam["checked"], (family, fam)
    for case in report["cases"]:
        assert case["status"] == "pass", case
        assert case["check"]["rel_rmse"] and case["timing"]["median_ms"] > 0
        # nothing claims an FLA comparison that did not run
        if case["fla"]:
            assert case["fla"]["status"].startswith("not run"), case["fla"]
