"""Prepared GPU run of the tensorrt backend (issue 15): bundle, engine, parity, time. One script, <= 10 min.

    python bench/gpu_tensorrt.py                 # on a machine with TensorRT >= 10.15 and an sm_80+ GPU
    python bench/gpu_tensorrt.py --models qwen35-tiny --targets h100-bf16    # one case

For each (bundled model, target) case, where the target's SM is this GPU's:
  1. `qwen35c build --backend tensorrt` (stage 1: the bundle, its CPU check, the plugins' PTX for the SM);
  2. `qwen35c engine BUNDLE -o ENGINE` (stage 2: plugins registered as AOT plugins, strongly typed
     engine, run on the verify prompt set against the fp32 reference), timed;
  3. the engine's parity summary from engine.json.
A case whose target is another SM is skipped with the reason; a machine without TensorRT reports the
engine command's exit 3 and its one-line reason for every case: nothing is reported unless it ran.
JSON to --json or $OUT/gpu_tensorrt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _qwen35c(*args: str, timeout: float) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from qwen35c.cli import main; main()", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, (done.stdout + done.stderr).strip(), time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen35-tiny,qwen35-tiny-moe")
    p.add_argument("--targets", default="a100-bf16,h100-bf16")
    p.add_argument("--timeout", type=float, default=240, help="seconds per command")
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from qwen35c.targets import TARGETS, machine_sm

    sm = machine_sm()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ns.models.split(","):
            for target in ns.targets.split(","):
                row = {"model": model, "target": target}
                rows.append(row)
                if sm is not None and TARGETS[target].sm != sm:
                    row.update(status="skipped", reason=f"target is sm_{TARGETS[target].sm}; this GPU is sm_{sm}")
                    continue
                bundle, engine = Path(tmp) / f"{model}-{target}", Path(tmp) / f"{model}-{target}-engine"
                code, out, secs = _qwen35c("build", "--model", str(ROOT / "qwen35c" / "models" / model), "--target",
                                           target, "--backend", "tensorrt", "-o", str(bundle), timeout=ns.timeout)
                row["bundle_s"] = round(secs, 1)
                if code:
                    row.update(status="bundle failed", exit=code, output=out[-400:])
                    continue
                code, out, secs = _qwen35c("engine", str(bundle), "-o", str(engine), timeout=ns.timeout)
                row.update(engine_s=round(secs, 1), exit=code)
                if code:
                    row.update(status="engine not built" if code == 3 else "engine failed", output=out[-400:])
                    continue
                record = json.loads((engine / "engine.json").read_text())
                row.update(status="pass" if record["parity"]["passed"] else "fail", tensorrt=record["tensorrt"],
                           gpu=record["gpu"], parity=record["parity"]["summary"],
                           max_abs=record["parity"]["metrics"]["max_abs"],
                           engine_mib=round((engine / "qwen35c" / "1" / "model.plan").stat().st_size / 2**20, 1))
    report = {"sm": sm, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text)
    target = ns.json or (Path(os.environ["OUT"]) / "gpu_tensorrt.json" if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(text + "\n")
    return 0 if all(r["status"] in ("pass", "skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
