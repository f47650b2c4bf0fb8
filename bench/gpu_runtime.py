"""Prepared GPU run of the triton backend's runtime (issue 14): build, check, time. One script, <= 8 min.

    python bench/gpu_runtime.py                        # on the GPU machine (H100/H200)
    python bench/gpu_runtime.py --cpu-smoke            # same code path, TRITON_INTERPRET=1, tiny shapes, seconds

For each (preset, target) of --cases (default: 0.8b on h100-bf16 and h100-fp8, 35b-a3b cut to
--moe-layers layers on h100-bf16):
  1. a random checkpoint (reference.checkpoint.make_random_checkpoint) and the triton artifact built by
     the backend's own emitter (qwen35c.backends.triton.emit.build_directory, kernels shipped for this
     GPU's SM: the session refuses to load otherwise);
  2. a parity check: logits of a short prompt against the emulating reference (bf16: max |Δlogit| and
     top-1; fp8: mean KL and top-1), on the GPU in bf16, so the gate is the bf16 / quantized one;
  3. prefill tok/s at --prefill lengths (batch 1), decode tok/s at --decode-batches (context
     --context), each the median of --repeats timed runs after one warm-up, CUDA-synchronised;
  4. the decode roofline: bytes a step must read (every packed weight but the embedding table, the
     recurrent + conv states read and written, the KV cache read up to the context) over the HBM
     bandwidth measured by a device-to-device copy probe; the table gives achieved / roofline.
The GDN chunk prefill against FLA's chunk_gated_delta_rule is bench/gpu_kernels.py's case (reused, not
duplicated): it runs as `gpu_kernels.py --only gdn` when FLA imports, with its budget taken from ours.
Nothing is reported unless it ran: every row has a status, skipped rows say why. JSON to --json or
$OUT/gpu_runtime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under the Triton interpreter")
    p.add_argument("--cases", default=None, help="comma list preset:target (default: see the docstring)")
    p.add_argument("--moe-layers", type=int, default=4, help="layers of the 35b-a3b build (full attention every 4th)")
    p.add_argument("--prefill", default=None, help="comma list of prefill lengths (default 512,4096)")
    p.add_argument("--decode-batches", default=None, help="comma list (default 1,16,64)")
    p.add_argument("--context", type=int, default=None, help="decode context (default 512)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per run (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=470.0, help="skip what would start after this (s)")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--work", default=None, help="where checkpoints and artifacts go (default: a temp dir)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

T0 = time.perf_counter()
SMOKE = ARGS.cpu_smoke
DEFAULT_CASES = "0.8b:h100-bf16,0.8b:h100-fp8,35b-a3b:h100-bf16"
SMOKE_CASES = "tiny-moe:h100-bf16"


def elapsed() -> float:
    return time.perf_counter() - T0


def sync() -> None:
    if torch.cuda.is_available() and not SMOKE:
        torch.cuda.synchronize()


def hbm_probe_gbps() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / s), median of 5; None on CPU."""
    if SMOKE or not torch.cuda.is_available():
        return None
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")   # 256 MiB, beyond L2
    y = torch.empty_like(x)
    times = []
    for _ in range(6):
        sync()
        t = time.perf_counter()
        y.copy_(x)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * x.numel() / statistics.median(times[1:]) / 1e9


def checkpoint(preset: str, work: Path) -> Path:
    from reference.checkpoint import make_random_checkpoint

    out = work / f"ckpt-{preset}"
    if not (out / "config.json").exists():
        overrides = {}
        if preset == "35b-a3b":
            overrides["num_hidden_layers"] = ARGS.moe_layers
        if preset.startswith("tiny") or preset == "35b-a3b":
            overrides["mtp_num_hidden_layers"] = 0
        make_random_checkpoint(preset, 0, out, **overrides)
    return out


