"""Memory as a tested property (issue 19): a build's peak RSS is bounded by its largest layer, not the
model. The checkpoint has many narrow layers, so "one layer resident" and "the whole model
resident" are far apart; each build runs in a subprocess that reports its own VmHWM and its RSS
once everything is imported, and the growth must stay under a bound computed from the largest layer
(and, for the check, the artifact's own size) — far below the whole model in fp32."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 32
NARROW = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=LAYERS, vocab_size=512,
              mtp_num_hidden_layers=0)

# Runs in a subprocess; prints {"base", "peak"} in bytes. The peak (VmHWM) is reset once tracing and
# the passes are done (/proc/self/clear_refs): they hold the graph, never weights, and their size
# grows with the layer count however the weights are handled. "artifact" mode measures the built
# artifact alone on the build check's workload (its side of the check: `verify.record`).
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    from qwen35c.artifact import read_manifest
    from qwen35c.build import build_artifact
    from qwen35c.backends.onnx.session import OnnxSession
    from qwen35c.quant import calibrate
    from qwen35c.verify import prompt_plan, record

    real = calibrate.builtin_calibration
    # fewer calibration tokens keep the test fast; memory per layer is what is measured
    calibrate.builtin_calibration = lambda d, v, **k: real(d, v, max_tokens=1024, seq_len=128)

    def rss(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def reset():
        Path("/proc/self/clear_refs").write_text("5")
        return rss("VmRSS")

    mode, ckpt, target, out = sys.argv[1:5]
    base = []
    if mode == "build":
        def progress(stage, message, fraction):
            if stage == "sources" and not base:
                base.append(reset())
        # weight-only INT4 (the memory property is the streaming; cpu-int4's int8 activations flip
        # near-ties on this deep random checkpoint, a gate question, not a memory one)
        build_artifact(ckpt, target, out, progress=progress,
                       quantize="int4-gptq group-size=128" if target == "cpu-int4" else None)
    else:
        base.append(reset())
        session = OnnxSession(Path(out), read_manifest(Path(out)), threads=1)
        record(session, prompt_plan(session.config.vocab_size, single=(1, 65), batch=(3, 9), steps=4))
    print(json.dumps({"base": base[0], "peak": rss("VmHWM")}))
""")


def _growth(mode: str, ckpt: Path, target: str, out: Path) -> int:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(ckpt), target, str(out)], capture_output=True,
                            text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                      "PATH": "/usr/bin:/bin"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["peak"] - measured["base"]


@pytest.fixture(scope="module")
def narrow_deep(checkpoint_factory):
    return checkpoint_factory("tiny", **NARROW)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("target", ["cpu-int4", "cpu"])
def test_build_peak_is_bounded_by_the_largest_layer(narrow_deep, target, tmp_path):
    """Build growth <= the artifact's own growth (its ORT session, on the check's prompts) + a few
    layers; a step holding the whole model in fp32 (the decoder layers alone: `whole`) would exceed it."""
    from reference.config import load_config
    from reference.stream import layer_bytes

    layers = layer_bytes(load_config(narrow_deep), torch.float32)
    whole, layer = sum(layers), max(layers)
    slack = 8 * layer + (48 << 20)
    assert whole >= 2 * slack                                      # the bound can tell them apart
    out = tmp_path / target
    build = _growth("build", narrow_deep, target, out)
    artifact = _growth("artifact", narrow_deep, target, out)
    print(f"{target}: build grew {build / 2**20:.0f} MiB, artifact alone {artifact / 2**20:.0f} MiB, "
          f"layer {layer / 2**20:.1f} MiB, whole model fp32 {whole / 2**20:.0f} MiB")
    assert build <= artifact + slack, (f"{target}: the build grew {build / 2**20:.0f} MiB > artifact "
                                       f"{artifact / 2**20:.0f} + {slack / 2**20:.0f} MiB: a step loads the whole model?")


