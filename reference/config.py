"""Qwen3.5 / Qwen3-Next text config: parsing, validation and the official config.json schema.

Accepts the official nested VLM form (`text_config` inside `Qwen3_5ForConditionalGeneration`), flat
text-only exports, `layer_types` or `full_attention_interval`, `rope_parameters` (transformers 5)
or the older top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling` spellings, and the
Qwen3-Next keys (`norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`).
See `shared/notes/qwen35-architecture.md` §1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from reference.errors import CheckpointError

MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
_TEXT_TYPES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
LAYER_TYPES = ("linear_attention", "full_attention")

# integer keys and their least allowed value (validated with the key's name in the message)
_INT_KEYS = {
    "vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "linear_num_key_heads": 1, "linear_num_value_heads": 1,
    "linear_key_head_dim": 1, "linear_value_head_dim": 1, "linear_conv_kernel_dim": 1,
    "intermediate_size": 0, "num_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
    "shared_expert_intermediate_size": 0, "decoder_sparse_step": 1, "max_position_embeddings": 1,
    "mtp_num_hidden_layers": 0,
}
_BOOL_KEYS = ("attention_bias", "norm_topk_prob", "tie_word_embeddings")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, key: str, source: str) -> float:
    """A JSON number as float; anything else (a string, a bool, null) names the key."""
    if not _is_number(value):
        raise CheckpointError(f"{source}: key '{key}' must be a number, got {value!r}")
    return float(value)


@dataclass
class Qwen35Config:
    """The text-model hyper-parameters, with HF key names. Derived sizes are properties."""

    model_type: str = "qwen3_5"
    vocab_size: int = 248320
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    layer_types: list[str] = field(default_factory=list)
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    attention_bias: bool = False
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    intermediate_size: int = 3584
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True  # Qwen3.5-MoE always renormalises; Qwen3-Next honours the flag
    decoder_sparse_step: int = 1  # Qwen3-Next only
    mlp_only_layers: list[int] = field(default_factory=list)  # Qwen3-Next only
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] = field(default_factory=lambda: [11, 11, 10])
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = layer_types_from_interval(self.num_hidden_layers, 4)
        self.validate()

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        if not self.is_moe:
            return False
        if self.model_type != "qwen3_next":
            return True  # every Qwen3.5-MoE layer is MoE
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN causal conv: [q | k | v]."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_value_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- validation --------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def bad(key: str, why: str) -> CheckpointError:
            return CheckpointError(f"{source}: key '{key}' {why}")

        if self.model_type not in MODEL_TYPES:
            raise bad("model_type", f"is '{self.model_type}', expected one of {', '.join(MODEL_TYPES)}")
        for key, minimum in _INT_KEYS.items():
            value = getattr(self, key)
            if not _is_int(value) or value < minimum:
                kind = "a positive integer" if minimum == 1 else "a non-negative integer"
                raise bad(key, f"must be {kind}, got {value!r}")
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise bad(key, f"must be true or false, got {getattr(self, key)!r}")
        for key in ("rms_norm_eps", "rope_theta", "partial_rotary_factor"):
            value = getattr(self, key)
            if not _is_number(value) or not 0 < value < float("inf"):
                raise bad(key, f"must be a positive finite number, got {value!r}")
        if self.partial_rotary_factor > 1:
            raise bad("partial_rotary_factor", f"must be at most 1, got {self.partial_rotary_factor!r}")
        if not isinstance(self.layer_types, list) or not all(isinstance(t, str) for t in self.layer_types):
            raise bad("layer_types", f"must be a list of strings, got {self.layer_types!r}")
        for key in ("mlp_only_layers", "mrope_section"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
                raise bad(key, f"must be a list of non-negative integers, got {value!r}")
        eos = self.eos_token_id
        if not (eos is None or (_is_int(eos) and eos >= 0)
                or (isinstance(eos, list) and all(_is_int(v) and v >= 0 for v in eos))):
            raise bad("eos_token_id", f"must be a token id or a list of token ids, got {eos!r}")
        for key in ("bos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value >= 0):
                raise bad(key, f"must be a token id or null, got {value!r}")
        if not isinstance(self.hidden_act, str):
            raise bad("hidden_act", f"must be a string, got {self.hidden_act!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad("layer_types", f"has {len(self.layer_types)} entries, expected num_hidden_layers="
                      f"{self.num_hidden_layers}")
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            raise bad("layer_types", f"has unknown kinds {unknown}, expected {list(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"({self.num_key_value_heads}) must divide "
                      f"num_attention_heads ({self.num_attention_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise bad("linear_num_value_heads", f"({self.linear_num_value_heads}) must be a multiple of "
                      f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise bad("partial_rotary_factor", f"gives rotary dim {self.rotary_dim} for head_dim "
                      f"{self.head_dim}; expected an even number in (0, head_dim]")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"is '{self.hidden_act}', only 'silu' is supported")
        if self.is_moe:
            for key in ("num_experts_per_tok", "moe_intermediate_size"):
                if getattr(self, key) <= 0:
                    raise bad(key, "must be positive for an MoE model")
            if self.num_experts_per_tok > self.num_experts:
                raise bad("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds num_experts "
                          f"({self.num_experts})")
        elif self.model_type == "qwen3_5_moe":
            raise bad("num_experts", "must be positive for model_type 'qwen3_5_moe'")
        if (not self.is_moe or self.model_type == "qwen3_next") and self.intermediate_size <= 0:
            if not self.is_moe or any(not self.layer_is_moe(i) for i in range(self.num_hidden_layers)):
                raise bad("intermediate_size", "must be positive for dense MLP layers")

    # ---- official schema ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Qwen35Config":
        """Parse an HF config dict (nested VLM or flat). Unknown keys are ignored, like HF."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        top_type = raw.get("model_type")
        text = raw.get("text_config", raw)
        if not isinstance(text, dict):
            raise CheckpointError(f"{source}: key 'text_config' must be an object")
        model_type = text.get("model_type", top_type)
        model_type = _TEXT_TYPES.get(model_type, model_type)
        if top_type in MODEL_TYPES and model_type not in MODEL_TYPES:
            model_type = top_type
        if model_type is None:
            raise CheckpointError(f"{source}: key 'model_type' is missing")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{source}: unknown model_type '{model_type}', expected one of "
                                  f"{', '.join(MODEL_TYPES)} (or their _text variants)")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in text.items() if k in known}
        kwargs["model_type"] = model_type
        for key in ("hidden_size", "num_hidden_layers"):
            if key not in text:
                raise CheckpointError(f"{source}: required key '{key}' is missing")
        if "layer_types" not in text:
            interval = text.get("full_attention_interval", 4)
            try:
                kwargs["layer_types"] = layer_types_from_interval(text["num_hidden_layers"], interval)
            except CheckpointError as err:
                raise CheckpointError(f"{source}{str(err).removeprefix('config')}") from None
        kwargs.update(_rope_keys(text, source))
        # The VLM's top-level flag decides tying; tie when either level says so (see the notes'
        # "loader gotcha": untying the 0.8B head creates a random 254M-parameter lm_head).
        for level in (text, raw):
            if not isinstance(level.get("tie_word_embeddings", False), bool):
                raise CheckpointError(f"{source}: key 'tie_word_embeddings' must be true or false, "
                                      f"got {level['tie_word_embeddings']!r}")
        kwargs["tie_word_embeddings"] = text.get("tie_word_embeddings", False) or raw.get("tie_word_embeddings", False)
        if model_type == "qwen3_5_moe":
            kwargs["norm_topk_prob"] = True
            kwargs["mlp_only_layers"] = []
            kwargs["decoder_sparse_step"] = 1
        if text.get("mtp_num_hidden_layers") is None:
            kwargs.pop("mtp_num_hidden_layers", None)
        if "eos_token_id" not in text and "eos_token_id" in raw:
            kwargs["eos_token_id"] = raw["eos_token_id"]
        try:
            config = cls(**kwargs)
        except TypeError as err:
            raise CheckpointError(f"{source}: {err}") from None
        except CheckpointError as err:  # raised by __post_init__'s validation, which says "config"
            raise CheckpointError(f"{source}{str(err).removeprefix('config')}") from None
        config.validate(source)
        return config

    def to_hf_dict(self, layout: str = "vlm") -> dict[str, Any]:
        """The official config.json: nested VLM form (`layout='vlm'`) or flat text-only form."""
        text = asdict(self)
        rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                "partial_rotary_factor": text.pop("partial_rotary_factor")}
        mrope = text.pop("mrope_section")
        if self.model_type != "qwen3_next":
            rope.update(mrope_section=mrope, mrope_interleaved=True)
        text["rope_parameters"] = rope
        if self.model_type == "qwen3_5_moe":
            for key in ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "intermediate_size"):
                text.pop(key)
        elif self.model_type == "qwen3_5":
            for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                        "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                        "mlp_only_layers"):
                text.pop(key)
        text["dtype"] = "bfloat16"
        if self.model_type == "qwen3_next":
            text["architectures"] = ["Qwen3NextForCausalLM"]
            return text
        if layout == "text":
            text["architectures"] = ["Qwen3_5MoeForCausalLM" if self.is_moe else "Qwen3_5ForCausalLM"]
            text["model_type"] = f"{self.model_type}_text"
            return text
        text["model_type"] = f"{self.model_type}_text"
        arch = "Qwen3_5MoeForConditionalGeneration" if self.is_moe else "Qwen3_5ForConditionalGeneration"
        return {"architectures": [arch], "model_type": self.model_type, "text_config": text,
                "tie_word_embeddings": self.tie_word_embeddings}


