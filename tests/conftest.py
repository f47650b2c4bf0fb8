"""Shared fixtures: small random checkpoints in the official layout, and HF as the parity oracle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# why: with flash-linear-attention importable, HF dispatches CPU tensors to Triton kernels and
# crashes (notes §10). Keep HF on its torch fallback, which is the oracle we want.
sys.modules.setdefault("fla", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# why: no test machine has a GPU; Triton kernels (and the triton backend's runtime) run under the CPU
# interpreter, which Triton reads when `triton.language` is first imported. The product sets this
# itself (`qwen35c.backends.triton.mode.ensure`) before tracing; a test process imports torch.export
# (and with it Triton) earlier, so it is set here, once, for every test module.
os.environ.setdefault("TRITON_INTERPRET", "1")
# why: pytest-xdist runs one worker per core (pyproject's addopts); each worker's torch and ONNX
# Runtime (QWEN35C_THREADS, inherited by the CLI subprocesses) get their share of the cores, or
# the workers' spinning thread pools take turns on the same cores.
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.setdefault("QWEN35C_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)

from reference.checkpoint import make_random_checkpoint  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (the heaviest tests hold ~3 GiB each)."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(preset, seed=0, **overrides) -> a cached checkpoint directory."""
    made: dict[tuple, Path] = {}

    def make(preset: str, seed: int = 0, layout: str = "vlm", experts: str = "fused", **overrides) -> Path:
        key = (preset, seed, layout, experts, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / preset
            made[key] = make_random_checkpoint(preset, seed, out, layout=layout, experts=experts, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(path, dtype) -> the HF transformers model for a checkpoint (the test-only oracle)."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging

    logging.set_verbosity_error()

    def load(path: Path, dtype: torch.dtype = torch.float32):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    return load
