"""Peak RSS of an artifact alone on the build check's workload (its side of the check, `verify.record`:
T=1, T=65, batch [3, 9] + 4 decode steps + a greedy continuation; or the `full` set, which a build
whose gate is statistical checks on): `python tools/artifact_peak.py ARTIFACT_DIR [short|full]`. Prints VmHWM (MiB)
before and after, so the build's own peak can be compared with the artifact's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from qwen35c.artifact import read_manifest
    from qwen35c.backends.onnx.session import OnnxSession
    from qwen35c.verify import PROMPT_SETS, prompt_plan, record

    directory = Path(sys.argv[1])
    print(f"imports: VmHWM {vm('VmHWM'):.0f} MiB")
    prompts = sys.argv[2] if len(sys.argv) > 2 else "short"
    session = OnnxSession(directory, read_manifest(directory), threads=1, arena=False)   # as the check loads it
    print(f"session: VmRSS {vm('VmRSS'):.0f} MiB")

    record(session, prompt_plan(session.config.vocab_size, **PROMPT_SETS[prompts]))   # the check's artifact side
    print(f"after check workload: VmHWM {vm('VmHWM'):.0f} MiB, VmRSS {vm('VmRSS'):.0f} MiB")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
