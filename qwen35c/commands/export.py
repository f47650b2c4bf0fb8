"""`qwen35c export MODEL --format F -o OUT`: a checkpoint in the format a serving stack loads."""

from __future__ import annotations

from pathlib import Path

import click

from qwen35c.commands._common import emit_json, info
from qwen35c.export import FORMATS


@click.command("export")
@click.argument("model", required=False)
@click.option("--format", "fmt", required=True, type=click.Choice(list(FORMATS)),
              help="hf-fp8 (official Qwen FP8 block-128), hf-gptq, hf-awq: Hugging Face checkpoints that "
                   "vLLM, SGLang and TensorRT-LLM load.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Export directory.")
@click.option("--quantize", default=None, metavar="SCHEME",
              help="The recipe ('int4-gptq act-order=true', ...); default: the format's own "
                   f"({'; '.join(f'{k}: {v[1]}' for k, v in FORMATS.items())}).")
@click.option("--force", is_flag=True,
              help="Replace an existing qwen35c export (or empty directory) at OUT; nothing else is ever replaced.")
@click.option("--json", "as_json", is_flag=True, help="Print the export manifest summary as JSON.")
def command(model, fmt, output, quantize, force, as_json):
    """Quantize MODEL (a checkpoint directory; default: the bundled dense model) with the format's
    recipe and write it to OUT as a Hugging Face checkpoint, atomically, every file hashed."""
    from qwen35c.export import export_checkpoint
    from qwen35c.models import resolve_model

    manifest = export_checkpoint(resolve_model(model), fmt, output, quantize=quantize, force=force,
                                 say=(lambda m: None) if as_json else info)
    q = manifest["quantization"]
    size = sum(f["size"] for f in manifest["files"].values())
    if as_json:
        emit_json({"output": str(output), "format": fmt, "label": q["label"], "files": manifest["files"]})
        return
    info(f"exported {output} ({fmt}, {q['label']}, {len(manifest['files'])} files, {size / 2**20:.1f} MiB)")
