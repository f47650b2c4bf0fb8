"""Benchmark the onnx backend on a checkpoint (not a test): build time and peak RSS of
`qwen35c build`, then prefill tok/s (512-token prompt) and decode tok/s (64 new tokens, batch 1)
at context 512 and 4096, with N ORT threads; medians of 3.

    python bench/bench_onnx.py --model /work/ckpt/0.8b --out /tmp/art-0.8b --threads 2 [--skip-build]

Peer numbers to put beside these are in ../shared/notes/cpu-peers.md (measured on the same 2-core
machine); run them side by side in one session for ratios, the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(model: str, out: str) -> dict:
    cmd = ["/usr/bin/time", "-v", shutil.which("qwen35c") or "qwen35c", "build", "--model", model,
           "--target", "cpu", "-o", out, "--force", "--no-check"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"build failed:\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"build_seconds": seconds, "build_peak_rss_mib": int(rss.group(1)) / 1024 if rss else None,
            "stages": proc.stderr.strip().splitlines()[-8:]}


def bench(out: str, threads: int, contexts=(512, 4096), new_tokens: int = 64, repeats: int = 3) -> dict:
    import torch

    from qwen35c.runtime import load

    t0 = time.perf_counter()
    session = load(out, threads=threads)
    result = {"load_seconds": time.perf_counter() - t0, "threads": threads}
    rng = np.random.default_rng(0)
    vocab = session.config.vocab_size
    for context in contexts:
        ids = torch.from_numpy(rng.integers(0, vocab, (1, context)))
        prefill = []
        for _ in range(repeats if context <= 512 else 1):
            state = session.new_state(1, context + repeats * new_tokens + 8)
            t = time.perf_counter()
            logits = session.prefill(ids, state, last_only=True)
            prefill.append(context / (time.perf_counter() - t))
        token = logits[:, -1].argmax(-1).view(1, 1)
        decode = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(new_tokens):
                token = session.decode(token, state)[:, -1].argmax(-1).view(1, 1)
            decode.append(new_tokens / (time.perf_counter() - t))
        result[f"prefill_tok_s@{context}"] = statistics.median(prefill)
        result[f"decode_tok_s@{context}"] = statistics.median(decode)
        result[f"raw@{context}"] = {"prefill": prefill, "decode": decode}
    import resource

    result["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/ckpt/0.8b")
    ap.add_argument("--out", default="/tmp/qwen35c-bench-0.8b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    report = {} if args.skip_build else build(args.model, args.out)
    report.update(bench(args.out, args.threads, tuple(int(c) for c in args.contexts.split(","))))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
