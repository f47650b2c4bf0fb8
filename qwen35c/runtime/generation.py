"""What `Session.generate` returns, and how it picks tokens (shared with speculative decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class GenerationResult:
    """Generated ids per row, the logits of every position when asked, and timings."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    logits: list[torch.Tensor] = field(default_factory=list)  # per row: [prompt + generated, V] fp32
    decode_tokens: int | None = None   # tokens the decode steps produced (speculative: not steps x rows)
    drafted: int = 0                   # speculative: draft tokens proposed, and how many were accepted
    accepted: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return sum(self.prompt_lengths) / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        produced = self.decode_steps * len(self.tokens) if self.decode_tokens is None else self.decode_tokens
        return produced / self.decode_seconds if self.decode_seconds else float("nan")

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens (speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else float("nan")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension, by numpy: torch's argmax over a [T > 1, V] tensor runs on its
    intra-op threads, whose spin-wait after it took the two cores from the ONNX Runtime step that
    followed (0.8b preset, a 2-token speculative step: 38-41 ms between judged steps against 29-34
    ms back to back; 31 ms with torch on one thread: /tmp/mtp/ab08.py, throwaway)."""
    return torch.from_numpy(np.asarray(logits.detach().float().numpy().argmax(-1)))


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return greedy(logits)
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator).view(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `generate` samples from: softmax(logits / T), cut to the nucleus top_p
    (unnormalised: torch.multinomial normalises)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


__all__ = ["GenerationResult", "choose", "greedy", "sampling_probs"]
