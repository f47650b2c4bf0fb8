"""The quantization recipe: one typed record of what a quantized model is (scheme, algorithm,
granularity, activation handling, group size, zero points, policy globs).

It is metadata (STYLE lesson 13): the quantize pass writes `Recipe.to_dict()` into the IR and the
artifact manifest, backends read it back with `Recipe.from_dict()`; nothing is inferred from paths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from qwen35c.errors import QwenError

__all__ = ["Recipe", "SCHEMES", "parse_scheme"]

Scheme = Literal["fp8-block128", "fp8-tensor", "fp8-channel", "int4"]
SCHEMES = ("fp8-block128", "fp8-tensor", "fp8-channel", "int4", "int4-rtn", "int4-awq", "int4-gptq")


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how. `scheme` is the format family; `algorithm` how INT4 codes are found."""

    scheme: Scheme = "fp8-block128"
    algorithm: Literal["rtn", "awq", "gptq"] = "rtn"     # FP8 is always RTN (data-free)
    # FP8: dynamic / static / none. INT4: none (fp32 activations: MatMulNBits accuracy_level 0) or
    # int8 (dynamic per token per weight group, symmetric amax/127: MatMulNBits accuracy_level 4)
    activations: Literal["dynamic", "static", "none", "int8"] = "dynamic"
    group_size: int = 128                                 # INT4 group along K
    symmetric: bool = True                                # INT4 zero point 8 (True) or per-group codes
    # symmetric INT4 scales: amax / 7 ("amax") or the signed least-squares scale searched per group
    # ("mse", formats.int4_group_params: the code range's -8 used, as llama.cpp's Q4_0 does)
    scales: Literal["amax", "mse"] = "amax"
    head_bits: int = 4                                    # the LM head's codes: INT4 or 8-bit (symmetric, amax/127)
    act_order: bool = False                               # GPTQ: columns by decreasing Hessian diagonal
    static_groups: bool = True                            # GPTQ act-order: groups fixed in original order (no g_idx)
    damp: float = 0.01                                    # GPTQ: damp * mean(diag H) added to the diagonal
    gptq_block: int = 128                                 # GPTQ: lazy-update block width
    awq_grid: int = 20                                    # AWQ: alpha in {0, 1/grid, ..., 1}
    awq_clip: bool = True                                 # AWQ: search a per-group clipping ratio too
    fp32_activations: tuple[str, ...] = ()               # INT4 int8 recipes: linears (globs) whose GEMM keeps fp32 x
    include: tuple[str, ...] = ()                         # globs over full tensor names: force quantize
    exclude: tuple[str, ...] = ()                         # globs: force high precision (wins over include)
    strict_globs: bool = True                             # a glob that matches no tensor is an error (a typo);
                                                          # False for a target's globs (a cut model may lack some)
    moe_calibration: Literal["all", "routed"] = "all"     # route every calibration token to every expert
    # a tied, quantized LM head: the embedding lookup keeps the full-precision table ("kept") or reads
    # the head's codes ("shared": one INT4 / 8-bit table for both, ORT GatherBlockQuantized + MatMulNBits)
    tied_embedding: Literal["kept", "shared"] = "kept"
    # INT4 routed experts whose hidden / moe_intermediate are not multiples of group_size: kept high
    # precision ("fixed") or quantized with the largest power-of-two group >= 16 dividing both ("fit";
    # one group per MoE layer, recorded per unit; a single-group format such as GPTQ's cannot hold it)
    expert_groups: Literal["fixed", "fit"] = "fixed"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.scheme not in ("fp8-block128", "fp8-tensor", "fp8-channel", "int4"):
            raise QwenError(f"unknown quantization scheme '{self.scheme}' (expected one of {', '.join(SCHEMES)})")
        if self.algorithm not in ("rtn", "awq", "gptq"):
            raise QwenError(f"unknown quantization algorithm '{self.algorithm}' (rtn, awq or gptq)")
        if self.is_fp8 and self.algorithm != "rtn":
            raise QwenError(f"{self.scheme}: FP8 is data-free round-to-nearest; algorithm must be rtn")
        if self.is_fp8 and self.scheme == "fp8-block128" and self.activations == "static":
            raise QwenError("fp8-block128 uses dynamic per-token 1x128 activation groups; "
                            "static activation scales exist for fp8-tensor and fp8-channel")
        if self.is_int4 and self.activations == "dynamic":     # the field's default is FP8's
            object.__setattr__(self, "activations", "none")
        if self.is_fp8 and self.activations == "int8":
            raise QwenError(f"{self.scheme}: activations=int8 is an INT4 option (FP8: dynamic, static or none)")
        if self.is_int4 and self.activations not in ("none", "int8"):
            raise QwenError(f"int4: activations must be none or int8, not '{self.activations}'")
        if self.is_int4 and self.activations == "int8" and self.algorithm == "awq":
            raise QwenError("int4-awq with activations=int8: not supported (the int8 rounding would follow "
                            "AWQ's pre_scale Mul; not validated against ORT yet)")
        if self.is_int4 and self.activations == "int8" and self.act_order and not self.static_groups:
            raise QwenError("int4 act-order with dynamic groups (g_idx) and activations=int8: not supported "
                            "(the lowering permutes K, so the int8 blocks would not be the emulated ones)")
        if self.tied_embedding not in ("kept", "shared"):
            raise QwenError(f"tied-embedding must be kept or shared, not '{self.tied_embedding}'")
        if self.tied_embedding == "shared" and not (self.is_int4 and self.symmetric and self.algorithm != "awq"
                                                     and not (self.act_order and not self.static_groups)):
            raise QwenError("tied-embedding=shared: the embedding gathers the head's codes as they are, so it "
                            "needs symmetric INT4 without AWQ's pre-scale or act-order's g_idx")
        if self.expert_groups not in ("fixed", "fit"):
            raise QwenError(f"expert-groups must be fixed or fit, not '{self.expert_groups}'")
        if self.scales not in ("amax", "mse"):
            raise QwenError(f"int4 scales must be amax or mse, not '{self.scales}'")
        if self.scales == "mse" and not (self.is_int4 and self.symmetric and self.algorithm != "awq"):
            raise QwenError("scales=mse is the symmetric INT4 scale search (AWQ searches its own clipping)")
        if self.head_bits not in (4, 8):
            raise QwenError(f"head-bits must be 4 or 8, not {self.head_bits}")
        if self.head_bits == 8 and not (self.is_int4 and self.symmetric and not (self.act_order and not self.static_groups)):
            raise QwenError("head-bits=8 is a symmetric INT4 recipe's option (without act-order's g_idx)")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise QwenError(f"group size {self.group_size}: must be a power of two >= 16 (MatMulNBits)")

    def expert_group(self, shape: tuple[int, ...]) -> int | None:
        """The INT4 group of a routed-expert unit [N, K] (gate/up: [I, H], down: [H, I], so both of the
        layer's dims): group_size when it divides both, else with expert_groups=fit the largest power of
        two >= 16 below it that does, else None (kept)."""
        g = self.group_size
        while g >= 16:
            if not (shape[0] % g or shape[1] % g):
                return g
            if self.expert_groups != "fit":
                return None
            g //= 2
        return None

    def unit_bits(self, name: str) -> int:
        """Code width of quantized unit `name` (canonical): 8 for the LM head with head_bits=8, else 4."""
        return self.head_bits if self.is_int4 and name == "lm_head.weight" else 4

    def int8_activations(self, name: str) -> bool:
        """Does the GEMM of quantized linear `name` (canonical) round its input to int8?"""
        import fnmatch

        return (self.is_int4 and self.activations == "int8"
                and not any(fnmatch.fnmatchcase(name, g) for g in self.fp32_activations))

    @property
    def is_fp8(self) -> bool:
        return self.scheme.startswith("fp8")

    @property
    def is_int4(self) -> bool:
        return self.scheme == "int4"

    @property
    def fp8_granularity(self) -> str:
        return {"fp8-block128": "block", "fp8-tensor": "tensor", "fp8-channel": "channel"}[self.scheme]

    @property
    def dynamic(self) -> bool:
        """Does the emulation fake-quantize activations at run time?"""
        return self.is_fp8 and self.activations == "dynamic"

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in ("awq", "gptq") or (self.is_fp8 and self.activations == "static")

    @property
    def label(self) -> str:
        if self.is_fp8:
            return self.scheme + ("" if self.activations == "dynamic" else f"-{self.activations}")
        return (f"int4-{self.algorithm}-g{self.group_size}{'' if self.symmetric else '-asym'}"
                f"{'-mse' if self.scales == 'mse' else ''}{'-h8' if self.head_bits == 8 else ''}"
                f"{'-a8' if self.activations == 'int8' else ''}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["fp32_activations"] = list(self.fp32_activations)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "Recipe":
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = set(raw) - known
        if unknown:
            raise QwenError(f"quantization recipe has unknown keys {sorted(unknown)}")
        raw = dict(raw)
        for key in ("include", "exclude", "fp32_activations"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


def parse_scheme(scheme: str, **options) -> Recipe:
    """`fp8-block128`, `fp8-tensor`, `fp8-channel`, `int4` or the shorthands `int4-rtn|awq|gptq`."""
    if scheme.startswith("int4-"):
        algorithm = scheme[len("int4-"):]
        if "algorithm" in options and options["algorithm"] != algorithm:
            raise QwenError(f"scheme '{scheme}' contradicts algorithm={options['algorithm']}")
        options = {**options, "algorithm": algorithm}
        scheme = "int4"
    if scheme == "fp8-tensor" and "activations" not in options:
        options = {**options, "activations": "static"}   # recipe A: calibrated per-tensor scale
    if scheme == "int4":
        options = {**options, "activations": options.get("activations", "none")}
    return Recipe(scheme=scheme, **options)
