"""Packed weights spilled to disk while a model is quantized (`qwen35c.quant.spill`): the same bytes
read back through a mapping, no file left behind, and a build's memory that no longer grows with
every layer's packed weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qwen35c.quant.formats import int4_quantize
from qwen35c.quant.spill import PackedSpill

ROOT = Path(__file__).resolve().parents[2]


def test_spilled_weights_read_back_the_same_bytes_and_leave_no_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {f"model.layers.0.mlp.{p}.weight": int4_quantize(torch.randn(64, 256, generator=g), 128, False)
               for p in ("gate_proj", "up_proj")}
    before = {n: {k: v.clone() for k, v in vars(q).items() if isinstance(v, torch.Tensor)} for n, q in weights.items()}
    spill = PackedSpill(tmp_path)
    spill.put(weights)
    assert list(tmp_path.iterdir()) == []                       # no name (O_TMPFILE), or unlinked once mapped
    for name, q in weights.items():
        for field, value in before[name].items():
            now = getattr(q, field)
            assert now is not value and torch.equal(now, value), (name, field)
    spill.release()                                             # pages dropped, bytes still there
    for name, q in weights.items():
        assert all(torch.equal(getattr(q, field), value) for field, value in before[name].items())


# Runs in a subprocess: anonymous RSS after each layer of an RTN quantization, with and without the
# spill, and the packed bytes of the layers after the first.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from qwen35c.quant.policy import plan_model
    from qwen35c.quant.recipe import parse_scheme
    from qwen35c.quant.sequential import quantize_sequential
    from qwen35c.quant.spill import PackedSpill
    from reference.model import Qwen35ForCausalLM
    from reference.stream import StreamedModel

    def anon():
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    ckpt, mode = sys.argv[1:3]
    stream = StreamedModel(ckpt)
    with torch.device("meta"):
        skeleton = Qwen35ForCausalLM(stream.config)
    recipe = parse_scheme("int4-rtn")
    decisions = [d for d in plan_model(skeleton, recipe) if d.canonical != "lm_head.weight"]
    seen = []
    spill = PackedSpill() if mode == "spill" else None
    out = quantize_sequential(stream, recipe, decisions, None, progress=lambda *_: seen.append(anon()), spill=spill)
    later = sum(t.numel() * t.element_size() for name, q in out.weights.items() if not name.startswith("model.layers.0.")
                for t in vars(q).values() if isinstance(t, torch.Tensor))
    print(json.dumps({"growth": seen[-1] - seen[0], "packed": later}))
""")


def _run(ckpt: Path, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), mode], capture_output=True, text=True,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc RSS figures")
def test_quantization_memory_does_not_grow_with_the_packed_layers(checkpoint_factory):
    """8 layers of ~8 MB packed each: kept in memory, anonymous RSS grows by about their bytes from
    the first layer to the last; spilled, it stays flat (the test shows it can tell the two apart)."""
    ckpt = checkpoint_factory("tiny", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                              vocab_size=512, mtp_num_hidden_layers=0)
    kept, spilled = _run(ckpt, "memory"), _run(ckpt, "spill")
    packed = kept["packed"]
    assert packed > 40 << 20 and spilled["packed"] == packed
    print(f"packed after layer 0: {packed / 2**20:.0f} MiB; anonymous RSS grew {kept['growth'] / 2**20:.0f} MiB "
          f"in memory, {spilled['growth'] / 2**20:.0f} MiB spilled")
    assert kept["growth"] > 0.75 * packed
    assert spilled["growth"] < 0.25 * packed


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-then-unlinked"])
def test_a_full_scratch_disk_is_a_clear_error(tmp_path, monkeypatch, tmpfile):
    import qwen35c.quant.spill as spill_module
    from qwen35c.errors import QwenError

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill_module, "write_safetensors", full)
    if not tmpfile:
        monkeypatch.delattr(spill_module.os, "O_TMPFILE", raising=False)
    weights = {"lm_head.weight": int4_quantize(torch.randn(8, 128), 128, True)}
    with pytest.raises(QwenError, match=re.escape(f"{tmp_path}: ") + ".*No space left on device.*TMPDIR"):
        PackedSpill(tmp_path).put(weights)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(__import__("os"), "O_TMPFILE"), reason="Linux O_TMPFILE")
def test_a_process_killed_while_spilling_leaves_nothing(tmp_path):
    """The scratch file has no name while it is written: SIGKILL in the middle of a write leaves no
    partial file in TMPDIR (a named file would stay, header and all)."""
    script = textwrap.dedent("""
        import os, signal, torch
        from qwen35c.quant.spill import Spill

        class DiesMidWrite(dict):   # the header is on disk when the first tensor is asked for
            def __getitem__(self, key):
                os.kill(os.getpid(), signal.SIGKILL)

        Spill().tensors(DiesMidWrite(a=torch.zeros(1 << 20)))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == -9, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
