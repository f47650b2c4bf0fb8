"""Sessions: prefill / decode / generate over a model's decoding state, the same for every backend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from qwen35c.errors import QwenError
from qwen35c.runtime.generation import GenerationResult, as_array, choose

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16")


def load_tokenizer(directory: Path):
    """The checkpoint's `tokenizer.json` via the `tokenizers` library, or None when absent."""
    file = Path(directory) / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise QwenError(f"{file}: cannot load tokenizer ({err})") from None


class Session:
    """Backend-agnostic generation on top of `new_state`, `prefill` and `decode`.

    `prefill`, `decode` and `extend` take ids as numpy arrays or torch tensors and return torch
    tensors; `generate` reads them through `prefill_array` / `decode_array` (fp32 numpy), which a
    session whose backend computes in numpy gives directly (the onnx session, which so never
    imports torch)."""

    config = None
    tokenizer = None

    def new_state(self, batch: int, max_len: int):
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, state, lengths: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """ids [B, T] (right-padded to `lengths`) -> logits [B, T, V] ([B, 1, V] at each row's last
        valid position with `last_only`); advances `state`."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, state) -> torch.Tensor:
        """ids [B, 1] -> logits [B, 1, V]; advances `state` by one token per row."""
        raise NotImplementedError

    def prefill_array(self, ids, state, lengths=None, last_only: bool = False) -> np.ndarray:
        """`prefill` as fp32 numpy."""
        return as_array(self.prefill(ids, state, lengths, last_only=last_only))

    def decode_array(self, ids, state) -> np.ndarray:
        """`decode` as fp32 numpy."""
        return as_array(self.decode(ids, state))

    extends = False   # whether `extend` is available (speculative decoding)

    def extend(self, ids, state, lengths, commit) -> torch.Tensor:
        """ids [B, T] (right-padded to `lengths`) -> logits [B, T, V] of every step; the state keeps
        only the first commit[b] <= lengths[b] tokens of each row (a speculative verify step)."""
        raise QwenError(f"{type(self).__name__} has no commit step: speculative decoding needs an artifact "
                        f"whose graph takes `commit` (the onnx backend)")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] of a full sequence, from an empty state."""
        return self.prefill(ids, self.new_state(ids.shape[0], ids.shape[1]))

    def logits_each(self, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Iterator[torch.Tensor]:
        """Teacher-forced logits [B, T, V] of each (ids [B, T], lengths [B] or None) batch, from an
        empty state, in order (a streamed reference runs them all in one pass over its weights)."""
        for ids, lengths in batches:
            yield self.prefill(ids, self.new_state(ids.shape[0], ids.shape[1]), lengths)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: tuple[int, ...] = (),
                 keep_logits: bool = False, on_token: Callable[[int, int], None] | None = None,
                 speculative: int = 0, drafter=None) -> GenerationResult:
        """Greedy (temperature 0) or nucleus sampling; rows of different lengths share one batch.

        `on_token(row, token)` is called as tokens are produced (for streaming). `speculative=K`
        drafts up to K tokens a step with `drafter` ("lookup", the default: prompt lookup; "mtp": the
        artifact's MTP head; or a drafter object) and verifies them in one pass; see
        `qwen35c.runtime.speculative`."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise QwenError("every prompt needs at least one token")
        if speculative:
            from qwen35c.runtime.speculative import generate_speculative

            if keep_logits:
                raise QwenError("keep_logits is not offered with speculative decoding")
            return generate_speculative(self, prompts, max_new_tokens, speculative, drafter, temperature, top_p,
                                        seed, stop_ids, on_token)
        batch, lengths = len(prompts), [len(p) for p in prompts]
        ids = np.zeros((batch, max(lengths)), np.int64)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = prompt
        state = self.new_state(batch, ids.shape[1] + max_new_tokens + 1)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        logits = self.prefill_array(ids, state, np.asarray(lengths, np.int64), last_only=not keep_logits)
        prefill_seconds = time.perf_counter() - start
        kept = [[logits[b, :n]] for b, n in enumerate(lengths)] if keep_logits else []
        last = np.stack([logits[b, n - 1] for b, n in enumerate(lengths)]) if keep_logits else logits[:, 0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        steps, decode_seconds = 0, 0.0
        for step in range(max_new_tokens):
            chosen = choose(last, temperature, top_p, rng)
            for b in range(batch):
                if not done[b]:
                    tokens[b].append(int(chosen[b]))
                    if on_token:
                        on_token(b, int(chosen[b]))
                    done[b] = int(chosen[b]) in stop_ids
            final = all(done) or step == max_new_tokens - 1
            if final and not keep_logits:
                break
            start = time.perf_counter()
            last = self.decode_array(chosen.reshape(batch, 1), state)[:, 0]
            decode_seconds += time.perf_counter() - start
            steps += 1
            for b in range(batch if keep_logits else 0):
                if len(kept[b]) <= len(tokens[b]):  # row b still produced a token this step
                    kept[b].append(last[b:b + 1])
            if final:
                break
        return GenerationResult(tokens, lengths, prefill_seconds, decode_seconds, steps,
                                [np.concatenate(rows) for rows in kept])


class ReferenceSession(Session):
    """The eager reference model from a checkpoint directory."""

    def __init__(self, model, tokenizer=None, source: Path | None = None):
        self.model, self.config, self.tokenizer, self.source = model, model.config, tokenizer, source

    @classmethod
    def from_checkpoint(cls, path: Path, dtype: str = "float32") -> "ReferenceSession":
        import torch

        from reference.checkpoint import load_model

        if dtype not in DTYPES:
            raise QwenError(f"unknown dtype '{dtype}', expected one of {', '.join(DTYPES)}")
        return cls(load_model(path, getattr(torch, dtype)), load_tokenizer(path), Path(path))

    def new_state(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len)

    def prefill(self, ids, state, lengths=None, last_only=False):
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(ids), state, None if lengths is None else torch.as_tensor(lengths),
                              last_only=last_only)

    def decode(self, ids, state):
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(ids), state)

    def logits(self, ids):
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(ids))

    def logits_each(self, batches):
        if not hasattr(self.model, "forward_each"):     # a resident model: batch by batch
            yield from super().logits_each(batches)
            return
        from reference.stream import Batch

        yield from self.model.forward_each([Batch(ids, lengths=lengths) for ids, lengths in batches])
