"""Layer-by-layer (sequential) quantization: the whole model is never resident.

As the field's quantizers do at scale (GPTQ's reference code, AutoGPTQ, llm-compressor's sequential
pipeline): the calibration activations are captured at the input of decoder layer i, only layer i's
weights are read from the memory-mapped checkpoint (`reference.stream.StreamedModel.load_layer`),
its units are calibrated and packed, the layer is turned into its quantization-emulating twin
(`emulate_layer`) and run on the same activations to produce layer i+1's inputs; then the fp32
layer is dropped and only its packed weights stay, written to disk (`qwen35c.quant.spill`) and
mapped back. Every layer is therefore calibrated on the activations of the already-quantized model
before it.

Routed experts are calibrated expert by expert from the MoE block's input (kept once per layer,
[N, H]): expert e's rows are computed, its three units packed, its rows dropped — so one layer of a
256-expert model never holds 256 experts' calibration rows. Recipes without calibration (RTN, FP8
dynamic / weight-only) run no forward at all: each layer is loaded, packed and dropped.

Peak memory: one layer in fp32 + its emulated twin + calibration activations (tokens x H per batch)
+ one unit's calibration rows + the embedding; see `qwen35c.memory.build_peak`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qwen35c.errors import QwenError
from qwen35c.quant.calibrate import Calibration, Collector, add_expert_rows
from qwen35c.quant.model import QuantizedModel, emulate_layer, note_fallback, quantize_units
from qwen35c.quant.policy import Decision
from qwen35c.quant.recipe import Recipe
from qwen35c.quant.spill import PackedSpill
from reference import ops
from reference.model import SparseMoeBlock
from reference.stream import Batch, StreamedModel, return_freed_memory

__all__ = ["quantize_sequential"]

MAX_ROWS = 4096      # calibration rows kept per unit (as `calibrate.collect`)


@torch.no_grad()
def quantize_sequential(stream: StreamedModel, recipe: Recipe, decisions: list[Decision],
                        batches: list[Tensor] | None, mode: str = "all", seed: int = 0,
                        progress=None, spill: PackedSpill | None = None) -> QuantizedModel:
    """Pack every quantized unit of `decisions`, one decoder layer resident at a time; with `spill`,
    each layer's packed weights go to disk as soon as they exist (`qwen35c.quant.spill`)."""
    out = QuantizedModel(recipe, {}, decisions)
    todo: dict[int | None, list[Decision]] = {}
    for d in decisions:
        if d.quantize:
            todo.setdefault(_layer_of(d.canonical), []).append(d)
    calibrated = recipe.needs_calibration
    if calibrated and not batches:
        raise QwenError(f"{recipe.label} needs calibration batches")
    steps = [stream.step_info(Batch(ids)) for ids in batches] if calibrated else []
    xs = [stream.embed(ids) for ids in batches] if calibrated else []         # [1, T, H] each
    fallback: list[str] = []
    for index in range(stream.config.num_hidden_layers):
        layer = stream.load_layer(index)
        units = todo.get(index, [])
        if units:
            fallback += _quantize_layer(out.weights, layer, index, units, xs, steps, recipe, mode, seed)
            if spill is not None:
                spill.put(out.weights)
            layer = emulate_layer(layer, index, out.weights)
        if calibrated:
            xs = [layer(x, step) for x, step in zip(xs, steps)]              # the quantized model's activations
        del layer
        if spill is not None:
            spill.release()
        return_freed_memory()
        if progress is not None:
            progress(index + 1, stream.config.num_hidden_layers, f"layer {index}")
    if todo.get(None):
        fallback += _quantize_edges(out.weights, stream, todo[None], xs, recipe, seed)
        if spill is not None:
            spill.put(out.weights)
    if len(out.weights) != sum(map(len, todo.values())):
        stray = sorted({d.canonical for units in todo.values() for d in units} - set(out.weights))
        raise QwenError(f"{stray[0]}: a quantized unit outside the decoder layers and lm_head "
                        f"({len(stray)} such unit(s)); sequential quantization cannot reach it")
    note_fallback(out, fallback)
    return out


