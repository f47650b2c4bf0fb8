"""`qwen35c export`: a checkpoint or artifact in the format a serving stack loads.

Formats (`FORMATS`):
  hf-fp8    a Hugging Face checkpoint of MODEL in the official Qwen FP8 layout (block-128 E4M3
            `weight` + fp32 `weight_scale_inv`, `quantization_config.quant_method = "fp8"`): what
            vLLM, SGLang and TensorRT-LLM load for FP8. Data-free: one tensor resident at a time.
  hf-gptq   the same with GPTQ INT4 tensors (`qweight` / `qzeros` / `scales` / `g_idx`,
            `checkpoint_format: gptq_v2`), quantized with a GPTQ recipe (calibrated, layer by layer).
  hf-awq    AutoAWQ's GEMM layout (`version: gemm`, zero points). AutoAWQ folds its activation scales
            into the previous op; qwen35c's `int4-awq` keeps them explicit (`Int4Weight.pre_scale`),
            which the format cannot hold, so hf-awq is written from an RTN or GPTQ recipe (default
            `int4-rtn symmetric=false`) and refuses `int4-awq`.
The codes are exactly the ones a qwen35c build of the same recipe packs (`quant.build.prepare`), and
import back bit for bit (`quant.checkpoint.import_quantized`).

Every export is written like an artifact (`artifact.atomic_directory`: a temporary sibling under a lock,
renamed into place; `--force` replaces only an empty directory or an earlier qwen35c export). Its
`qwen35c-export.json` records the format, the source's file hashes, the recipe with its calibration
record and the sha256 and size of every file; `is_export` is what `--force` checks before replacing.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen35c.errors import QwenError

EXPORT_MANIFEST = "qwen35c-export.json"
# format -> (checkpoint writer's name, default recipe)
FORMATS = {
    "hf-fp8": ("hf-fp8", "fp8-block128"),
    "hf-gptq": ("gptq", "int4-gptq group-size=128"),
    "hf-awq": ("awq", "int4-rtn group-size=128 symmetric=false"),
}


def is_export(directory: Path) -> bool:
    """True for a directory holding a readable export manifest and exactly the files it lists (not hashed)."""
    from qwen35c.artifact import _walk

    try:
        file = directory / EXPORT_MANIFEST
        if file.is_symlink() or not file.is_file() or file.stat().st_size > 64 << 20:
            return False
        manifest = json.loads(file.read_text())
        return (isinstance(manifest, dict) and manifest.get("format") in FORMATS
                and isinstance(manifest.get("files"), dict)
                and set(_walk(directory)) == set(manifest["files"]) | {EXPORT_MANIFEST})
    except (OSError, ValueError, QwenError):
        return False


OUTPUT = (is_export, "a qwen35c export (a valid qwen35c-export.json and only the files it lists)")


def recipe_of(fmt: str, quantize: str | None):
    """The recipe of an export: `quantize` ("SCHEME [option=value ...]") or the format's default."""
    from qwen35c.passes.manager import parse_pipeline

    text = quantize or FORMATS[fmt][1]
    if not text.startswith("scheme="):
        text = "scheme=" + text
    recipe = parse_pipeline(f"quantize{{{text}}}")[0].options.recipe()
    if fmt == "hf-fp8" and (recipe.scheme != "fp8-block128" or recipe.activations != "dynamic"):
        raise QwenError(f"--format hf-fp8 is the official block-128 FP8 layout with dynamic activations; "
                        f"--quantize '{quantize}' is {recipe.label}")
    if fmt != "hf-fp8" and not recipe.is_int4:
        raise QwenError(f"--format {fmt} holds INT4 weights; --quantize '{quantize}' is {recipe.label}")
    if fmt != "hf-fp8" and recipe.activations != "none":
        raise QwenError(f"--format {fmt} has no activation quantization; drop activations={recipe.activations}")
    if fmt == "hf-awq" and recipe.algorithm == "awq":
        raise QwenError("--format hf-awq cannot hold qwen35c's int4-awq: its activation scales are explicit "
                        "(AutoAWQ folds them into the previous op); use int4-rtn or int4-gptq, or --format hf-gptq")
    if fmt == "hf-gptq" and recipe.algorithm == "awq":
        raise QwenError("--format hf-gptq has no input scale for int4-awq's explicit activation scales; "
                        "use int4-gptq or int4-rtn")
    if fmt == "hf-awq" and recipe.act_order and not recipe.static_groups:
        raise QwenError("--format hf-awq has no g_idx: GPTQ act-order needs static-groups=true")
    return recipe


def export_checkpoint(model: Path, fmt: str, out: Path, *, quantize: str | None = None, force: bool = False,
                      shard_bytes: int = 4 << 30, say=lambda message: None) -> dict:
    """Write checkpoint `model` in `fmt` (an `hf-*` format) to `out`; returns the export manifest."""
    from qwen35c.artifact import atomic_directory, file_table, protected_paths, source_hashes, tool_versions
    from qwen35c.quant.checkpoint import _read_source, write_quantized_files
    from qwen35c.quant.policy import plan

    if fmt not in FORMATS:
        raise QwenError(f"unknown export format '{fmt}' (known: {', '.join(FORMATS)})")
    writer = FORMATS[fmt][0]
    recipe = recipe_of(fmt, quantize)
    model, protected = Path(model), protected_paths(Path(model))
    with atomic_directory(out, force, protected, OUTPUT) as tmp:
        record = {"recipe": recipe.to_dict(), "label": recipe.label}
        quantized = None
        if recipe.is_int4:
            from qwen35c.quant.build import prepare

            ckpt, _ = _read_source(model)
            try:
                shapes = {n: tuple(ckpt.files[ckpt.location[n]].shape(n)) for n in ckpt.names()}
            finally:
                ckpt.close()
            names = sorted(d.canonical for d in plan(sorted(shapes.items()), recipe) if d.quantize)
            if not names:
                raise QwenError(f"{model}: {recipe.label} selects no linear of this model (nothing to quantize)")
            say(f"quantizing {len(names)} linears ({recipe.label}), layer by layer")
            prepared = prepare(model, {"recipe": recipe.to_dict(), "quantized": names})
            quantized, record = prepared.quantized, prepared.record
        say(f"writing the {fmt} checkpoint")
        write_quantized_files(model, tmp, recipe, writer, quantized, shard_bytes=shard_bytes)
        manifest = {"schema_version": 1, "format": fmt, "versions": tool_versions(),
                    "source": {"path": str(model), "files": source_hashes(model)},
                    "quantization": record, "files": file_table(tmp)}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


__all__ = ["EXPORT_MANIFEST", "FORMATS", "export_checkpoint", "is_export", "recipe_of"]
