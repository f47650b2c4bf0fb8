"""Precision policy: which tensors are quantized, decided per tensor with EXACT name matching.

Every tensor name is first canonicalised (`model.language_model.` -> `model.`), then classified into
a role by anchored regular expressions over whole dotted components — never by substring. The
router `mlp.gate.weight` and the dense `mlp.gate_proj.weight`, or `in_proj_b` and `in_proj_ba`, are
different roles (peers corrupted weights with loose matches: notes/quantization.md §1.4).

Defaults (notes §0 and §5, the official Qwen FP8 `modules_to_not_convert`):
  * never quantized: embeddings, lm_head, every norm, the router (`mlp.gate`), `shared_expert_gate`,
    GDN `in_proj_a` / `in_proj_b` / `in_proj_ba`, `conv1d`, `A_log`, `dt_bias`, biases, MTP, vision;
  * FP8 quantizes attention q/k/v/o, GDN in_proj_qkv / in_proj_z / in_proj_qkvz / out_proj, dense
    MLPs, the shared expert MLP and the routed experts;
  * INT4 quantizes dense MLPs, the shared expert MLP and routed experts only; attention and GDN
    projections stay high precision unless an include glob asks for them.
`include` / `exclude` are fnmatch globs matched against the canonical name and the checkpoint's own
name (either may match); exclude wins. A glob that matches no tensor is an error (a typo must not
silently quantize nothing). Fused expert tensors ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) are
planned per expert and part under the official per-expert names `mlp.experts.{e}.{gate,up,down}_proj.weight`.

Compiled artifacts: the policy says what SHOULD be quantized; the `quantize` pass quantizes what the
backend can lower. Routed experts become one `quantized_moe` per layer when the pass sees the whole
`moe` op (the CPU targets; ONNX Runtime's QMoE); otherwise (stacked weights inside `grouped_linear`,
FP8, ...) the pass lists them under `not_lowered` with `not_lowered_reason`, the manifest records both,
and the emulating reference that `verify` builds keeps them too (`quantize_model(..., only=...)`); the
triton packer quantizes not-lowered experts itself (`backends/triton/experts.py`). With
`expert-groups=fit` an expert unit whose dims the INT4 group does not divide gets a smaller group
(`Recipe.expert_group`, `Decision.group_size`). The quality table in the README quantizes experts (the
policy's choice).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from qwen35c.errors import QwenError
from qwen35c.quant.recipe import Recipe

__all__ = ["Decision", "classify", "canonical_name", "plan", "plan_checkpoint", "plan_model", "expand_units"]

VLM_PREFIX, TEXT_PREFIX = "model.language_model.", "model."
_L = r"model\.layers\.\d+\."

# (role, anchored pattern over the canonical name). The first match wins; order matters only for
# the MTP / vision prefixes, which must be checked before the per-layer roles.
_ROLES: list[tuple[str, re.Pattern]] = [(role, re.compile(pattern)) for role, pattern in [
    ("mtp", r"mtp\..*"),
    ("vision", r"(model\.)?visual\..*"),
    ("embedding", r"model\.embed_tokens\.weight"),
    ("lm_head", r"lm_head\.weight"),
    ("norm", r"model\.norm\.weight"),
    ("norm", _L + r"(input_layernorm|post_attention_layernorm)\.weight"),
    ("norm", _L + r"self_attn\.(q_norm|k_norm)\.weight"),
    ("norm", _L + r"linear_attn\.norm\.weight"),
    ("ssm_param", _L + r"linear_attn\.(A_log|dt_bias)"),
    ("conv1d", _L + r"linear_attn\.conv1d\.(weight|bias)"),
    ("gdn_gate", _L + r"linear_attn\.(in_proj_a|in_proj_b|in_proj_ba)\.weight"),
    ("gdn_proj", _L + r"linear_attn\.(in_proj_qkv|in_proj_z|in_proj_qkvz|out_proj)\.weight"),
    ("attention", _L + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight"),
    ("bias", _L + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias"),
    ("router", _L + r"mlp\.gate\.weight"),
    ("shared_expert_gate", _L + r"mlp\.shared_expert_gate\.weight"),
    ("shared_expert", _L + r"mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight"),
    ("expert", _L + r"mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight"),
    ("experts_fused", _L + r"mlp\.experts\.(gate_up_proj|down_proj)"),
    ("mlp", _L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight"),
]]

LINEAR_ROLES = {"lm_head", "gdn_gate", "gdn_proj", "attention", "router", "shared_expert_gate",
                "shared_expert", "expert", "mlp"}
_DEFAULT = {"fp8": {"attention", "gdn_proj", "mlp", "shared_expert", "expert"},
            "int4": {"mlp", "shared_expert", "expert"}}
_KEEP_REASON = {
    "mtp": "MTP module stays high precision", "vision": "vision tower stays high precision",
    "embedding": "embedding lookup stays high precision", "norm": "norms stay high precision",
    "ssm_param": "GDN gate parameter (fp32 gate math)", "conv1d": "depthwise causal conv stays high precision",
    "bias": "biases stay high precision", "lm_head": "lm_head kept by default (opt in with --include)",
    "gdn_gate": "GDN in_proj_a/b feed the sigmoid/softplus gates (official FP8 keeps them)",
    "router": "MoE router stays high precision (exact: mlp.gate, not mlp.gate_proj)",
    "shared_expert_gate": "shared-expert gate (N=1) stays high precision",
    "attention": "INT4 keeps attention projections by default (opt in with --include)",
    "gdn_proj": "INT4 keeps GDN projections by default (opt in with --include)",
    "unknown": "unrecognised tensor: kept",
}


def canonical_name(name: str) -> str:
    return TEXT_PREFIX + name[len(VLM_PREFIX):] if name.startswith(VLM_PREFIX) else name


def classify(name: str) -> str:
    """The role of a tensor (see `_ROLES`); 'unknown' when nothing matches exactly."""
    canon = canonical_name(name)
    for role, pattern in _ROLES:
        if pattern.fullmatch(canon):
            return role
    return "unknown"


@dataclass(frozen=True)
class Decision:
    """The plan for one tensor (a quantization unit: fused experts appear per expert and part)."""

    name: str                 # name in the source (checkpoint or model), per-expert for fused experts
    canonical: str            # `model.`-prefixed name used for matching
    shape: tuple[int, ...]
    role: str
    quantize: bool
    reason: str
    source: str               # the stored tensor it comes from (differs for fused experts)
    expert: int | None = None
    part: str | None = None   # gate_proj | up_proj | down_proj for experts
    group_size: int | None = None   # INT4 group when it is not the recipe's (Recipe.expert_group)

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "role": self.role,
               "quantize": self.quantize, "reason": self.reason, "source": self.source}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        return out


def expand_units(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], int | None, str | None]]:
    """A stored tensor -> its quantization units (name, shape, expert, part). Fused 3-D experts
    split into the official per-expert names; everything else is one unit."""
    if classify(name) != "experts_fused" or len(shape) != 3:
        return [(name, tuple(shape), None, None)]
    head, _, leaf = name.rpartition(".")
    experts, rows, cols = shape
    parts = [("gate_proj", rows // 2), ("up_proj", rows // 2)] if leaf == "gate_up_proj" else [("down_proj", rows)]
    return [(f"{head}.{e}.{part}.weight", (n, cols), e, part) for e in range(experts) for part, n in parts]


def _format(recipe: Recipe) -> str:
    if recipe.is_fp8:
        act = {"dynamic": "dynamic activations", "static": "static activation scale", "none": "weight-only"}
        return f"{recipe.scheme} ({act[recipe.activations]})"
    return recipe.label


def plan(tensors: Iterable[tuple[str, tuple[int, ...]]], recipe: Recipe) -> list[Decision]:
    """One Decision per quantization unit of `tensors` ((stored name, shape) pairs)."""
    family = "fp8" if recipe.is_fp8 else "int4"
    used_include, used_exclude = set(), set()
    out: list[Decision] = []
    for source, shape in tensors:
        for name, unit_shape, expert, part in expand_units(source, tuple(shape)):
            canon = canonical_name(name)
            role = "expert" if expert is not None else classify(name)
            hits_in = [g for g in recipe.include if fnmatch.fnmatchcase(canon, g) or fnmatch.fnmatchcase(name, g)]
            hits_ex = [g for g in recipe.exclude if fnmatch.fnmatchcase(canon, g) or fnmatch.fnmatchcase(name, g)]
            used_include.update(hits_in)
            used_exclude.update(hits_ex)
            quantize, reason = _decide(role, unit_shape, recipe, family, hits_in, hits_ex)
            group = None
            if quantize and role == "expert" and recipe.is_int4 and recipe.expert_groups == "fit" \
                    and recipe.expert_group(unit_shape) != recipe.group_size:
                group = recipe.expert_group(unit_shape)
                reason += f", g{group} (the layer's expert dims {sorted(unit_shape)} are not multiples of {recipe.group_size})"
            out.append(Decision(name, canon, unit_shape, role, quantize, reason, source, expert, part, group))
    unused = [g for g in recipe.include if g not in used_include] + [g for g in recipe.exclude if g not in used_exclude]
    if unused and recipe.strict_globs:
        raise QwenError(f"quantization glob(s) {unused} match no tensor name (names look like "
                        f"'model.layers.0.mlp.down_proj.weight')")
    return out


def _decide(role, shape, recipe: Recipe, family: str, hits_in, hits_ex) -> tuple[bool, str]:
    if hits_ex:
        return False, f"excluded by '{hits_ex[0]}'"
    if role not in LINEAR_ROLES or len(shape) != 2:
        return False, _KEEP_REASON.get(role, "not a linear weight")
    if hits_in:
        wanted, why = True, f"included by '{hits_in[0]}'"
    elif role in _DEFAULT[family]:
        wanted, why = True, _format(recipe)
    else:
        return False, _KEEP_REASON.get(role, "kept by default")
    if recipe.is_int4 and role == "expert" and recipe.expert_groups == "fit":
        if recipe.expert_group(shape) is None:
            return False, f"expert dims {list(shape)}: no power-of-two group >= 16 divides both: kept"
    elif recipe.is_int4 and shape[1] % recipe.group_size:
        return False, f"K={shape[1]} is not a multiple of group {recipe.group_size}: kept"
    return wanted, f"{why}: {_format(recipe)}" if hits_in else why


def plan_checkpoint(directory, recipe: Recipe) -> list[Decision]:
    """Decisions for every tensor of a checkpoint directory (shapes from the headers, no data read)."""
    from reference.checkpoint import Checkpoint

    ckpt = Checkpoint(directory)
    try:
        specs = [(name, tuple(ckpt.files[ckpt.location[name]].shape(name))) for name in ckpt.names()]
    finally:
        ckpt.close()
    return plan(sorted(specs), recipe)


def plan_model(model, recipe: Recipe) -> list[Decision]:
    """Decisions for a reference model's parameters (canonical `model.` names, fused experts)."""
    return plan([(name, tuple(p.shape)) for name, p in model.named_parameters(remove_duplicate=False)], recipe)   # tied lm_head listed
