"""What `Session.generate` returns, and how it picks tokens (shared with speculative decoding).

numpy only, like the ONNX session: running an onnx artifact never imports torch (the import alone
is ~220 MB of a runtime process's resident set)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationResult:
    """Generated ids per row, the logits of every position when asked, and timings."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    logits: list[np.ndarray] = field(default_factory=list)  # per row: [prompt + generated, V] fp32
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


def as_array(logits) -> np.ndarray:
    """fp32 numpy logits from any session: a numpy array, or a torch tensor of any float dtype on
    any device (the reference's and the triton backend's)."""
    if isinstance(logits, np.ndarray):
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)
    return logits.detach().float().cpu().numpy()


def greedy(logits) -> np.ndarray:
    """argmax over the last dimension (the first of equal maxima)."""
    return as_array(logits).argmax(-1)


def choose(logits, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row of logits [..., V]: greedy at temperature 0, else a draw from `sampling_probs`."""
    if temperature <= 0:
        return greedy(logits)
    return sample(sampling_probs(logits, temperature, top_p), rng)


def sampling_probs(logits, temperature: float, top_p: float) -> np.ndarray:
    """The distribution `generate` samples from, float64: softmax(logits / T), cut to the nucleus
    top_p (the most likely tokens whose mass before them is < top_p; unnormalised after the cut)."""
    z = as_array(logits).astype(np.float64) / temperature
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        probs = np.stack([_nucleus(row, top_p) for row in probs.reshape(-1, probs.shape[-1])]).reshape(probs.shape)
    return probs


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """`probs` [V] outside its nucleus zeroed. The nucleus lies within the k likeliest tokens
    whenever they hold top_p of the mass, so only those are sorted, k = 1024 or 16384 (an O(V)
    argpartition each), before sorting the whole row: a 248K vocabulary's sort is ~20 ms, more
    than the 0.8b's decode step takes to run."""
    top = np.arange(probs.size)
    for k in (1024, 16384):
        if k < probs.size:
            head = np.argpartition(probs, probs.size - k)[probs.size - k:]
            if probs[head].sum() >= top_p:
                top = head
                break
    order = top[np.argsort(-probs[top])]
    ranked = probs[order]
    keep = order[np.cumsum(ranked) - ranked < top_p]     # always keeps the most likely token
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of unnormalised probabilities [..., V], by inverse CDF: the first index
    whose cumulative mass exceeds a uniform draw in [0, row mass), so a zero-probability index is
    never drawn."""
    cdf = np.cumsum(probs, -1)
    u = rng.random(cdf.shape[:-1]) * cdf[..., -1]
    return np.minimum((cdf <= u[..., None]).sum(-1), probs.shape[-1] - 1)


__all__ = ["GenerationResult", "as_array", "choose", "greedy", "sample", "sampling_probs"]
