"""Quantization inside a build and a verify: the packed weights of a compiled graph, reproducibly.

The `quantize` pass decides WHICH linears are quantized (its `graph.metadata["quantization"]`:
recipe, quantized / kept / not-lowered names). `prepare(model_dir, meta)` computes the packed weights
of exactly those units, layer by layer in bounded memory (`qwen35c.quant.sequential`): each decoder
layer is read from the memory-mapped checkpoint in fp32, calibrated on the built-in calibration set
when the recipe needs data (AWQ, GPTQ, static FP8; `calibrate.builtin_calibration`) as it flows
through the already-quantized layers before it, packed (to disk, mapped back: `qwen35c.quant.spill`),
and dropped. Calibration and quantization run single-threaded (`torch.set_num_threads(1)` for their
duration): BLAS reductions change with the thread count, and a GPTQ code flips on a last-bit
difference, so one thread count is what keeps builds byte-identical across machines with different
core counts.

The result is recorded (`Prepared.record`) in the graph metadata and the manifest's `quantization`
section: the recipe, the calibration record, the unit lists and `packed_sha256`, a digest of every
packed tensor. `verify` calls `prepare` again from the manifest and compares the digest: equal means
its quantization-emulating reference (`emulate`) uses the very codes and scales inside the artifact,
so artifact-vs-emulation measures the lowering alone. A different digest (another torch build, a
different CPU ISA) is reported, and that check is not run rather than run against other weights.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwen35c.quant.formats import int4_rows
from qwen35c.quant.model import (SHARED_EMBEDDING, EmulatedLinear, QuantizedModel, emulate_layer, emulated_weights,
                                 restrict)
from qwen35c.quant.policy import canonical_name, plan_model
from qwen35c.quant.recipe import Recipe
from qwen35c.quant.sequential import quantize_sequential
from qwen35c.quant.spill import PackedSpill
from reference.model import Qwen35ForCausalLM
from reference.stream import StreamedModel, return_freed_memory

__all__ = ["Prepared", "prepare", "packed_digest", "precision_of", "DEFAULT_INT4_ALGORITHM"]

# The INT4 algorithm of the `cpu-int4` / `a100-int4` targets: GPTQ (g128, symmetric, no act-order).
# Why: (1) measured on both bundled trained models with the built-in calibration set (README table,
# bench/bench_quant.py), GPTQ has about half of AWQ's mean KL (dense 3.3e-4 vs 6.6e-4) and the best
# top-1; (2) it is the format of Qwen's own INT4 releases (Qwen3.5-27B-GPTQ-Int4, notes/quantization.md
# §3.6), so imported and self-quantized INT4 share one path; (3) its codes need no explicit AWQ
# pre-scale, i.e. no extra Mul before every MatMulNBits; (4) static groups keep it g_idx-free, which
# TensorRT's symmetric INT4 DQ and MatMulNBits both take as is. AWQ stays one option away
# (`--quantize int4-awq`); notes §3.1 recommend it when calibration data is scarce.
DEFAULT_INT4_ALGORITHM = "gptq"


@contextlib.contextmanager
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def packed_digest(quantized: QuantizedModel) -> str:
    """sha256 over every unit's packed tensors (name, part, dtype, shape, bytes), in sorted order."""
    from qwen35c.passes.quantize import packed_parts

    digest = hashlib.sha256()
    for name in sorted(quantized.weights):
        for part, tensor in sorted(packed_parts(quantized.weights[name]).items()):
            t = tensor.detach().contiguous().cpu()
            digest.update(f"{name}#{part}:{t.dtype}:{list(t.shape)}\0".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def precision_of(recipe: Recipe) -> str:
    """The parity gate class of a recipe (`qwen35c.targets.GATES`)."""
    return "fp8" if recipe.is_fp8 else "int4"


@dataclass
class Prepared:
    """The packed weights of a build and the references they are checked against, both streamed
    (`reference.stream.StreamedModel`: one decoder layer resident, same call signature, `config`
    and `new_cache` as `Qwen35ForCausalLM`, so `ReferenceSession` takes either)."""

    quantized: QuantizedModel
    model_dir: Path
    record: dict                # what the manifest / graph metadata records
    spill: PackedSpill | None = None   # where the packed tensors live (memory-mapped), if not in memory

    def release(self) -> None:
        """Drop the pages of the packed tensors this process has touched (see `qwen35c.quant.spill`)."""
        if self.spill is not None:
            self.spill.release()

    @property
    def model(self) -> StreamedModel:
        """The full-precision (fp32) reference, streamed."""
        return StreamedModel(self.model_dir, torch.float32)

    def emulated(self) -> StreamedModel:
        """The quantization-emulating reference, streamed: each layer's packed weights are
        dequantized when the layer is loaded (`emulate_layer`), an included lm_head likewise."""
        weights = emulated_weights(self.quantized)
        emulated_head: list[nn.Module] = []

        def head(linear: nn.Module) -> nn.Module:
            q = weights.get("lm_head.weight")
            emulated_head.append(linear if q is None else EmulatedLinear(q, None, torch.float32))
            return emulated_head[0]

        def embedding(table: torch.Tensor):
            # the head's codes, one table as in the artifact: rows dequantized as they are looked up
            return lambda ids: int4_rows(weights["lm_head.weight"], ids)

        # tied-embedding=shared: the lookup reads the head's codes; else rows of the checkpoint's table
        shared = SHARED_EMBEDDING in weights and self.record.get("embedding", "").startswith("shared")

        def emulated_layer(index: int, module: nn.Module) -> nn.Module:
            self.release()            # the layer before has run: one layer's packed pages resident
            return emulate_layer(module, index, weights)

        return StreamedModel(self.model_dir, torch.float32, head_hook=head, embed_hook=embedding if shared else None,
                             layer_hook=emulated_layer)


def prepare(model_dir: str | Path, meta: dict) -> Prepared:
    """Packed weights for the units of a `quantize` pass record `meta` (see the module docstring),
    computed layer by layer (`qwen35c.quant.sequential`)."""
    from qwen35c.quant import calibrate

    recipe = Recipe.from_dict(meta["recipe"])
    stream = StreamedModel(model_dir, torch.float32)
    with torch.device("meta"):
        skeleton = Qwen35ForCausalLM(stream.config)          # shapes only: the policy's plan
    decisions = restrict(plan_model(skeleton, recipe), {canonical_name(n) for n in meta["quantized"]},
                         "not quantized in this graph (see not_lowered)")
    calib_record, batches = None, None
    with _single_thread():
        if recipe.needs_calibration:
            cset = calibrate.builtin_calibration(model_dir, stream.config.vocab_size)
            batches = cset.batches
            calib_record = {**cset.meta, "moe_calibration": recipe.moe_calibration,
                            "order": "sequential (each layer calibrated on the quantized layers before it)"}
        spill = PackedSpill()
        quantized = quantize_sequential(stream, recipe, decisions, batches, mode=recipe.moe_calibration, spill=spill)
    stream.close()
    record = {"recipe": recipe.to_dict(), "label": recipe.label, "precision": precision_of(recipe),
              "algorithm": recipe.algorithm, "calibration": calib_record,
              "quantized": sorted(meta["quantized"]), "kept": sorted(meta.get("kept", [])),
              "not_lowered": sorted(meta.get("not_lowered", [])),
              "packed_sha256": packed_digest(quantized), "notes": list(quantized.notes)}
    spill.release()
    return_freed_memory()               # the head's row chunks and the digest's copies: free heap
    if meta.get("not_lowered_reason"):
        record["not_lowered_reason"] = meta["not_lowered_reason"]
    if meta.get("embedding"):
        record["embedding"] = meta["embedding"]
    return Prepared(quantized, Path(model_dir), record, spill)
