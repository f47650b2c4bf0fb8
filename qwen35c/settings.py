"""Every run-time knob qwen35c reads from the environment, in one place.

    QWEN35C_THREADS        intra-op threads of an ONNX Runtime session when the caller gives none
                           (default 0: ORT's choice, one per physical core; at most 256).
    QWEN35C_ORT_SPIN       0 turns off spin-waiting in ORT's intra-op pool (better on an
                           oversubscribed machine, slower on an idle one); 1 forces it on; unset:
                           ORT's default.
    QWEN35C_PREFILL_CHUNK  longest prompt piece one ONNX prefill step takes (default: the
                           artifact's, 128 tokens with quantized linears, 256 in fp32; longer
                           prompts run as consecutive chunks, bounding activation memory).
    QWEN35C_DRAFT_VOCAB    the MTP head drafts among the first N token ids only (default 0: the
                           whole vocabulary): its LM head then reads N/V of its bytes, and a token
                           past N is never drafted (backends/onnx/fuse.py).

A malformed value is an error naming the variable, never silently replaced by the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qwen35c.errors import QwenError


MAX_THREADS = 256      # far above any core count; 100000 made ONNX Runtime crash creating its pool


def _int(name: str, default: int, minimum: int, maximum: int = 1 << 30) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QwenError(f"environment variable {name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise QwenError(f"environment variable {name}={value} must be in [{minimum}, {maximum}]")
    return value


def _switch(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if raw not in ("0", "1"):
        raise QwenError(f"environment variable {name}={raw!r} must be 0 or 1")
    return raw == "1"


@dataclass(frozen=True)
class Settings:
    threads: int
    ort_spin: bool | None
    prefill_chunk: int
    draft_vocab: int


def settings() -> Settings:
    """The settings as the environment has them now (read at each call, so tests can set them)."""
    return Settings(threads=_int("QWEN35C_THREADS", 0, 0, MAX_THREADS),
                    ort_spin=_switch("QWEN35C_ORT_SPIN"),
                    prefill_chunk=_int("QWEN35C_PREFILL_CHUNK", 0, 1),      # 0: the artifact's own
                    draft_vocab=_int("QWEN35C_DRAFT_VOCAB", 0, 0))