def build(preset: str, target: str, work: Path):
    from qwen35c.backends.triton.emit import build_directory

    ckpt = checkpoint(preset, work)
    out = work / f"art-{preset}-{target}"
    t = time.perf_counter()
    manifest = build_directory(ckpt, target, out, ship_kernels=not SMOKE)
    return ckpt, out, manifest, time.perf_counter() - t


def parity(session, ref, quantized: bool) -> dict:
    ids = torch.randint(0, session.vocab, (1, 4 if SMOKE else 64), generator=torch.Generator().manual_seed(0))
    got, want = session.logits(ids)[0].float(), ref.logits(ids)[0].float()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {"max_abs_logit": (got - want).abs().max().item(), "kl_mean": kl.mean().item(),
            "top1": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "against": "quantization-emulating reference" if quantized else "bf16-weight reference (fp32)"}


def timed(fn, repeats: int) -> float:
    fn()                                            # warm-up (and CUDA-graph capture)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_bytes(session, batch: int, context: int) -> int:
    """Bytes one decode step must move: packed weights (not the embedding table), states, KV read."""
    table = session.plan.weights[0].name                  # the embedding: a step gathers B rows of it
    launched = {b[2:] for launch in session.plan.launches() for _, b in launch.args if b.startswith("w:")}
    weights = sum(t.numel() * t.element_size() for name, t in session.weights.items()
                  if name != table or name in launched)  # a tied table is the LM head: read whole
    state = session.new_state(batch, context + 1)
    moved = 0
    for s in session.plan.states:
        t = state.tensors[s["name"]]
        if "cache" in s["name"]:
            moved += t.element_size() * t.numel() * context // (context + 1)      # read up to the context
        else:
            moved += 2 * t.element_size() * t.numel()                           # read + write
    return weights + moved


def bench_case(preset: str, target: str, work: Path, bandwidth: float | None) -> dict:
    from qwen35c.backends.triton.emit import emulating_reference
    from qwen35c.backends.triton.session import TritonSession

    row = {"preset": preset, "target": target, "status": "pending"}
    ckpt, out, manifest, build_s = build(preset, target, work)
    row["build_s"] = round(build_s, 1)
    session = TritonSession(out, manifest)
    row["mode"] = session.mode
    ref = emulating_reference(ckpt, manifest["quantization"])
    if torch.cuda.is_available() and not SMOKE:
        ref.model.to("cuda")
    row["parity"] = parity(session, ref, manifest["quantization"] is not None)
    del ref
    prefill = [int(x) for x in (ARGS.prefill or ("4" if SMOKE else "512,4096")).split(",")]
    batches = [int(x) for x in (ARGS.decode_batches or ("2" if SMOKE else "1,16,64")).split(",")]
    context = ARGS.context or (4 if SMOKE else 512)
    steps = ARGS.decode_steps or (1 if SMOKE else 32)
    repeats = 1 if SMOKE else ARGS.repeats
    row["prefill"], row["decode"] = [], []
    for length in prefill:
        if elapsed() > ARGS.budget_s:
            row["prefill"].append({"tokens": length, "status": "skipped: budget"})
            continue
        ids = torch.randint(0, session.vocab, (1, length))
        s = timed(lambda: session.prefill(ids, session.new_state(1, length + 1), last_only=True), repeats)
        row["prefill"].append({"tokens": length, "status": "ran", "seconds": s, "tok_per_s": length / s})
    for batch in batches:
        if elapsed() > ARGS.budget_s:
            row["decode"].append({"batch": batch, "status": "skipped: budget"})
            continue
        state = session.new_state(batch, context + steps * (repeats + 1) + 2)
        session.prefill(torch.randint(0, session.vocab, (batch, context)), state, last_only=True)
        nxt = torch.zeros(batch, 1, dtype=torch.long)

        def run():
            for _ in range(steps):
                session.decode(nxt, state)

        s = timed(run, repeats)
        entry = {"batch": batch, "status": "ran", "step_ms": 1e3 * s / steps, "tok_per_s": batch * steps / s}
        if bandwidth:
            need = decode_bytes(session, batch, context)
            entry.update(bytes_per_step=need, roofline_tok_per_s=batch * bandwidth * 1e9 / need,
                         fraction=entry["tok_per_s"] / (batch * bandwidth * 1e9 / need))
        row["decode"].append(entry)
    row["status"] = "ran"
    return row


