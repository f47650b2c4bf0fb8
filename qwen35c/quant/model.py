"""Phase one of quantization (offline): the reference model + a recipe -> packed weights; and the
quantization-emulating reference built from them.

`quantize_model(model, recipe, calibration)` returns a `QuantizedModel`: the recipe, the plan (one
`Decision` per tensor), the packed weight of every quantized unit (canonical names; routed experts
per expert and part) and notes. An imported checkpoint (`qwen35c.quant.checkpoint`) produces the
same object with `imported=True`; `quantize_model` never runs on it (imported codes are final).

`emulate(model, quantized)` returns a copy of the model whose quantized linears use the dequantized
weights (the reference twins of the packed GEMMs) and, where the recipe quantizes activations
(FP8 dynamic or static), fake-quantize their inputs exactly as the packed GEMM would. Comparing an
artifact with this model measures kernel/lowering error alone; comparing this model with the
original measures quantization loss alone.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen35c.errors import QwenError
from qwen35c.quant import algorithms
from qwen35c.quant.calibrate import Calibration
from qwen35c.quant.formats import Int4Weight, QuantizedWeight, gemm_input, row_slice
from qwen35c.quant.policy import Decision, plan_model
from qwen35c.quant.recipe import Recipe
from reference import ops
from reference.model import SparseMoeBlock

__all__ = ["QuantizedModel", "quantize_model", "quantize_units", "restrict", "emulate", "emulate_layer",
           "weight_errors", "EmulatedLinear"]


@dataclass
class QuantizedModel:
    recipe: Recipe
    weights: dict[str, QuantizedWeight]                   # canonical unit name -> packed weight
    decisions: list[Decision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    imported: bool = False                                # codes came from a checkpoint: never re-quantize
    source_format: str = "qwen35c"                        # qwen35c | hf-fp8 | gptq-v1 | gptq-v2 | awq

    def metadata(self) -> dict:
        """What the IR / manifest records (formats are metadata, never inferred from file names)."""
        return {"recipe": self.recipe.to_dict(), "label": self.recipe.label, "imported": self.imported,
                "source_format": self.source_format, "quantized": sorted(self.weights),
                "kept": sorted(d.name for d in self.decisions if not d.quantize)}


def _unit_weight(params: dict[str, Tensor], d: Decision) -> Tensor:
    if d.expert is None:
        return params[d.canonical] if d.canonical in params else params[d.name]
    stacked = params[_canonical_source(d)][d.expert]
    if d.part == "down_proj":
        return stacked
    half = stacked.shape[0] // 2
    return stacked[:half] if d.part == "gate_proj" else stacked[half:]


def _canonical_source(d: Decision) -> str:
    from qwen35c.quant.policy import canonical_name
    return canonical_name(d.source)


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, calibration: Calibration | None = None,
                   progress=None, only: set[str] | None = None,
                   only_reason: str = "not lowered by the backend: kept") -> QuantizedModel:
    """Quantize every unit the policy selects. Calibrated recipes (AWQ, GPTQ, static FP8) need
    `calibration` (from `qwen35c.quant.calibrate.collect`). `only` (canonical unit names) restricts
    it to the units a compiled graph actually quantized (the `quantize` pass's list); the policy's
    other choices become kept, with `only_reason`."""
    if isinstance(model, QuantizedModel):
        raise QwenError("this model is already quantized (imported codes are never re-quantized)")
    if recipe.needs_calibration and calibration is None:
        raise QwenError(f"{recipe.label} needs calibration activations")
    decisions = restrict(plan_model(model, recipe), only, only_reason)
    params = dict(model.named_parameters(remove_duplicate=False))   # a tied lm_head too
    out = QuantizedModel(recipe, {}, decisions)
    todo = [d for d in decisions if d.quantize]
    fallback = quantize_units(out.weights, params, todo, recipe, calibration, progress)
    note_fallback(out, fallback)
    return out


def restrict(decisions: list[Decision], only: set[str] | None, only_reason: str) -> list[Decision]:
    """Keep the policy's quantized units that are in `only` (canonical names); the rest become kept."""
    if only is None:
        return decisions
    missing = sorted(set(only) - {d.canonical for d in decisions if d.quantize})
    if missing:
        raise QwenError(f"the graph quantized {missing[0]}, which the policy keeps for this model "
                        f"({len(missing)} such unit(s)): the pass and the model disagree")
    return [d if not d.quantize or d.canonical in only else dataclasses.replace(d, quantize=False, reason=only_reason)
            for d in decisions]


def quantize_units(out: dict[str, QuantizedWeight], params: dict[str, Tensor], todo: list[Decision],
                   recipe: Recipe, calibration: Calibration | None, progress=None) -> list[str]:
    """Pack every unit of `todo` into `out` (params: full parameter names -> tensors); returns the
    units that fell back to RTN for lack of calibration rows."""
    fallback = []
    for i, d in enumerate(todo):
        weight = _unit_weight(params, d)
        rows = calibration.rows(d.canonical) if calibration is not None else None
        amax = calibration.amax.get(d.canonical) if calibration is not None else None
        if recipe.needs_calibration and (rows is None or rows.shape[0] == 0) and not recipe.is_fp8:
            fallback.append(d.canonical)
        if recipe.is_fp8 and recipe.activations == "static" and amax is None:
            raise QwenError(f"{d.canonical}: no calibration activations for a static FP8 scale "
                            f"(use moe_calibration='all')")
        unit_recipe = recipe if d.group_size is None else dataclasses.replace(recipe, group_size=d.group_size)
        out[d.canonical] = algorithms.quantize_weight(weight, unit_recipe, rows, amax, recipe.unit_bits(d.canonical))
        if progress is not None:
            progress(i + 1, len(todo), d.canonical)
    return fallback


def note_fallback(out: QuantizedModel, fallback: list[str]) -> None:
    if fallback:
        out.notes.append(f"{len(fallback)} unit(s) saw no calibration tokens and were RTN-quantized: "
                         f"{', '.join(fallback[:4])}{' ...' if len(fallback) > 4 else ''}")


class EmulatedLinear(nn.Module):
    """y = F.linear(fq(x) * pre_scale, W_deq, bias): the packed GEMM's math in the model dtype.

    W_deq is held in `dtype` up to RESIDENT_ROWS output rows; a larger matrix (a 248K-row LM head:
    1 GB in fp32) is dequantized RESIDENT_ROWS rows at a time in forward instead (the same numbers
    per output column, computed in slices of ~32 MB at H = 1024)."""

    RESIDENT_ROWS = 8192

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.qweight, self.dtype = qweight, dtype
        self.out_features, self.in_features = qweight.shape
        resident = qweight.shape[0] <= self.RESIDENT_ROWS
        self.weight = nn.Parameter(self.dequantized(), requires_grad=False) if resident else None
        pre = getattr(qweight, "pre_scale", None)
        self.register_buffer("pre_scale", None if pre is None else pre.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self, begin: int = 0, end: int | None = None) -> Tensor:
        """Rows begin:end of W_deq in the model dtype."""
        return row_slice(self.qweight, begin, end).dequantize().to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = gemm_input(x, self.qweight)
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for begin in range(0, self.out_features, self.RESIDENT_ROWS):
            end = min(begin + self.RESIDENT_ROWS, self.out_features)
            out[..., begin:end] = F.linear(x, self.dequantized(begin, end),
                                           None if self.bias is None else self.bias[begin:end])
        return out


class EmulatedMoeBlock(nn.Module):
    """The MoE block with quantized experts: same routing and combine as `ops.moe_eager`, each
    expert's gate_up / down inputs fake-quantized (and AWQ-prescaled) like its packed GEMMs. A quantized
    expert is dequantized when tokens reach it, not when the layer loads: a streamed 256-expert layer
    decoding one token dequantizes its top-k experts, not all of them."""

    def __init__(self, block: SparseMoeBlock, gate_up: list[tuple[QuantizedWeight, QuantizedWeight] | None],
                 down: list[QuantizedWeight | None]):
        super().__init__()
        self.top_k, self.norm_topk_prob = block.top_k, block.norm_topk_prob
        self.gate, self.experts = block.gate, block.experts
        self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate
        self.q_gate_up, self.q_down = gate_up, down

    @staticmethod
    def _input(x: Tensor, q: QuantizedWeight | None) -> Tensor:
        return x if q is None else gemm_input(x, q)

    def _weights(self, e: int) -> tuple[Tensor, Tensor]:
        """Expert e's [2I, H] gate_up (gate rows, then up) and [H, I] down, dequantized where quantized."""
        dtype = self.experts.gate_up_proj.dtype
        gu, down = self.q_gate_up[e], self.q_down[e]
        w_gu = self.experts.gate_up_proj[e] if gu is None else torch.cat([q.dequantize() for q in gu]).to(dtype)
        return w_gu, self.experts.down_proj[e] if down is None else down.dequantize().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        shared = self.shared_expert(x)
        weights, chosen = ops.moe_route(x, self.gate.weight, self.top_k, self.norm_topk_prob)
        flat, order = torch.sort(chosen.reshape(-1), stable=True)
        rows = x[order // self.top_k]
        counts = torch.bincount(flat, minlength=self.gate.weight.shape[0]).tolist()
        outputs = []
        for e, chunk in enumerate(rows.split(counts)):
            if not chunk.shape[0]:
                continue
            gu = self.q_gate_up[e]
            w_gu, w_down = self._weights(e)
            if gu is None or _same_input(*gu):
                gate, up = F.linear(self._input(chunk, gu[0] if gu else None), w_gu).chunk(2, dim=-1)
            else:  # gate and up transform their shared input differently (AWQ scales per unit)
                i = w_gu.shape[0] // 2
                gate = F.linear(self._input(chunk, gu[0]), w_gu[:i])
                up = F.linear(self._input(chunk, gu[1]), w_gu[i:])
            hidden = F.silu(gate) * up
            outputs.append(F.linear(self._input(hidden, self.q_down[e]), w_down))
        routed = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(-1)
        routed = torch.empty_like(routed).index_copy(0, order, routed)
        routed = routed.view(x.shape[0], self.top_k, -1).sum(dim=1).to(x.dtype)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return (routed + shared).view(shape)


def _same_input(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Do two units sharing an input transform it identically (so one fused GEMM is exact)?"""
    if isinstance(a, Int4Weight) or isinstance(b, Int4Weight):
        return (getattr(a, "pre_scale", None) is None and getattr(b, "pre_scale", None) is None and type(a) is type(b)
                and (a.act_int8, a.group_size) == (b.act_int8, b.group_size))
    return (a.activations, a.granularity) == (b.activations, b.granularity) and (
        a.input_scale is None or (b.input_scale is not None and bool(torch.equal(a.input_scale, b.input_scale))))


def emulated_weights(quantized: QuantizedModel) -> dict[str, QuantizedWeight]:
    """The units as the GEMMs run them: with int8 activations (cpu-int4's MatMulNBits accuracy level
    4) each unit says whether its activations are rounded to int8 (the recipe's, not the codes')."""
    weights = quantized.weights
    if quantized.recipe.is_int4 and quantized.recipe.activations == "int8":
        weights = {n: dataclasses.replace(q, act_int8=quantized.recipe.int8_activations(n)) for n, q in weights.items()}
    if quantized.recipe.tied_embedding == "shared" and "lm_head.weight" in weights:
        weights = {**weights, SHARED_EMBEDDING: weights["lm_head.weight"]}   # the lookup reads the head's codes
    return weights


SHARED_EMBEDDING = "model.embed_tokens.weight"


@torch.no_grad()
def emulate(model: nn.Module, quantized: QuantizedModel, inplace: bool = False) -> nn.Module:
    """The quantization-emulating reference (see the module docstring)."""
    target = model if inplace else copy.deepcopy(model)
    dtype = next(target.parameters()).dtype
    _emulate_into(target, emulated_weights(quantized), dtype)   # replacing `lm_head` unties a tied head on purpose
    target.eval()
    return target


@torch.no_grad()
def emulate_layer(layer: nn.Module, index: int, weights: dict[str, QuantizedWeight]) -> nn.Module:
    """Decoder layer `index` (modified in place) with the units of `weights` (canonical names, any
    layer; only `model.layers.{index}.*` are used) replaced by their emulating twins."""
    prefix = f"model.layers.{index}."
    own = {name[len(prefix):]: q for name, q in weights.items() if name.startswith(prefix)}
    _emulate_into(layer, own, next(layer.parameters()).dtype)
    return layer.eval()


def _emulate_into(target: nn.Module, weights: dict[str, QuantizedWeight], dtype: torch.dtype) -> None:
    """Replace the linears / expert blocks named by `weights` (relative to `target`) in place."""
    experts: dict[str, dict[int, dict[str, QuantizedWeight]]] = {}
    for name, q in weights.items():
        parts = name.split(".")
        if "experts" in parts and parts[-3].isdigit():          # ....mlp.experts.E.part.weight
            block = ".".join(parts[:parts.index("experts")])
            experts.setdefault(block, {}).setdefault(int(parts[-3]), {})[parts[-2]] = q
            continue
        module_name = name[: -len(".weight")]
        owner_name, _, leaf = module_name.rpartition(".")
        owner = target.get_submodule(owner_name) if owner_name else target
        linear = getattr(owner, leaf)
        if isinstance(linear, nn.Embedding) and name == SHARED_EMBEDDING:
            if getattr(getattr(target, "config", None), "tie_word_embeddings", False):   # untied: nothing to share
                linear.weight = nn.Parameter(q.dequantize().to(dtype), requires_grad=False)
            continue
        if not isinstance(linear, nn.Linear):
            raise QwenError(f"{name}: quantized weight for a module that is not nn.Linear")
        if q.shape != tuple(linear.weight.shape):
            raise QwenError(f"{name}: quantized shape {list(q.shape)} != model {list(linear.weight.shape)}")
        setattr(owner, leaf, EmulatedLinear(q, linear.bias, dtype))
    for block_name, per_expert in experts.items():
        _emulate_experts(target, block_name, per_expert)


def _emulate_experts(target: nn.Module, block_name: str, per_expert: dict[int, dict[str, QuantizedWeight]]) -> None:
    block = target.get_submodule(block_name)
    num = block.experts.gate_up_proj.shape[0]
    q_gu: list = [None] * num
    q_down: list = [None] * num
    for e, parts in per_expert.items():
        if "gate_proj" in parts or "up_proj" in parts:
            if not ("gate_proj" in parts and "up_proj" in parts):
                raise QwenError(f"{block_name}.experts.{e}: gate_proj and up_proj must be quantized together")
            q_gu[e] = (parts["gate_proj"], parts["up_proj"])
        if "down_proj" in parts:
            q_down[e] = parts["down_proj"]
    owner_name, _, leaf = block_name.rpartition(".")
    setattr(target.get_submodule(owner_name), leaf, EmulatedMoeBlock(block, q_gu, q_down))


@torch.no_grad()
def weight_errors(model: nn.Module, quantized: QuantizedModel, calibration: Calibration | None = None) -> dict:
    """Per-unit relative weight error ||W - W_eff|| / ||W|| and, with calibration rows, relative
    output error ||X W^T - X_q W_eff^T|| / ||X W^T||; plus their means."""
    params = dict(model.named_parameters(remove_duplicate=False))   # a tied lm_head too
    by_name = {d.canonical: d for d in quantized.decisions}
    rows = {}
    for name, q in quantized.weights.items():
        w = _unit_weight(params, by_name[name]).float()
        w_eff = q.effective_weight() if isinstance(q, Int4Weight) else q.dequantize()
        entry = {"weight_rel": float((w - w_eff).norm() / w.norm().clamp_min(1e-30))}
        x = calibration.rows(name) if calibration is not None else None
        if x is not None and x.shape[0]:
            x = x[:1024]
            ref = x @ w.t()
            entry["output_rel"] = float((ref - gemm_input(x, q) @ q.dequantize().t()).norm() / ref.norm().clamp_min(1e-30))
        rows[name] = entry
    summary = {"units": len(rows),
               "weight_rel_mean": sum(r["weight_rel"] for r in rows.values()) / max(len(rows), 1)}
    outs = [r["output_rel"] for r in rows.values() if "output_rel" in r]
    if outs:
        summary["output_rel_mean"] = sum(outs) / len(outs)
    return {"summary": summary, "units": rows}