def _layer_of(canonical: str) -> int | None:
    """model.layers.{i}.… -> i; None for units outside the decoder layers (lm_head)."""
    parts = canonical.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def _quantize_layer(out: dict, layer: nn.Module, index: int, units: list[Decision], xs: list[Tensor], steps,
                    recipe: Recipe, mode: str, seed: int) -> list[str]:
    """Calibrate layer `index` on `xs` (if the recipe needs data) and pack its units into `out`."""
    prefix = f"model.layers.{index}."
    params = {prefix + name: p for name, p in layer.named_parameters()}
    dense = [d for d in units if d.expert is None]
    experts = [d for d in units if d.expert is not None]
    calibration, moe_inputs = None, {}
    if recipe.needs_calibration:
        calibration, moe_inputs = _calibrate(layer, prefix, {d.canonical for d in dense}, bool(experts),
                                             xs, steps, mode, seed)
    fallback = quantize_units(out, params, dense, recipe, calibration)
    for block_name, x in moe_inputs.items() if experts else ():
        block = layer.get_submodule(block_name[len(prefix):])
        fallback += _quantize_experts(out, params, block, block_name, x,
                                      [d for d in experts if d.canonical.startswith(block_name + ".")],
                                      recipe, mode, seed)
    if experts and not recipe.needs_calibration:
        fallback += quantize_units(out, params, experts, recipe, None)
    return fallback


def _calibrate(layer: nn.Module, prefix: str, units: set[str], experts: bool, xs: list[Tensor], steps,
               mode: str, seed: int) -> tuple[Calibration, dict[str, Tensor]]:
    """The inputs of the nn.Linear `units` (subsampled to MAX_ROWS) and, with `experts`, each MoE
    block's whole input [N, H]."""
    collector = Collector(MAX_ROWS, seed)
    moe_chunks: dict[str, list[Tensor]] = {}
    handles = []
    for name, module in layer.named_modules():
        unit = f"{prefix}{name}.weight"
        if isinstance(module, nn.Linear) and unit in units:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, unit=unit: collector.add(unit, args[0])))
        elif isinstance(module, SparseMoeBlock) and experts:
            chunks = moe_chunks.setdefault(f"{prefix}{name}", [])
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, chunks=chunks: chunks.append(args[0].reshape(-1, args[0].shape[-1]))))
    try:
        for x, step in zip(xs, steps):
            layer(x, step)
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(x.shape[0] * x.shape[1] for x in xs)
    return collector.result(tokens, mode), {name: torch.cat(c) for name, c in moe_chunks.items()}


def _quantize_experts(out: dict, params: dict, block: SparseMoeBlock, block_name: str, x: Tensor,
                      units: list[Decision], recipe: Recipe, mode: str, seed: int) -> list[str]:
    """Expert by expert: its calibration rows from the block input x [N, H], its units packed."""
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    chosen = None
    if mode == "routed":
        _, chosen = ops.moe_route(x, block.gate.weight, block.top_k, block.norm_topk_prob)
    by_expert: dict[int, list[Decision]] = {}
    for d in units:
        by_expert.setdefault(d.expert, []).append(d)
    fallback = []
    for e in sorted(by_expert):
        collector = Collector(MAX_ROWS, seed)
        rows = x if mode == "all" else x[(chosen == e).any(dim=-1)]
        add_expert_rows(collector, block_name, e, rows, gate_up[e], down.shape[-1])
        fallback += quantize_units(out, params, by_expert[e], recipe, collector.result(x.shape[0], mode))
    return fallback


def _quantize_edges(out: dict, stream: StreamedModel, units: list[Decision], xs: list[Tensor],
                    recipe: Recipe, seed: int) -> list[str]:
    """Units outside the decoder layers (an included lm_head), calibrated on the final norm's output.
    The head is quantized from the mapped checkpoint as stored (RTN / GPTQ widen it to fp32 a row
    chunk at a time: the same numbers as from an fp32 copy, without the 1-2 GB copy)."""
    calibration = None
    if recipe.needs_calibration:
        norm = stream.final_norm()
        collector = Collector(MAX_ROWS, seed)
        for x in xs:
            collector.add("lm_head.weight", norm(x))
        calibration = collector.result(sum(x.shape[1] for x in xs), "all")
    name, weight = stream.head_source()
    try:
        return quantize_units(out, {"lm_head.weight": weight}, [d for d in units if d.canonical == "lm_head.weight"],
                              recipe, calibration)
    finally:
        stream.loader.release(name)