def test_build_records_the_check_as_not_run_when_memory_is_short(checkpoint_factory, tmp_path, monkeypatch):
    import qwen35c.memory
    from qwen35c.build import build_artifact

    monkeypatch.setattr(qwen35c.memory, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr(qwen35c.memory, "current_rss", lambda: 0)
    report = build_artifact(checkpoint_factory("tiny"), "cpu", tmp_path / "a")
    parity = report.manifest["parity"]
    assert parity["status"] == "not run" and "not enough memory for the check" in parity["summary"]


def test_verify_says_what_memory_it_needs_and_does_not_run_without_it(checkpoint_factory, tmp_path, monkeypatch):
    import qwen35c.memory
    from qwen35c.build import build_artifact
    from qwen35c.verify import verify_artifact

    build_artifact(checkpoint_factory("tiny"), "cpu", tmp_path / "a", check=False)
    report = verify_artifact(tmp_path / "a", skip=("speculative", "mtp"), prompts="short")
    assert report["status"] == "pass" and report["memory"]["estimated_peak_bytes"] > 0
    monkeypatch.setattr(qwen35c.memory, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr(qwen35c.memory, "current_rss", lambda: 0)
    report = verify_artifact(tmp_path / "a")
    parity = {c["name"]: c for c in report["checks"]}["parity"]
    assert report["status"] == "incomplete" and parity["status"] == "not run"
    assert parity["detail"].startswith("not enough memory for verify (") and "it needs ~" in parity["detail"]


def test_build_estimate_does_not_grow_with_the_layer_count():
    from qwen35c.memory import artifact_peak, build_peak
    from reference.checkpoint import preset_config

    short, long = preset_config("35b-a3b", num_hidden_layers=4), preset_config("35b-a3b", num_hidden_layers=8)
    assert artifact_peak(long).total > artifact_peak(short).total          # the artifact holds every layer
    assert build_peak(long, "int4", check=False).total == build_peak(short, "int4", check=False).total
    fp32, int4 = artifact_peak(preset_config("0.8b"), "fp32"), artifact_peak(preset_config("0.8b"), "int4")
    assert int4.parts["weights"] < fp32.parts["weights"] and fp32.parts["prepacked"] > 0   # tied head copy
    # cpu-int4's tied head is one 8-bit table the lookup shares: counted prepacked (x1.3) and mapped
    cfg = preset_config("0.8b")
    table = cfg.vocab_size * cfg.hidden_size * (1 + 4 / 128)
    assert int4.parts["prepacked"] == int(table) and int4.parts["weights"] > 1.3 * table


def test_inspect_reports_both_estimates(checkpoint_factory):
    from qwen35c.commands.inspect import summarize

    info = summarize(checkpoint_factory("tiny"))["memory_estimates"]
    for target in ("cpu", "cpu-int4"):
        assert info["targets"][target]["artifact_runtime_peak"]["total_bytes"] > 0
        assert info["targets"][target]["build_peak"]["total_bytes"] > 0


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc RSS accounting")
def test_a_settled_artifact_file_maps_only_the_rows_a_gather_touches(tmp_path):
    """The build settles its files before the check (fsync + drop from the page cache): a mapped
    gather of random rows then costs about a page a row, not the large folio a fresh write left
    cached (2 MiB a row on ext4 with large folios: a 1 GB embedding table fully counted in RSS)."""
    import mmap

    import numpy as np

    from qwen35c.artifact import settle

    rows, width = 32768, 2048                               # a 256 MiB table of 8 KiB rows
    table = tmp_path / "model.onnx.data"
    with open(table, "wb") as f:
        for _ in range(16):
            f.write(np.random.default_rng(0).bytes(rows * width // 16))
    settle(tmp_path)
    picks = np.random.default_rng(1).choice(rows, 64, replace=False)
    with open(table, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        before = _rss_file()
        for r in picks:
            m[int(r) * width]                               # one byte of the row: a page fault
        grown = _rss_file() - before
    assert grown <= 64 * (256 << 10), f"64 random rows mapped {grown / 2**20:.1f} MiB of file pages"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc RSS accounting")
def test_releasing_a_tied_lm_head_drops_the_embedding_pages(checkpoint_factory):
    """The emitter releases a tied head by its own name (`lm_head.weight`); the pages are the
    embedding's. They stayed mapped through the build check (0.8B: 490 MB of a bf16 table)."""
    from qwen35c.graph.trace import CheckpointWeights

    weights = CheckpointWeights(checkpoint_factory("tiny", tie_word_embeddings=True, vocab_size=65536,
                                                   hidden_size=256, num_hidden_layers=1))
    before = _rss_file()
    table = weights("lm_head.weight")
    assert float(table.float().abs().sum()) > 0                  # every page of the 32 MiB table read
    mapped = _rss_file() - before
    weights.release("lm_head.weight")
    left = _rss_file() - before
    assert mapped >= 24 << 20, f"reading the table mapped only {mapped / 2**20:.1f} MiB"
    assert left <= 4 << 20, f"{left / 2**20:.1f} MiB of the embedding stayed mapped after the release"


FREED_BLOCKS = """
import contextlib
import sys
from pathlib import Path
import numpy as np
from reference.heap import freed_blocks_unmapped

def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

big = np.ones(16 << 20, np.uint8)       # a large buffer, freed: glibc's threshold rises to 16 MiB
del big
base = rss()
with freed_blocks_unmapped() if sys.argv[1] == "unmap" else contextlib.nullcontext():
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(96)]   # a run's 1 MiB intermediates ...
    last = blocks[-1]
    del blocks                          # ... freed, all but the last
print(rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator on Linux (/proc RSS accounting)")
def test_lean_sessions_hand_freed_blocks_back_at_once():
    """A lean ONNX Runtime session runs without ORT's arena, so its intermediates come from glibc,
    whose dynamic mmap threshold keeps blocks under the largest one freed so far on the heap: free
    but resident after a run (about twice a run's working set at the 0.8b preset). A lean session
    runs inside `freed_blocks_unmapped`: each block is unmapped as it is freed."""
    def retained(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FREED_BLOCKS, mode], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], check=True)
        return int(out.stdout.split()[-1])

    assert retained("default") >= 64 << 20, "glibc returned the freed blocks by itself: the test shows nothing"
    assert retained("unmap") <= 8 << 20


def _mapped_rss(path: Path) -> list[tuple[str, int]]:
    """(permissions, resident kB) of each of this process's mappings of `path`."""
    out, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            current = head[1] if len(head) == 6 and head[5] == str(path) else None
        elif current is not None and line.startswith("Rss:"):
            out.append((current, int(line.split()[1])))
    return out


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc only")
def test_dropping_mapped_pages_spares_written_ones(tmp_path):
    """drop_mapped_pages empties a read-only mapping's resident pages (which read back the same) and
    leaves a private mapping with a written page alone (dropping it would lose the write)."""
    import numpy as np

    from reference.heap import drop_mapped_pages

    file = (tmp_path / "weights.bin").resolve()
    data = np.arange(1 << 20, dtype=np.int32)          # 4 MiB
    data.tofile(file)
    shared = np.memmap(file, dtype=np.int32, mode="r")
    private = np.memmap(file, dtype=np.int32, mode="c")
    assert int(shared.sum()) == int(private.sum()) == int(data.sum())    # every page resident
    private[5] = -1                                                      # one private copy
    assert dict(_mapped_rss(file))["r--s"] >= 4000
    assert drop_mapped_pages([file]) == data.nbytes                      # the shared mapping only
    assert dict(_mapped_rss(file))["r--s"] == 0
    assert np.array_equal(shared, data) and private[5] == -1 and private[6] == 6
