"""Quantized checkpoints on disk: export and import of the official Qwen FP8 format and GPTQ / AWQ INT4.

Formats (notes/quantization.md §1.2-1.3, §3.2):
  hf-fp8   `quantization_config = {quant_method: "fp8", fmt: "e4m3", activation_scheme: "dynamic",
           weight_block_size: [128, 128], modules_to_not_convert: [exact module paths]}`; each quantized
           linear has `weight` float8_e4m3fn [N, K] and `weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)]
           (multiplied). Routed experts are written unfused per expert (`mlp.experts.{e}.{part}.weight`)
           as in the official Qwen3.5 FP8 releases.
  gptq     `qweight` int32 [K/8, N] packed along K (nibble i of word r = row 8r+i), `qzeros` int32
           [K/g, N/8] packed along N, `scales` fp16 [K/g, N], `g_idx` int32 [K]. v1
           (`checkpoint_format: "gptq"`) stores zero-1, v2 ("gptq_v2") the zero itself. Qwen's own
           GPTQ-Int4 release stores v2 zeros while declaring "gptq" (vllm PR #38966), so for symmetric
           checkpoints the convention is read from the data (all stored zeros 7 -> v1, 8 -> v2).
  awq      AutoAWQ GEMM: `qweight` int32 [K, N/8] packed along N in the interleaved order
           [0, 2, 4, 6, 1, 3, 5, 7], `qzeros` int32 [K/g, N/8] same packing, `scales` fp16 [K/g, N].
Imports produce a `QuantizedModel` with `imported=True` (never re-quantized) holding the codes in
the internal layout (formats.py); `load_emulated_model` builds the quantization-emulating reference
from such a directory. Every inconsistency (an FP8 weight without its scale, a module listed in
`modules_to_not_convert` that is FP8, an unsupported bit width or method) raises `QwenError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from qwen35c.errors import QwenError
from qwen35c.quant.formats import FP8_BLOCK, Fp8Weight, Int4Weight, fp8_quantize, int4_pack_codes
from qwen35c.quant.model import QuantizedModel
from qwen35c.quant.policy import Decision, canonical_name, classify, plan
from qwen35c.quant.recipe import Recipe, parse_scheme

__all__ = ["export_hf_fp8", "write_quantized", "write_quantized_files", "import_quantized", "load_emulated_model",
           "gptq_pack", "gptq_unpack", "awq_pack", "awq_unpack"]

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble i of a word holds column _AWQ_ORDER[i]
_AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)        # column c lives in nibble _AWQ_REVERSE[c]


# ---- int32 nibble packing -------------------------------------------------------------------------
def _pack_int32(codes: Tensor, dim: int, order=tuple(range(8))) -> Tensor:
    """Pack 4-bit codes (0..15) eight per int32 along `dim`; nibble i holds element order[i]."""
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], -1, 8)[..., list(order)]
    words = torch.zeros(c.shape[:-1], dtype=torch.int64)
    for i in range(8):
        words |= c[..., i] << (4 * i)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)   # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def _unpack_int32(words: Tensor, dim: int, order=tuple(range(8))) -> Tensor:
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    nibbles = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)      # [..., n, 8]
    inverse = [order.index(c) for c in range(8)]
    out = nibbles[..., inverse].reshape(*w.shape[:-1], -1)
    return out.to(torch.uint8).movedim(-1, dim).contiguous()


def gptq_pack(q: Int4Weight, version: int = 2) -> dict[str, Tensor]:
    """Internal INT4 -> GPTQ tensors (v1: stored zero = zero - 1)."""
    if q.pre_scale is not None:
        raise QwenError("GPTQ format has no explicit input scale; this INT4 weight carries AWQ's pre_scale")
    codes = q.codes()                                                   # [N, K]
    n, k = codes.shape
    groups = k // q.group_size
    zeros = q.zeros.to(torch.int64) if q.zeros is not None else torch.full((n, groups), 8, dtype=torch.int64)
    stored = zeros - (1 if version == 1 else 0)
    if version == 1 and bool((stored < 0).any()):
        raise QwenError("GPTQ v1 cannot store a zero point of 0 (it stores zero-1); use v2")
    g_idx = q.g_idx if q.g_idx is not None else (torch.arange(k) // q.group_size).to(torch.int32)
    return {"qweight": _pack_int32(codes.t(), 0),
            "qzeros": _pack_int32(stored.t(), 1),
            "scales": q.scales.t().to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous()}


def gptq_unpack(tensors: dict[str, Tensor], group_size: int, version: int, symmetric: bool) -> Int4Weight:
    codes = _unpack_int32(tensors["qweight"], 0).t()                    # [N, K]
    zeros = _unpack_int32(tensors["qzeros"], 1).t().to(torch.int64)    # [N, G]
    zeros = zeros + (1 if version == 1 else 0)
    if bool((zeros > 15).any()):
        raise QwenError("GPTQ zero point above 15 after the v1 +1: the checkpoint is v2 (set checkpoint_format)")
    n, k = codes.shape
    g_idx = tensors.get("g_idx")
    trivial = g_idx is None or bool((g_idx.long() == torch.arange(k) // group_size).all())
    sym8 = bool((zeros == 8).all())
    return Int4Weight(int4_pack_codes(codes), tensors["scales"].t().float().contiguous(),
                      None if sym8 else zeros.to(torch.uint8).contiguous(),
                      group_size, None if trivial else g_idx.to(torch.int32))


def awq_pack(q: Int4Weight) -> dict[str, Tensor]:
    if q.g_idx is not None or q.pre_scale is not None:
        raise QwenError("AutoAWQ format has no g_idx and no explicit input scale; this INT4 weight has one "
                        "(write GPTQ format, or quantize AWQ with folded scales)")
    codes = q.codes()
    n, k = codes.shape
    zeros = q.zeros.to(torch.int64) if q.zeros is not None else torch.full((n, k // q.group_size), 8)
    return {"qweight": _pack_int32(codes.t(), 1, _AWQ_ORDER), "qzeros": _pack_int32(zeros.t(), 1, _AWQ_ORDER),
            "scales": q.scales.t().to(torch.float16).contiguous()}


def awq_unpack(tensors: dict[str, Tensor], group_size: int) -> Int4Weight:
    codes = _unpack_int32(tensors["qweight"], 1, _AWQ_ORDER).t()        # [N, K]
    zeros = _unpack_int32(tensors["qzeros"], 1, _AWQ_ORDER).t()         # [N, G]
    sym8 = bool((zeros == 8).all())
    return Int4Weight(int4_pack_codes(codes), tensors["scales"].t().float().contiguous(),
                      None if sym8 else zeros.contiguous(), group_size)


# ---- export -----------------------------------------------------------------------------------------
def _read_source(source_dir: Path):
    from reference.checkpoint import Checkpoint

    ckpt = Checkpoint(source_dir)
    raw = json.loads((source_dir / "config.json").read_text())
    if "quantization_config" in raw:
        raise QwenError(f"{source_dir}: already quantized ({raw['quantization_config'].get('quant_method')}); "
                        f"an imported checkpoint is never re-quantized")
    return ckpt, raw


def _unit_tensor(ckpt, d: Decision) -> Tensor:
    t = ckpt.view(d.source)
    if d.expert is None:
        return t
    t = t[d.expert]
    if d.part == "down_proj":
        return t
    half = t.shape[0] // 2
    return t[:half] if d.part == "gate_proj" else t[half:]


def write_quantized(source_dir, out_dir, recipe: Recipe, fmt: str = "hf-fp8",
                    quantized: QuantizedModel | None = None, gptq_version: int = 2) -> Path:
    """`write_quantized_files` into a fresh `out_dir` (absent or empty), atomically: temp dir + rename."""
    from reference.checkpoint import staged_directory

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise QwenError(f"{out_dir}: exists and is not empty")
    with staged_directory(out_dir) as tmp:
        write_quantized_files(source_dir, tmp, recipe, fmt, quantized, gptq_version)
    return out_dir


def write_quantized_files(source_dir, directory, recipe: Recipe, fmt: str = "hf-fp8",
                          quantized: QuantizedModel | None = None, gptq_version: int = 2,
                          shard_bytes: int = 4 << 30) -> list[str]:
    """Write `source_dir`'s checkpoint quantized into the empty `directory`: units the plan selects
    come from `quantized` (canonical names) or, for data-free FP8 without it, are quantized on the
    fly, one tensor at a time (peak memory: one tensor). Other tensors are copied bit for bit.
    Safetensors shards of at most `shard_bytes` (+ index), config.json with `quantization_config`,
    the tokenizer files. Returns the file names written."""
    from reference.checkpoint import write_shards

    source_dir, directory = Path(source_dir), Path(directory)
    if fmt not in ("hf-fp8", "gptq", "awq"):
        raise QwenError(f"unknown quantized checkpoint format '{fmt}' (hf-fp8, gptq or awq)")
    if fmt == "hf-fp8" and (recipe.scheme != "fp8-block128" or recipe.activations != "dynamic"):
        raise QwenError(f"the official FP8 format is fp8-block128 with dynamic activations, not {recipe.label}")
    if fmt != "hf-fp8" and (not recipe.is_int4 or quantized is None):
        raise QwenError(f"{fmt} export needs an INT4 QuantizedModel")
    ckpt, raw = _read_source(source_dir)
    try:
        shapes = {n: tuple(ckpt.files[ckpt.location[n]].shape(n)) for n in ckpt.names()}
        dtypes = {n: ckpt.files[ckpt.location[n]].dtype(n) for n in ckpt.names()}
        decisions = plan(sorted(shapes.items()), recipe)
        by_source: dict[str, list[Decision]] = {}
        for d in decisions:
            by_source.setdefault(d.source, []).append(d)
        specs, producers, not_converted, converted = [], {}, [], []
        for source in sorted(shapes):
            units = by_source.get(source, [])
            if not any(u.quantize for u in units):
                specs.append((source, dtypes[source], shapes[source]))
                producers[source] = (lambda s=source: ckpt.view(s))
                not_converted += [source[: -len(".weight")]] if source.endswith(".weight") else []
                continue
            for d in units:
                if not d.quantize:
                    name = d.name
                    specs.append((name, dtypes[source], d.shape))
                    producers[name] = (lambda d=d: _unit_tensor(ckpt, d).contiguous())
                    not_converted.append(name[: -len(".weight")])
                    continue
                converted.append(d.name[: -len(".weight")])
                for suffix, dtype, shape, fn in _unit_outputs(d, fmt, ckpt, quantized, gptq_version):
                    name = d.name[: -len("weight")] + suffix
                    specs.append((name, dtype, shape))
                    producers[name] = fn
        config = dict(raw)
        if not any(n == "lm_head.weight" for n in shapes) or "lm_head" in not_converted:
            not_converted = sorted(set(not_converted) | {"lm_head"})
        config["quantization_config"] = _quant_config(recipe, fmt, sorted(set(not_converted)), sorted(converted),
                                                      gptq_version)
        files = write_shards(directory, specs, lambda name: producers[name](), shard_bytes)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files.append("config.json")
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
            if (source_dir / extra).is_file():
                shutil.copyfile(source_dir / extra, directory / extra)
                files.append(extra)
    finally:
        ckpt.close()
    return files


def _unit_outputs(d: Decision, fmt: str, ckpt, quantized: QuantizedModel | None, gptq_version: int):
    """(suffix, dtype, shape, producer) for the tensors of one quantized unit."""
    n, k = d.shape

    def packed():
        if quantized is not None:
            if d.canonical not in quantized.weights:
                raise QwenError(f"{d.canonical}: planned for quantization but absent from the quantized model")
            return quantized.weights[d.canonical]
        return fp8_quantize(_unit_tensor(ckpt, d), "block")

    if fmt == "hf-fp8":
        nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
        return [("weight", torch.float8_e4m3fn, (n, k), lambda: packed().weight.contiguous()),
                ("weight_scale_inv", torch.float32, (nb, kb), lambda: packed().scale.float().contiguous())]
    q = packed()
    if not isinstance(q, Int4Weight):
        raise QwenError(f"{d.canonical}: {fmt} export needs INT4 weights")
    tensors = gptq_pack(q, gptq_version) if fmt == "gptq" else awq_pack(q)
    return [(suffix, t.dtype, tuple(t.shape), (lambda t=t: t)) for suffix, t in tensors.items()]


def _quant_config(recipe: Recipe, fmt: str, not_converted: list[str], converted: list[str], gptq_version: int) -> dict:
    """`quantization_config` as vLLM's loaders read it (vllm/model_executor/layers/quantization/:
    fp8.py `Fp8Config.from_config`, gptq.py / gptq_marlin.py `from_config` with `lm_head` and
    `modules_in_block_to_quantize`, awq.py `AWQConfig.from_config` with `modules_to_not_convert`)."""
    if fmt == "hf-fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "modules_to_not_convert": not_converted}
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": recipe.group_size, "sym": recipe.symmetric,
                "desc_act": recipe.act_order and not recipe.static_groups, "static_groups": recipe.static_groups,
                "checkpoint_format": "gptq" if gptq_version == 1 else "gptq_v2",
                "lm_head": "lm_head" not in not_converted, "modules_in_block_to_quantize": converted,
                "modules_to_not_convert": not_converted, "qwen35c_recipe": recipe.to_dict()}
    return {"quant_method": "awq", "bits": 4, "group_size": recipe.group_size, "zero_point": not recipe.symmetric,
            "version": "gemm", "lm_head": "lm_head" not in not_converted, "modules_to_not_convert": not_converted,
            "qwen35c_recipe": recipe.to_dict()}


def export_hf_fp8(source_dir, out_dir, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Path:
    """The official Qwen FP8 checkpoint (block 128x128, dynamic activations) of a bf16 checkpoint."""
    recipe = parse_scheme("fp8-block128", include=tuple(include), exclude=tuple(exclude))
    return write_quantized(source_dir, out_dir, recipe, "hf-fp8")


# ---- import -----------------------------------------------------------------------------------------
def import_quantized(directory) -> tuple[QuantizedModel, dict]:
    """Read a quantized checkpoint's quantized units (codes exactly as stored, repacked to the
    internal layout). Returns (QuantizedModel with imported=True, the raw quantization_config)."""
    from reference.checkpoint import Checkpoint

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        raise QwenError(f"{directory}: config.json has no quantization_config (not a quantized checkpoint)")
    method = qc.get("quant_method")
    ckpt = Checkpoint(directory)
    try:
        if method == "fp8":
            return _import_fp8(directory, ckpt, qc), qc
        if method in ("gptq", "awq"):
            return _import_int4(directory, ckpt, qc, method), qc
        raise QwenError(f"{directory}: quant_method '{method}' is not supported (fp8, gptq, awq)")
    finally:
        ckpt.close()


def _modules_not_converted(directory: Path, qc: dict) -> set[str]:
    listed = qc.get("modules_to_not_convert") or []
    if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
        raise QwenError(f"{directory}: modules_to_not_convert must be a list of module names")
    return set(listed)


def _import_fp8(directory: Path, ckpt, qc: dict) -> QuantizedModel:
    fmt, act, block = qc.get("fmt", "e4m3"), qc.get("activation_scheme", "dynamic"), qc.get("weight_block_size")
    if fmt != "e4m3":
        raise QwenError(f"{directory}: FP8 fmt '{fmt}' is not supported (e4m3)")
    if act != "dynamic":
        raise QwenError(f"{directory}: FP8 activation_scheme '{act}' is not supported (dynamic)")
    if block is None or [int(b) for b in block] != [FP8_BLOCK, FP8_BLOCK]:
        raise QwenError(f"{directory}: weight_block_size {block} is not supported ([128, 128])")
    skip = _modules_not_converted(directory, qc)
    names = set(ckpt.names())
    weights, notes, decisions = {}, [], []
    for name in sorted(names):
        dtype = ckpt.files[ckpt.location[name]].dtype(name)
        module = name.rpartition(".")[0]
        if name.endswith(".weight_scale_inv"):
            if f"{module}.weight" not in names:
                raise QwenError(f"{directory}: '{name}' has no '{module}.weight' beside it")
            continue
        if name.endswith((".activation_scale", ".input_scale")):
            notes.append(f"ignored {name} (dynamic activations)")
            continue
        shape = tuple(ckpt.files[ckpt.location[name]].shape(name))
        if dtype != torch.float8_e4m3fn:
            decisions.append(Decision(name, canonical_name(name), shape, classify(name), False,
                                      "stored high precision", name))
            continue
        if module in skip:
            raise QwenError(f"{directory}: '{name}' is FP8 but '{module}' is listed in modules_to_not_convert")
        scale_name = f"{module}.weight_scale_inv"
        if scale_name not in names:
            raise QwenError(f"{directory}: FP8 weight '{name}' has no '{scale_name}' (refusing to read FP8 "
                            f"codes without their scale)")
        scale = ckpt.view(scale_name).float().clone()
        n, k = shape
        expected = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        if tuple(scale.shape) != expected:
            raise QwenError(f"{directory}: '{scale_name}' has shape {list(scale.shape)}, expected {list(expected)}")
        weights[canonical_name(name)] = Fp8Weight(ckpt.view(name).clone(), scale, "block", "dynamic")
        decisions.append(Decision(name, canonical_name(name), shape, classify(name), True, "imported hf-fp8", name))
    return QuantizedModel(parse_scheme("fp8-block128"), weights, decisions, notes, imported=True,
                          source_format="hf-fp8")


def _import_int4(directory: Path, ckpt, qc: dict, method: str) -> QuantizedModel:
    if int(qc.get("bits", 4)) != 4:
        raise QwenError(f"{directory}: {method} with {qc.get('bits')} bits is not supported (4)")
    group = int(qc.get("group_size", 128))
    if group <= 0:
        raise QwenError(f"{directory}: group_size {group} (per-channel INT4) is not supported")
    names = set(ckpt.names())
    modules = sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))
    weights, notes, decisions = {}, [], []
    declared = 1 if qc.get("checkpoint_format", "gptq") == "gptq" else 2
    symmetric = bool(qc.get("sym", True)) if method == "gptq" else not bool(qc.get("zero_point", True))
    versions = set()
    for module in modules:
        tensors = {leaf: ckpt.view(f"{module}.{leaf}").clone()
                   for leaf in ("qweight", "qzeros", "scales", "g_idx") if f"{module}.{leaf}" in names}
        missing = {"qweight", "qzeros", "scales"} - set(tensors)
        if missing:
            raise QwenError(f"{directory}: '{module}' lacks {sorted(missing)}")
        if method == "awq":
            q = awq_unpack(tensors, group)
        else:
            version = declared
            stored = _unpack_int32(tensors["qzeros"], 1)
            if symmetric and bool((stored == 7).all()):
                version = 1
            elif symmetric and bool((stored == 8).all()):
                version = 2
            if version != declared:
                notes.append(f"{module}: zero points are GPTQ v{version} although checkpoint_format says "
                             f"v{declared}; read as v{version}")
            versions.add(version)
            q = gptq_unpack(tensors, group, version, symmetric)
        name = f"{module}.weight"
        weights[canonical_name(name)] = q
        decisions.append(Decision(name, canonical_name(name), q.shape, classify(name), True, f"imported {method}", name))
    recipe = parse_scheme(f"int4-{method}", group_size=group, symmetric=symmetric)
    fmt = "awq" if method == "awq" else f"gptq-v{max(versions) if versions else declared}"
    return QuantizedModel(recipe, weights, decisions, notes, imported=True, source_format=fmt)


class _DequantizedView:
    """A `reference.checkpoint.Checkpoint` look-alike whose quantized weights read dequantized."""

    def __init__(self, ckpt, quantized: QuantizedModel):
        self.ckpt, self.directory = ckpt, ckpt.directory
        self.synth = dict(quantized.weights)
        prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in ckpt.names()) else "model."
        self.prefix = prefix
        self._names = [n for n in ckpt.names() if not n.endswith((".weight_scale_inv", ".qweight", ".qzeros",
                                                                    ".scales", ".g_idx", ".activation_scale",
                                                                    ".input_scale"))
                       and canonical_name(n) not in quantized.weights]
        self._names += [self._stored(c) for c in quantized.weights]
        self._set = set(self._names)

    def _stored(self, canon: str) -> str:
        return self.prefix + canon[len("model."):] if canon.startswith("model.") else canon

    def names(self):
        return list(self._names)

    def __contains__(self, name):
        return name in self._set

    def release(self, name):
        if canonical_name(name) not in self.synth:
            self.ckpt.release(name)

    def view(self, name):
        canon = canonical_name(name)
        if canon in self.synth:
            return self.synth[canon].effective_weight()
        return self.ckpt.view(name)

    def file_of(self, name):
        return self.directory / "model.safetensors"

    def close(self):
        self.ckpt.close()


def load_emulated_model(directory, dtype: torch.dtype = torch.float32):
    """The quantization-emulating reference of a quantized checkpoint directory: the reference model
    with dequantized weights and (FP8) fake-quantized activations. Returns (model, QuantizedModel)."""
    from reference.checkpoint import Checkpoint, load_model

    from qwen35c.quant.model import emulate

    directory = Path(directory)
    quantized, _ = import_quantized(directory)
    model = load_model(directory, dtype, source=_DequantizedView(Checkpoint(directory), quantized))
    return emulate(model, quantized, inplace=True), quantized
