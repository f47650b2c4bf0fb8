"""Calibration: the input activations of every linear of the reference model on calibration tokens.

Dense linears are observed with forward pre-hooks on `nn.Linear`. Routed experts are stacked
Parameters used inside the `qwen35::moe` op, so they are observed from the MoE block's input (the
post-attention-norm output) and their inputs computed here with the full-precision expert weights:
gate_proj / up_proj see the block input, down_proj sees SiLU(gate x) * up x of that expert. With
`moe_calibration="all"` (the default) every calibration token is sent through every expert (the
llm-compressor `calibrate_all_experts` idea: a rarely routed expert still gets a full Hessian);
with "routed" each expert sees only the tokens the router gives it (and an expert that sees none
falls back to RTN in `quantize_model`). The model's own output is unchanged either way.

Rows are kept up to `max_rows` per unit (a seeded uniform subsample once exceeded); the per-unit
absolute maximum is tracked over every row (static FP8 activation scales need the true amax).

Built-in calibration data (`builtin_calibration`): what a build calibrates on when it is given
nothing else. The text is bundled (`data/calibration.txt`, provenance in `data/README.md`: the
first 4 KiB of 16 training-split stdlib files, never a held-out one), not read from the running
interpreter, so builds on any machine see the same bytes; it is tokenized with the checkpoint's own
tokenizer.json (each document behind `<|endoftext|>`) and cut into `seq_len` sequences up to
`max_tokens`. A checkpoint without a tokenizer.json (random test checkpoints) calibrates on seeded
uniform token ids instead. The record (`CalibrationSet.meta`) names the source and its sha256 and is
written into the graph metadata and the artifact manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import ops
from reference.model import SparseMoeBlock

__all__ = ["Calibration", "CalibrationSet", "Collector", "collect", "add_expert_rows", "calibration_batches", "builtin_calibration",
           "CALIBRATION_TEXT", "CALIBRATION_TOKENS", "CALIBRATION_SEQ_LEN"]

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 8192        # 32 sequences of 256 tokens (AWQ needs few; GPTQ's Hessian is K x K)
CALIBRATION_SEQ_LEN = 256
DOC_SEPARATOR = "<|endoftext|>"


@dataclass
class Calibration:
    """inputs[unit] = X [rows, K] fp32, amax[unit] = max |x| over all observed rows (0-d)."""

    inputs: dict[str, Tensor] = field(default_factory=dict)
    amax: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0
    mode: str = "all"

    def rows(self, unit: str) -> Tensor | None:
        return self.inputs.get(unit)


class Collector:
    def __init__(self, max_rows: int, seed: int):
        self.max_rows, self.seed = max_rows, seed
        self.chunks: dict[str, list[Tensor]] = {}
        self.count: dict[str, int] = {}
        self.amax: dict[str, Tensor] = {}

    def add(self, unit: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            self.chunks.setdefault(unit, [])
            return
        peak = x.abs().max()
        self.amax[unit] = torch.maximum(self.amax[unit], peak) if unit in self.amax else peak
        self.chunks.setdefault(unit, []).append(x)
        self.count[unit] = self.count.get(unit, 0) + x.shape[0]
        if self.count[unit] > 2 * self.max_rows:   # bound memory: subsample while collecting
            self._shrink(unit)

    def _shrink(self, unit: str) -> None:
        rows = torch.cat(self.chunks[unit])
        generator = torch.Generator().manual_seed(self.seed + len(unit))
        keep = torch.randperm(rows.shape[0], generator=generator)[:self.max_rows].sort().values
        self.chunks[unit] = [rows[keep]]
        self.count[unit] = self.max_rows

    def result(self, tokens: int, mode: str) -> Calibration:
        out = Calibration(tokens=tokens, mode=mode)
        for unit, chunks in self.chunks.items():
            if self.count.get(unit, 0) > self.max_rows:
                self._shrink(unit)
            width = chunks[0].shape[-1] if chunks else 0
            out.inputs[unit] = torch.cat(self.chunks[unit]) if self.chunks[unit] else torch.zeros(0, width)
            if unit in self.amax:
                out.amax[unit] = self.amax[unit]
        return out


def _moe_hook(collector: Collector, prefix: str, block: SparseMoeBlock, mode: str):
    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        num_experts = gate_up.shape[0]
        if mode == "routed":
            _, chosen = ops.moe_route(x, block.gate.weight, block.top_k, block.norm_topk_prob)
        for e in range(num_experts):
            add_expert_rows(collector, prefix, e, x if mode == "all" else x[(chosen == e).any(dim=-1)],
                            gate_up[e], down.shape[-1])
    return hook


def add_expert_rows(collector: Collector, prefix: str, e: int, rows: Tensor, gate_up: Tensor,
                    intermediate: int) -> None:
    """Expert e's unit inputs: gate/up see `rows` [n, H]; down sees SiLU(gate x) * up x [n, I]."""
    collector.add(f"{prefix}.experts.{e}.gate_proj.weight", rows)
    collector.add(f"{prefix}.experts.{e}.up_proj.weight", rows)
    if rows.shape[0]:
        gate, up = F.linear(rows, gate_up).chunk(2, dim=-1)
        rows = F.silu(gate) * up
    else:
        rows = rows.new_zeros(0, intermediate)
    collector.add(f"{prefix}.experts.{e}.down_proj.weight", rows)


