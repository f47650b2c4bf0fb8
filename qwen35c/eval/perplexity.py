"""Teacher-forced perplexity over a text, and KL divergence against a saved base distribution.

The model is anything that maps token ids to logits: `logits_fn(ids: LongTensor[1, T]) ->
FloatTensor[1, T, V]`. A reference checkpoint gives one through `checkpoint_logits_fn`, a compiled
artifact session through its own forward; the measurement is the same, which is the point (this is
how quantization quality is measured, like llama.cpp's `llama-perplexity`).

Windowing. The text is tokenized and `<|endoftext|>` is put in front (the document separator the
bundled models were trained with), so every token of the text is scored and `bits_per_byte` covers
every byte. Targets are scored in chunks of `stride` new tokens; the window for a chunk is the up to
`context` tokens before its last target, so every target sees at least `context - stride` tokens of
context (with `stride == context`, the default, windows do not overlap and the first target of each
window sees one token). Each window is a fresh forward (no state carried between windows).

Saved distributions (`save_logits`) are a safetensors file. With `top_k > 0` (the default, 64) it
holds per scored position the top-k token ids and log-probs plus the log of the remaining mass, so
its size is ~(8k + 8) bytes per token whatever the vocabulary (a full fp32 distribution of a
248k-token vocabulary would be ~1 MB per token). KL is then computed on the base's top-k buckets
plus one "rest" bucket: KL(P_coarse || Q_coarse), a lower bound of the full KL that is exact when
the base put all its mass in its top-k. `top_k = 0` stores the full fp32 log-probs and gives the
exact KL.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from qwen35c.errors import QwenError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

FORMAT = "qwen35c-logits/1"
DEFAULT_CONTEXT = 256
DEFAULT_TOP_K = 64
DOC_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Window:
    begin: int  # first input position
    end: int  # one past the last input position
    target_begin: int  # first scored target (a position in the token sequence)
    target_end: int  # one past the last scored target; target t is predicted at input t - 1


def windows(n_tokens: int, context: int, stride: int) -> Iterator[Window]:
    """The windows that score targets 1..n_tokens-1 exactly once (token 0 is the separator)."""
    if context < 1:
        raise QwenError(f"--context must be at least 1, got {context}")
    if not 1 <= stride <= context:
        raise QwenError(f"--stride must be between 1 and --context ({context}), got {stride}")
    t0 = 1
    while t0 < n_tokens:
        t1 = min(t0 + stride, n_tokens)
        begin = max(0, t1 - 1 - context)
        yield Window(begin, t1 - 1, t0, t1)
        t0 = t1


def encode_text(tokenizer, text: str) -> list[int]:
    """`<|endoftext|>` + the text's tokens. `tokenizer` is a `tokenizers.Tokenizer`."""
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
    sep = tokenizer.token_to_id(DOC_SEPARATOR)
    return ([sep] if sep is not None else []) + ids


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise QwenError(f"{path}: no such file (--text needs a UTF-8 text file)")
    if not path.is_file():
        raise QwenError(f"{path}: not a regular file (--text needs a UTF-8 text file)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise QwenError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise QwenError(f"{path}: cannot read ({err.strerror})") from None


def checkpoint_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """`logits_fn` of a reference `Qwen35ForCausalLM` (eval mode, no grad, fp32 logits)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).float()

    return fn


def _ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


def evaluate(logits_fn: LogitsFn, ids: Sequence[int], *, n_bytes: int | None = None,
             context: int | None = None, stride: int | None = None,
             save_logits: str | Path | None = None, top_k: int = DEFAULT_TOP_K,
             kl_base: str | Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Score `ids` (separator first) teacher-forced. Returns a dict with `tokens`, `nll_mean`,
    `perplexity`, `bits_per_byte` (when `n_bytes` is given), `context`, `stride`, and with `kl_base`
    also `kl_mean`, `kl_p99`, `kl_max`, `top1_agreement`."""
    base = None
    if kl_base is not None:
        base = _BaseLogits.load(kl_base)
        if base.meta["ids_sha256"] != _ids_digest(ids):
            raise QwenError(f"{kl_base}: was saved from a different text or tokenizer "
                            f"({base.meta['tokens']} tokens, this run has {len(ids) - 1})")
        if context is None:
            context = base.meta["context"]
        if stride is None and context == base.meta["context"]:
            stride = base.meta["stride"]
    context = DEFAULT_CONTEXT if context is None else context
    stride = context if stride is None else stride
    if base is not None and (context, stride) != (base.meta["context"], base.meta["stride"]):
        raise QwenError(f"{kl_base}: was saved with --context {base.meta['context']} --stride "
                        f"{base.meta['stride']}; this run uses --context {context} --stride {stride}")
    if len(ids) < 2:
        raise QwenError("the text has no tokens to score")
    plan = list(windows(len(ids), context, stride))
    all_ids = torch.tensor(list(ids), dtype=torch.long)

    nll_sum = 0.0
    n_scored = 0
    saved: dict[str, list[torch.Tensor]] = {}
    kls: list[torch.Tensor] = []
    top1_same = 0
    vocab = None
    for i, w in enumerate(plan):
        logits = logits_fn(all_ids[None, w.begin:w.end])
        if logits.dim() != 3 or logits.shape[:2] != (1, w.end - w.begin):
            raise QwenError(f"the model returned logits of shape {tuple(logits.shape)} for a "
                            f"window of {w.end - w.begin} tokens; expected [1, {w.end - w.begin}, V]")
        vocab = logits.shape[-1]
        rows = torch.arange(w.target_begin - 1, w.target_end - 1) - w.begin
        logp = torch.log_softmax(logits[0, rows].float(), dim=-1)  # [n, V]
        targets = all_ids[w.target_begin:w.target_end]
        if int(targets.max()) >= vocab:
            raise QwenError(f"token id {int(targets.max())} is outside the model's vocabulary ({vocab}); "
                            f"the tokenizer does not belong to this model")
        nll_sum += float(-logp.gather(1, targets[:, None]).sum(dtype=torch.float64))
        n_scored += len(targets)
        if save_logits is not None:
            for key, value in _compress(logp, top_k).items():
                saved.setdefault(key, []).append(value)
        if base is not None:
            kl, top1 = base.compare(logp, w.target_begin - 1, w.target_end - 1)
            kls.append(kl)
            top1_same += int(top1.sum())
        if progress is not None:
            progress(i + 1, len(plan))

    nll_mean = nll_sum / n_scored
    result = {"tokens": n_scored, "nll_mean": nll_mean, "perplexity": math.exp(nll_mean)}
    if n_bytes is not None:
        result["bytes"] = n_bytes
        result["bits_per_byte"] = nll_sum / math.log(2) / n_bytes if n_bytes else float("nan")
    result["context"] = context
    result["stride"] = stride
    if base is not None:
        kl = torch.cat(kls).double()
        result["kl_mean"] = float(kl.mean())
        result["kl_p99"] = float(torch.quantile(kl, 0.99)) if kl.numel() <= 16_000_000 else float(
            kl.sort().values[min(kl.numel() - 1, int(math.ceil(0.99 * kl.numel())) - 1)])
        result["kl_max"] = float(kl.max())
        result["top1_agreement"] = top1_same / n_scored
    if save_logits is not None:
        meta = {"format": FORMAT, "tokens": n_scored, "context": context, "stride": stride,
                "top_k": top_k, "vocab_size": vocab, "ids_sha256": _ids_digest(ids)}
        _save(save_logits, {k: torch.cat(v) for k, v in saved.items()}, meta)
    return result


def _compress(logp: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    if top_k <= 0 or top_k >= logp.shape[-1]:
        return {"logp": logp.contiguous()}
    vals, idx = logp.topk(top_k, dim=-1)
    rest = logp.scatter(1, idx, float("-inf")).logsumexp(dim=-1)
    return {"topk_ids": idx.to(torch.int32), "topk_logp": vals.contiguous(), "rest_logp": rest}


def _save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save

    from qwen35c.artifact import atomic_file

    data = save(tensors, metadata={"qwen35c": json.dumps(meta)})
    with atomic_file(path, "--save-logits") as f:
        f.write(data)


class _BaseLogits:
    """A saved base distribution, compared position by position against a new run."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict):
        self.path, self.t, self.meta = path, tensors, meta

    @classmethod
    def load(cls, path: str | Path) -> "_BaseLogits":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise QwenError(f"{path}: no such file (--kl-base needs a file written by --save-logits)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("qwen35c", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise QwenError(f"{path}: not a safetensors file written by --save-logits ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise QwenError(f"{path}: not written by --save-logits (no '{FORMAT}' metadata)")
        return cls(path, tensors, meta)

    def compare(self, logq: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position KL(base || new) and top-1 agreement for scored positions [lo, hi)."""
        if logq.shape[-1] != self.meta["vocab_size"]:
            raise QwenError(f"{self.path}: base vocabulary is {self.meta['vocab_size']}, this model's "
                            f"is {logq.shape[-1]}")
        if "logp" in self.t:
            logp = self.t["logp"][lo:hi].float()
            kl = (logp.exp() * (logp - logq)).sum(-1)
            return kl.clamp_min(0.0), logp.argmax(-1) == logq.argmax(-1)
        idx = self.t["topk_ids"][lo:hi].long()
        logp = self.t["topk_logp"][lo:hi].float()
        rest_p = self.t["rest_logp"][lo:hi].float()
        q_top = logq.gather(1, idx)
        rest_q = logq.scatter(1, idx, float("-inf")).logsumexp(dim=-1)
        kl = (logp.exp() * (logp - q_top)).sum(-1)
        kl = kl + torch.where(torch.isfinite(rest_p), rest_p.exp() * (rest_p - rest_q), 0.0)
        return kl.clamp_min(0.0), idx[:, 0] == logq.argmax(-1)


def load_tokenizer(model_dir: str | Path):
    """The `tokenizers.Tokenizer` of a model directory (its tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise QwenError(f"{path}: not found (the model directory needs its tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise QwenError(f"{path}: cannot load tokenizer ({str(err).splitlines()[0]})") from None


def load_checkpoint(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(logits_fn, tokenizer) of a reference checkpoint directory."""
    from reference.checkpoint import load_model
    from reference.errors import CheckpointError

    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise QwenError(f"{model_dir}: no such model directory")
    if (model_dir / "manifest.json").exists():  # a compiled artifact: score through its session
        from qwen35c.runtime import load

        session = load(model_dir)
        if session.tokenizer is None:
            raise QwenError(f"{model_dir}: the artifact has no tokenizer.json (built from a checkpoint without "
                            f"one); perplexity needs it to encode --text")
        return (lambda ids: session.logits(ids).float()), session.tokenizer
    try:
        model = load_model(model_dir, dtype=dtype)
    except CheckpointError as err:
        raise QwenError(str(err)) from None
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise QwenError(f"{model_dir}: no tokenizer.json; perplexity needs it to encode --text")
    return checkpoint_logits_fn(model), tokenizer