def fla_compare(budget: float) -> dict:
    """bench/gpu_kernels.py's GDN cases (ours vs FLA's chunk_gated_delta_rule), in a child process."""
    if SMOKE or ARGS.no_fla:
        return {"status": "not run: " + ("--cpu-smoke" if SMOKE else "--no-fla")}
    if budget < 30:
        return {"status": "not run: budget"}
    out = Path(tempfile.mkdtemp()) / "gpu_kernels.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_kernels.py"), "--only", "gdn", "--budget-s", str(int(budget)),
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 120)
    if done.returncode != 0 or not out.exists():
        return {"status": f"error: gpu_kernels.py exited {done.returncode}", "tail": done.stderr[-800:]}
    report = json.loads(out.read_text())
    return {"status": "ran", "cases": [{k: c.get(k) for k in ("shape", "name", "status", "timing", "fla")}
                                       for c in report["cases"]]}


def main() -> int:
    work = Path(ARGS.work or tempfile.mkdtemp(prefix="qwen35c-gpu-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or use --cpu-smoke here")
    bandwidth = hbm_probe_gbps()
    rows = []
    for case in (ARGS.cases or (SMOKE_CASES if SMOKE else DEFAULT_CASES)).split(","):
        preset, target = case.split(":")
        if elapsed() > ARGS.budget_s:
            rows.append({"preset": preset, "target": target, "status": "skipped: budget"})
            continue
        try:
            rows.append(bench_case(preset, target, work, bandwidth))
        except Exception as err:  # noqa: BLE001 - reported per row, the others still run
            rows.append({"preset": preset, "target": target, "status": f"error: {type(err).__name__}: {err}"[:400]})
    fla = fla_compare(ARGS.budget_s - elapsed())
    report = {"mode": "cpu-smoke" if SMOKE else "gpu", "device": torch.cuda.get_device_name(0) if not SMOKE else "cpu",
              "hbm_probe_gbps": bandwidth, "rows": rows, "gdn_vs_fla": fla, "seconds": round(elapsed(), 1)}
    print_table(report)
    path = ARGS.json or (os.path.join(os.environ["OUT"], "gpu_runtime.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(r["status"] == "ran" for r in rows) else 1


def print_table(report: dict) -> None:
    print(f"# triton runtime, {report['mode']} on {report['device']}, HBM probe {report['hbm_probe_gbps']} GB/s")
    print("| preset | target | status | mode | parity | prefill tok/s | decode tok/s (batch) | of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        p = r.get("parity", {})
        par = f"max {p['max_abs_logit']:.3g} KL {p['kl_mean']:.2g} top1 {p['top1']:.3f}" if p else ""
        pre = " ".join(f"{e['tokens']}:{e['tok_per_s']:.0f}" for e in r.get("prefill", []) if e["status"] == "ran")
        dec = " ".join(f"b{e['batch']}:{e['tok_per_s']:.1f}" for e in r.get("decode", []) if e["status"] == "ran")
        roof = " ".join(f"b{e['batch']}:{e['fraction']:.2f}" for e in r.get("decode", []) if "fraction" in e)
        print(f"| {r['preset']} | {r['target']} | {r['status']} | {r.get('mode', '')} | {par} | {pre} | {dec} | {roof} |")
    print(f"GDN chunk vs FLA: {report['gdn_vs_fla']['status']}")
    if report["mode"] == "cpu-smoke":
        print("cpu-smoke: interpreted CPU timings; the roofline columns mean nothing here.")


if __name__ == "__main__":
    sys.exit(main())