@torch.no_grad()
def collect(model: nn.Module, batches: list[Tensor], max_rows: int = 4096, mode: str = "all",
            seed: int = 0) -> Calibration:
    """Run `batches` (LongTensor [B, T] each) through `model`; return every linear's inputs."""
    if mode not in ("all", "routed"):
        raise ValueError(f"moe calibration mode '{mode}': expected 'all' or 'routed'")
    collector = Collector(max_rows, seed)
    handles = []
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        if isinstance(module, nn.Linear):
            unit = f"{name}.weight"
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, unit=unit: collector.add(unit, args[0])))
        elif isinstance(module, SparseMoeBlock):
            handles.append(module.register_forward_pre_hook(_moe_hook(collector, name, module, mode)))
    tokens = 0
    try:
        was_training = model.training
        model.eval()
        for ids in batches:
            model(ids)
            tokens += ids.numel()
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return collector.result(tokens, mode)


def calibration_batches(ids: list[int] | Tensor, seq_len: int, max_batches: int) -> list[Tensor]:
    """Cut a token stream into up to `max_batches` sequences [1, seq_len] (evenly spaced)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    count = max(1, min(max_batches, ids.numel() // seq_len))
    stride = max(seq_len, (ids.numel() - seq_len) // max(count - 1, 1)) if count > 1 else seq_len
    return [ids[i * stride:i * stride + seq_len].view(1, -1) for i in range(count)
            if ids[i * stride:i * stride + seq_len].numel() == seq_len]


@dataclass
class CalibrationSet:
    """Calibration token batches plus the record of where they came from (for the manifest)."""

    batches: list[Tensor]
    meta: dict


def builtin_calibration(model_dir: str | Path, vocab_size: int, max_tokens: int = CALIBRATION_TOKENS,
                        seq_len: int = CALIBRATION_SEQ_LEN) -> CalibrationSet:
    """The built-in calibration set for a checkpoint (see the module docstring); deterministic."""
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        raw = CALIBRATION_TEXT.read_bytes()
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        sep = tokenizer.token_to_id(DOC_SEPARATOR)
        ids: list[int] = []
        for doc in raw.decode("utf-8").split(DOC_SEPARATOR):
            ids += ([sep] if sep is not None else []) + list(tokenizer.encode(doc, add_special_tokens=False).ids)
        ids = ids[:max_tokens]
        if ids and max(ids) >= vocab_size:
            raise ValueError(f"{tokenizer_file}: token id {max(ids)} is outside the model's vocabulary ({vocab_size})")
        meta = {"source": "builtin text qwen35c/quant/data/calibration.txt",
                "text_sha256": hashlib.sha256(raw).hexdigest(),
                "tokenizer_sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()}
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (max_tokens,), generator=generator).tolist()
        meta = {"source": "uniform random token ids, seed 0 (the checkpoint has no tokenizer.json)"}
    batches = calibration_batches(ids, seq_len, max(1, len(ids) // seq_len))
    meta.update(tokens=sum(b.numel() for b in batches), seq_len=seq_len, sequences=len(batches))
    return CalibrationSet(batches, meta)
