"""Routed experts quantized at pack time (the quantize pass leaves stacked experts `not_lowered`).

The rule, shared by the plan, the packer and the emulating reference:
  * the stacked experts of a layer are quantized when the graph's quantization record lists them in
    `not_lowered` and the recipe has a grouped-kernel format: FP8 block-128 with dynamic activations,
    or symmetric INT4 with K (hidden, moe_intermediate) a multiple of the group;
  * each expert's gate_proj, up_proj and down_proj are quantized on their own with
    `qwen35c.quant.formats` (fp8_quantize, block; int4_quantize, RTN: the pack has no calibration data
    for experts, whatever the recipe's algorithm for the linears), then stacked in the layout of
    `moe/quantized.py` (gate rows / blocks, then up).
"""

from __future__ import annotations

import torch

EXPERT_ALGORITHM = "rtn"


def expert_format(recipe: dict | None) -> tuple[str, int] | None:
    """("fp8", 128) / ("int4", group) for a recipe the grouped quantized kernels serve, else None."""
    if not recipe:
        return None
    scheme = recipe.get("scheme", "")
    if scheme == "fp8-block128" and recipe.get("activations") == "dynamic":
        return "fp8", 128
    if scheme.startswith("int4") and recipe.get("symmetric", True):
        return "int4", int(recipe.get("group_size", 128))
    return None


def why_not(fmt: tuple[str, int] | None, hidden: int, inter: int) -> str | None:
    """None when a layer's experts [E, 2I, H] / [E, H, I] can be quantized in `fmt`, else the reason."""
    if fmt is None:
        return "the recipe has no grouped quantized expert kernel"
    if fmt[0] == "int4" and (hidden % fmt[1] or inter % fmt[1]):
        return f"INT4 group {fmt[1]} does not divide hidden {hidden} / moe_intermediate {inter}"
    return None


def quantize_stacked(w: torch.Tensor, fmt: tuple[str, int], which: str) -> tuple[dict, dict]:
    """One stacked expert tensor (`which` "gate_up": w13 [E, 2I, H]; "down": w2 [E, H, I]) ->
    (packed parts {"weight", "scale"} (FP8) / {"qweight", "scales"} (INT4), per-expert QuantizedWeights
    {(e, "gate_proj" | "up_proj" | "down_proj"): weight} for the emulation)."""
    from qwen35c.quant.formats import fp8_quantize, int4_quantize

    kind, group = fmt

    def q(m):
        return fp8_quantize(m.float()) if kind == "fp8" else int4_quantize(m.float(), group, symmetric=True)

    per: dict = {}
    for e in range(w.shape[0]):
        if which == "gate_up":
            inter = w.shape[1] // 2
            per[(e, "gate_proj")], per[(e, "up_proj")] = q(w[e, :inter]), q(w[e, inter:])
        else:
            per[(e, "down_proj")] = q(w[e])
    names = ("weight", "scale") if kind == "fp8" else ("qweight", "scales")
    projections = ("gate_proj", "up_proj") if which == "gate_up" else ("down_proj",)
    parts = {attr: torch.stack([torch.cat([getattr(per[(e, p)], attr) for p in projections])
                                for e in range(w.shape[0])]).contiguous() for attr in names}
    return parts, per


__all__ = ["EXPERT_ALGORITHM", "expert_format", "quantize_stacked", "why_not"]