def layer_types_from_interval(num_layers: int, interval: int) -> list[str]:
    """Layer i is full attention iff (i + 1) % interval == 0 (3 linear : 1 full for interval 4)."""
    if not _is_int(interval) or interval <= 0:
        raise CheckpointError(f"config: key 'full_attention_interval' must be a positive integer, "
                              f"got {interval!r}")
    if not _is_int(num_layers) or num_layers <= 0:
        raise CheckpointError(f"config: key 'num_hidden_layers' must be a positive integer, got {num_layers!r}")
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]


def _rope_keys(text: dict[str, Any], source: str) -> dict[str, Any]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: key 'rope_parameters' must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise CheckpointError(f"{source}: rope type '{rope_type}' is not supported (expected 'default')")
    out: dict[str, Any] = {}
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{source}: key 'rope_theta' is missing (HF would silently use 10000; "
                              f"Qwen3.5 uses 1e7)")
    out["rope_theta"] = _number(theta, "rope_theta", source)
    out["partial_rotary_factor"] = _number(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)),
                                           "partial_rotary_factor", source)
    if "mrope_section" in rope:
        out["mrope_section"] = rope["mrope_section"]
    return out


def load_config(path: str | Path) -> Qwen35Config:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: malformed JSON at line {err.lineno} column {err.colno}: "
                              f"{err.msg}") from None
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror})") from None
    return Qwen35Config.from_dict(raw, source=str(file))
