"""bench/gpu_runtime.py --cpu-smoke: the prepared GPU runtime script's code path (build with the triton
emitter, parity, prefill / decode timing), run here under the Triton interpreter on tiny-moe."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_runtime.py"


def test_gpu_runtime_cpu_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", TRITON_INTERPRET="1",
               PYTHONPATH=str(SCRIPT.parents[1]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_runtime.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["gdn_vs_fla"]["status"].startswith("not run")
    (row,) = report["rows"]
    assert row["status"] == "ran" and row["mode"] == "triton-interpreter, fp32 activations"
    assert row["parity"]["max_abs_logit"] <= 2e-6 and row["parity"]["top1"] == 1.0
    assert all(e["status"] == "ran" and e["tok_per_s"] > 0 for e in row["prefill"] + row["decode"])
