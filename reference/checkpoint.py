"""Checkpoint format: official tensor names, layouts, loading and writing.

Loading accepts, and maps onto one set of parameters:
  * prefixes `model.language_model.` (official VLM) or `model.` (text-only export);
  * routed experts fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) or
    per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`);
  * Qwen3-Next's fused, per-key-head grouped `in_proj_qkvz` / `in_proj_ba` (a pure row permutation
    of Qwen3.5's separate projections, notes §2);
  * tied or untied `lm_head`, `mtp.*` (loaded when the config asks for it), `model.visual.*` skipped;
  * one `model.safetensors` or shards listed in `model.safetensors.index.json`. Never pickle.
Every problem raises `CheckpointError` naming the file, key or tensor and what was expected.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from reference.config import Qwen35Config, load_config
from reference.errors import CheckpointError
from reference.model import Qwen35ForCausalLM
from reference.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["Checkpoint", "WeightLoader", "load_model", "save_checkpoint", "make_random_checkpoint", "PRESETS",
           "checkpoint_tensor_specs"]

VLM_PREFIX, TEXT_PREFIX = "model.language_model.", "model."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_FINITE_CHECKED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)   # weights must be finite
_FINITE_CHUNK = 1 << 22   # elements per isfinite() slice: small temporaries, not a copy of the tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(_FINITE_CHUNK))


class Checkpoint:
    """The tensors of a checkpoint directory, by name, memory-mapped across shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.exists():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory (expected a checkpoint directory)")
        try:
            entries = sorted(p.name for p in self.directory.iterdir())
        except OSError as err:
            raise CheckpointError(f"{self.directory}: cannot read directory ({err.strerror})") from None
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: malformed index (expected a JSON object with 'weight_map')") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: key 'weight_map' must be an object of tensor name -> shard file")
            for tensor, shard in weight_map.items():
                if not _plain_file_name(shard):
                    raise CheckpointError(f"{index}: tensor '{tensor}' names shard {shard!r}; a shard must be a "
                                          f"plain .safetensors file name inside the checkpoint directory")
            shards = sorted(set(weight_map.values()))
        else:
            shards = [name for name in entries if name.endswith(".safetensors")]
        if not shards:
            pickles = [name for name in entries if name.endswith(_PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(f"{self.directory}: only pickle weights found ({', '.join(pickles)}); "
                                      f"qwen35c never loads pickle files, convert them to safetensors")
            raise CheckpointError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        for shard in shards:
            path = self.directory / shard
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing (or not a file)")
            self.files[shard] = SafetensorsFile(path)
            for name in self.files[shard].keys():
                self.location[name] = shard

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def file_of(self, name: str) -> Path:
        return self.directory / self.location[name]

    def view(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise CheckpointError(f"{self.directory}: missing tensor '{name}'")
        return self.files[self.location[name]].view(name)

    def release(self, name: str) -> None:
        self.files[self.location[name]].release(name)

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def _plain_file_name(name) -> bool:
    return (isinstance(name, str) and name.endswith(".safetensors") and "/" not in name and "\\" not in name
            and name not in (".", "..") and "\0" not in name)


# ---- name mapping ---------------------------------------------------------------------------------
def text_prefix(names: list[str]) -> str:
    return VLM_PREFIX if any(n.startswith(VLM_PREFIX) for n in names) else TEXT_PREFIX


def _source_name(param: str, prefix: str) -> str:
    """Our parameter name -> the checkpoint name in a layout with `prefix`."""
    return prefix + param[len("model."):] if param.startswith("model.") else param


class WeightLoader:
    """Resolves each model parameter from a checkpoint, whatever its layout."""

    def __init__(self, ckpt: Checkpoint, config: Qwen35Config):
        self.ckpt, self.config = ckpt, config
        self.prefix = text_prefix(ckpt.names())
        self.used: set[str] = set()     # checkpoint tensors read so far
        self.finite: set[str] = set()   # ... and found finite (checked once per loader)

    def unused(self) -> list[str]:
        """Checkpoint tensors no parameter was read from (vision and MTP tensors excepted)."""
        skip = ("model.visual.", "mtp.") if self.config.mtp_num_hidden_layers == 0 else ("model.visual.",)
        return sorted(n for n in self.ckpt.names() if n not in self.used and not n.startswith(skip)
                      and not (n == "lm_head.weight" and self.config.tie_word_embeddings))

    def tensor(self, param: str, shape: torch.Size) -> torch.Tensor:
        name = _source_name(param, self.prefix)
        if name in self.ckpt:
            return self._checked(name, self.ckpt.view(name), shape)
        head, _, leaf = name.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and head.endswith("experts"):
            return self._per_expert(head, leaf, shape)
        if leaf == "weight" and head.rpartition(".")[2] in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"):
            fused = self._from_qwen3_next(head, shape)
            if fused is not None:
                return fused
        raise CheckpointError(f"{self.ckpt.directory}: missing tensor '{name}' (expected shape {list(shape)})")

    def release(self, param: str) -> None:
        """Drop the mapped pages behind a parameter already copied (for an assembled one, e.g. a
        per-expert stack or a Qwen3-Next fused projection, the pages of every stored tensor it used;
        a later read of a shared fused tensor maps them again)."""
        name = _source_name(param, self.prefix)
        if name in self.ckpt:
            self.ckpt.release(name)
            return
        head, _, leaf = name.rpartition(".")
        for source in self._sources(head, leaf):
            self.ckpt.release(source)

    def _sources(self, head: str, leaf: str) -> list[str]:
        """The stored tensors a parameter is assembled from (per-expert or Qwen3-Next fused layouts)."""
        if leaf in ("gate_up_proj", "down_proj") and head.endswith("experts"):
            parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            return [f"{head}.{e}.{p}.weight" for e in range(self.config.num_experts) for p in parts
                    if f"{head}.{e}.{p}.weight" in self.ckpt]
        base, _, which = head.rpartition(".")
        fused = {"in_proj_qkv": "in_proj_qkvz", "in_proj_z": "in_proj_qkvz", "in_proj_a": "in_proj_ba",
                 "in_proj_b": "in_proj_ba"}.get(which)
        return [f"{base}.{fused}.weight"] if fused and f"{base}.{fused}.weight" in self.ckpt else []

    def _checked(self, name: str, tensor: torch.Tensor, shape) -> torch.Tensor:
        where = self.ckpt.file_of(name) if name in self.ckpt else self.ckpt.directory
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{where}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")
        if name not in self.finite and tensor.dtype in _FINITE_CHECKED:
            if not _all_finite(tensor):
                raise CheckpointError(f"{where}: tensor '{name}' holds NaN or infinite values")
            self.finite.add(name)
        self.used.add(name)
        return tensor

    def _per_expert(self, head: str, leaf: str, shape) -> torch.Tensor:
        experts = shape[0]
        parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
        rows = []
        for e in range(experts):
            names = [f"{head}.{e}.{p}.weight" for p in parts]
            missing = [n for n in names if n not in self.ckpt]
            if missing:
                raise CheckpointError(f"{self.ckpt.directory}: missing tensor '{head}.{leaf}' (fused) and "
                                      f"'{missing[0]}' (per-expert layout)")
            rows.append(torch.cat([self.ckpt.view(n) for n in names], dim=0))
            self.used.update(names)
        return self._checked(f"{head}.{leaf}", torch.stack(rows), shape)

    def _from_qwen3_next(self, head: str, shape) -> torch.Tensor | None:
        """Qwen3-Next groups rows per key head g: qkvz = [q_g | k_g | v_g (r heads) | z_g], ba = [b_g | a_g]."""
        base, _, which = head.rpartition(".")
        cfg = self.config
        nk, dk, dv, r = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                         cfg.linear_num_value_heads // cfg.linear_num_key_heads)
        if which in ("in_proj_qkv", "in_proj_z"):
            name = f"{base}.in_proj_qkvz.weight"
            if name not in self.ckpt:
                return None
            fused = self._checked(name, self.ckpt.view(name), (nk * (2 * dk + 2 * r * dv), cfg.hidden_size))
            q, k, v, z = fused.view(nk, 2 * dk + 2 * r * dv, -1).split([dk, dk, r * dv, r * dv], dim=1)
            flat = [t.reshape(-1, cfg.hidden_size) for t in (q, k, v, z)]
            out = torch.cat(flat[:3]) if which == "in_proj_qkv" else flat[3]
        else:
            name = f"{base}.in_proj_ba.weight"
            if name not in self.ckpt:
                return None
            fused = self._checked(name, self.ckpt.view(name), (2 * nk * r, cfg.hidden_size))
            b, a = fused.view(nk, 2 * r, -1).split([r, r], dim=1)
            out = (b if which == "in_proj_b" else a).reshape(-1, cfg.hidden_size)
        return self._checked(f"{head}.weight", out, shape)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               source: Checkpoint | None = None) -> Qwen35ForCausalLM:
    """Build the reference model from a checkpoint directory, tensor by tensor (peak ~ one copy of the
    weights in `dtype`). `model.load_notes` lists what was skipped or inferred.

    `source` replaces the directory's tensors with another Checkpoint-like view (names, view,
    release, close), e.g. one that dequantizes a quantized checkpoint on the fly. Without it a
    quantized checkpoint is refused: its packed codes are not weights."""
    directory = Path(path)
    config = load_config(directory)
    if source is None:
        method = quantization_method(directory)
        if method is not None:
            raise CheckpointError(f"{directory / 'config.json'}: a quantized checkpoint (quantization_config."
                                  f"quant_method='{method}'); the reference model takes full-precision weights "
                                  f"only, load it through a dequantizing source")
    ckpt = source if source is not None else Checkpoint(directory)
    try:
        notes = reconcile_config(config, ckpt)
        with torch.device("meta"):
            model = Qwen35ForCausalLM(config)
        loader = WeightLoader(ckpt, config)
        params = dict(model.named_parameters())  # shared (tied) parameters appear once
        for name, param in params.items():
            source = loader.tensor(name, param.shape)
            value = source.to(device=device, dtype=dtype, copy=True)
            _set_param(model, name, nn.Parameter(value, requires_grad=False))
            loader.release(name)
        unused = loader.unused()
        if unused:
            notes.append(f"{len(unused)} checkpoint tensors are not part of the model and were ignored: "
                         + ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        _rebuild_buffers(model, config, device)  # RoPE tables were built on the meta device
    finally:
        ckpt.close()
    model.eval()
    model.load_notes = notes
    model.source_dir = directory
    return model


def reconcile_config(config: Qwen35Config, ckpt) -> list[str]:
    """Adjust `config` to what the checkpoint holds (MTP present? lm_head tied?); returns the notes."""
    notes: list[str] = []
    names = ckpt.names()
    if config.mtp_num_hidden_layers and not any(n.startswith("mtp.") for n in names):
        notes.append("config asks for an MTP module but the checkpoint has no mtp.* tensors: MTP disabled")
        config.mtp_num_hidden_layers = 0
    if config.tie_word_embeddings and "lm_head.weight" in ckpt:
        notes.append("tie_word_embeddings is set and lm_head.weight is present: using the tied embedding")
    if not config.tie_word_embeddings and "lm_head.weight" not in ckpt:
        notes.append("lm_head.weight absent: tying lm_head to embed_tokens")
        config.tie_word_embeddings = True
    visual = sum(n.startswith("model.visual.") for n in names)
    if visual:
        notes.append(f"skipped {visual} vision tensors (model.visual.*): qwen35c compiles the text model")
    return notes


def quantization_method(directory: Path) -> str | None:
    """`quantization_config.quant_method` of a checkpoint's config.json (top level or text_config)."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    for level in (raw, raw.get("text_config") or {}):
        quant = level.get("quantization_config") if isinstance(level, dict) else None
        if isinstance(quant, dict):
            return str(quant.get("quant_method", "unknown"))
    return None


def _set_param(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner_name), leaf, value)


def _rebuild_buffers(model: nn.Module, config: Qwen35Config, device: str) -> None:
    from reference.model import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.register_buffer("inv_freq", RotaryEmbedding(config).inv_freq.to(device), persistent=False)


# ---- writing ----------------------------------------------------------------------------------
def checkpoint_tensor_specs(model: Qwen35ForCausalLM, layout: str = "vlm", experts: str = "fused",
                            dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(checkpoint name, our parameter name or a derived key, shape) for every tensor to write.

    Derived keys: 'per_expert:<param>:<e>:<part>' and 'qwen3_next:<param>:<qkvz|ba>'."""
    config = model.config
    prefix = VLM_PREFIX if layout == "vlm" and config.model_type != "qwen3_next" else TEXT_PREFIX
    next_layout = config.model_type == "qwen3_next"
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        target = _source_name(name, prefix)
        head, _, leaf = target.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and head.endswith("experts") and (experts == "per_expert" or next_layout):
            experts_n, rows, cols = param.shape
            parts = [("gate_proj", rows // 2), ("up_proj", rows // 2)] if leaf == "gate_up_proj" else [("down_proj", rows)]
            for e in range(experts_n):
                for part, n in parts:
                    yield f"{head}.{e}.{part}.weight", f"per_expert:{name}:{e}:{part}", (n, cols)
            continue
        if next_layout and head.rpartition(".")[2] in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"):
            which = head.rpartition(".")[2]
            base = head.rpartition(".")[0]
            if which == "in_proj_qkv":
                yield f"{base}.in_proj_qkvz.weight", f"qwen3_next:{name}:qkvz", (
                    config.conv_dim + config.linear_value_dim, config.hidden_size)
            elif which == "in_proj_b":
                yield f"{base}.in_proj_ba.weight", f"qwen3_next:{name}:ba", (
                    2 * config.linear_num_value_heads, config.hidden_size)
            continue
        yield target, name, tuple(param.shape)


def _derived_tensor(model: Qwen35ForCausalLM, key: str) -> torch.Tensor:
    params = dict(model.named_parameters())
    if not key.startswith(("per_expert:", "qwen3_next:")):
        return params[key]
    kind, name, *rest = key.split(":")
    if kind == "per_expert":
        e, part = int(rest[0]), rest[1]
        weight = params[name][e]
        half = weight.shape[0] // 2
        return {"gate_proj": weight[:half], "up_proj": weight[half:], "down_proj": weight}[part]
    cfg = model.config
    nk, dk, dv, r = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                     cfg.linear_num_value_heads // cfg.linear_num_key_heads)
    base = name.rsplit(".", 2)[0]
    if rest[0] == "qkvz":
        qkv, z = params[f"{base}.in_proj_qkv.weight"], params[f"{base}.in_proj_z.weight"]
        q, k, v = qkv.split([nk * dk, nk * dk, nk * r * dv])
        groups = [t.reshape(nk, -1, cfg.hidden_size) for t in (q, k, v, z)]
        return torch.cat(groups, dim=1).reshape(-1, cfg.hidden_size)
    b, a = params[f"{base}.in_proj_b.weight"], params[f"{base}.in_proj_a.weight"]
    return torch.cat([b.reshape(nk, r, -1), a.reshape(nk, r, -1)], dim=1).reshape(-1, cfg.hidden_size)


def save_checkpoint(model: Qwen35ForCausalLM, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                    layout: str = "vlm", experts: str = "fused", shard_bytes: int = 4 << 30) -> Path:
    """Write config.json and safetensors with official names (atomically: temp dir, then rename)."""
    model_specs = list(checkpoint_tensor_specs(model, layout, experts))
    produce = lambda key: _derived_tensor(model, key).detach().to(dtype)  # noqa: E731
    return _write_checkpoint(model.config, out_dir, model_specs, produce, dtype, layout, shard_bytes)


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `out_dir` to write into; on success it replaces `out_dir`
    (absent or an empty directory; the caller checks), on any exception it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(directory: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                 shard_bytes: int = 4 << 30) -> list[str]:
    """The tensors `specs` (name, dtype, shape), produced one at a time by `produce(name)`, as
    `model.safetensors` or, past `shard_bytes`, `model-0000i-of-0000n.safetensors` shards with the
    Hugging Face `model.safetensors.index.json`. Returns the file names written."""
    shards, current, size = [], [], 0
    for name, dtype, shape in specs:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape))
        size += nbytes
    shards.append(current)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        write_safetensors(directory / file, shard, produce, {"format": "pt"})
        weight_map.update({name: file for name, _, _ in shard})
    if len(files) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        files.append("model.safetensors.index.json")
    return files


def _write_checkpoint(config: Qwen35Config, out_dir: str | Path, specs, produce, dtype, layout,
                      shard_bytes: int = 4 << 30) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty")
    keys = {name: key for name, key, _ in specs}
    with staged_directory(out_dir) as tmp:
        write_shards(tmp, [(name, dtype, shape) for name, _, shape in specs], lambda name: produce(keys[name]),
                     shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(layout), indent=2) + "\n")
    return out_dir


# ---- presets and random checkpoints -----------------------------------------------------------------
_TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
             linear_value_head_dim=16, intermediate_size=128, rope_theta=10_000_000.0,
             partial_rotary_factor=0.25, tie_word_embeddings=False, mtp_num_hidden_layers=1, eos_token_id=2)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)

PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="qwen3_5", **_TINY),
    "tiny-moe": dict(model_type="qwen3_5_moe", **{**_TINY, "intermediate_size": 0}, **_MOE),
    "tiny-next": dict(model_type="qwen3_next", **{**_TINY, "mtp_num_hidden_layers": 0}, **_MOE,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    # Real sizes from notes/qwen35-architecture.md §1 (0.8B and 35B-A3B firm; 4B/9B/27B medium confidence)
    "0.8b": dict(model_type="qwen3_5", hidden_size=1024, num_hidden_layers=24, num_attention_heads=8,
                 num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=16,
                 intermediate_size=3584, tie_word_embeddings=True, mtp_num_hidden_layers=1, eos_token_id=248046),
    "4b": dict(model_type="qwen3_5", hidden_size=2560, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=32,
               intermediate_size=9216, tie_word_embeddings=True, mtp_num_hidden_layers=1, eos_token_id=248046),
    "9b": dict(model_type="qwen3_5", hidden_size=4096, num_hidden_layers=32, num_attention_heads=16,
               num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=32,
               intermediate_size=12288, tie_word_embeddings=False, mtp_num_hidden_layers=1, eos_token_id=248046),
    "27b": dict(model_type="qwen3_5", hidden_size=5120, num_hidden_layers=64, num_attention_heads=24,
                num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=48,
                intermediate_size=17408, tie_word_embeddings=False, mtp_num_hidden_layers=1, eos_token_id=248046),
    "35b-a3b": dict(model_type="qwen3_5_moe", hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                    num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=32,
                    intermediate_size=0, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                    shared_expert_intermediate_size=512, tie_word_embeddings=False, mtp_num_hidden_layers=1,
                    eos_token_id=248044),
}


def preset_config(preset: str, **overrides) -> Qwen35Config:
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset '{preset}', expected one of {', '.join(PRESETS)}")
    return Qwen35Config(**{**PRESETS[preset], **overrides})


def make_random_checkpoint(preset: str | Qwen35Config, seed: int, out_dir: str | Path, layout: str = "vlm",
                           experts: str = "fused", dtype: torch.dtype = torch.bfloat16, std: float = 0.02,
                           **overrides) -> Path:
    """A random checkpoint in the official layout, generated tensor by tensor (bounded memory).

    Each tensor's values depend only on (seed, tensor name), so layouts are interchangeable."""
    config = preset if isinstance(preset, Qwen35Config) else preset_config(preset, **overrides)
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    specs = list(checkpoint_tensor_specs(model, layout, experts))
    params = dict(model.named_parameters())

    @functools.lru_cache(maxsize=4)  # why: per-expert slices of one stacked tensor reuse it
    def value(name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        shape = params[name].shape
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("linear_attn.norm.weight"):
            return 1.0 + 0.1 * torch.randn(shape, generator=generator)
        if leaf == "dt_bias":
            return 1.0 + 0.1 * torch.randn(shape, generator=generator)
        if leaf == "A_log":
            return torch.empty(shape).uniform_(1.0, 16.0, generator=generator).log()
        if "norm" in name:  # zero-centred: small values around 0
            return 0.1 * torch.randn(shape, generator=generator)
        return std * torch.randn(shape, generator=generator)

    class _Params:  # a model-like view whose parameters are generated on demand
        def __init__(self):
            self.config = config

        def named_parameters(self):
            return ((n, value(n)) for n in params if not (n == "lm_head.weight" and config.tie_word_embeddings))

    def produce(key: str) -> torch.Tensor:
        if key.startswith("per_expert:"):
            _, name, e, part = key.split(":")
            weight = value(name)[int(e)]
            half = weight.shape[0] // 2
            out = {"gate_proj": weight[:half], "up_proj": weight[half:], "down_proj": weight}[part]
        elif key.startswith("qwen3_next:"):
            base = key.split(":")[1].rsplit(".", 2)[0]
            needed = {f"{base}.{p}.weight": value(f"{base}.{p}.weight")
                      for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")}
            fake = _Params()
            fake.named_parameters = lambda: iter(needed.items())
            out = _derived_tensor(fake, key)
        else:
            out = value(key)
        return out.to(dtype)

    return _write_checkpoint(config, out_dir, specs, produce, dtype, layout)
