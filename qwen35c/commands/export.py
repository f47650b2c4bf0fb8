"""`qwen35c export SOURCE --format F -o OUT`: a checkpoint or artifact in the format a serving stack loads."""

from __future__ import annotations

from pathlib import Path

import click

from qwen35c.commands._common import emit_json, info
from qwen35c.export import FORMATS


@click.command("export")
@click.argument("source", required=False)
@click.option("--format", "fmt", required=True, type=click.Choice(list(FORMATS)),
              help="hf-fp8 (official Qwen FP8 block-128), hf-gptq, hf-awq: Hugging Face checkpoints of a "
                   "checkpoint SOURCE that vLLM, SGLang and TensorRT-LLM load; triton-server: a Triton Inference "
                   "Server model repository of an onnx artifact SOURCE.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Export directory.")
@click.option("--quantize", default=None, metavar="SCHEME",
              help="The recipe ('int4-gptq act-order=true', ...); default: the format's own "
                   f"({'; '.join(f'{k}: {v[1]}' for k, v in FORMATS.items() if v[1])}).")
@click.option("--name", default=None, help="triton-server: the model's name in the repository (default: the model's).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="triton-server: sequences batched together.")
@click.option("--max-length", default=4096, show_default=True, type=click.IntRange(1, 1 << 20),
              help="triton-server: positions the KV-cache state holds per sequence; genai: search.max_length.")
@click.option("--force", is_flag=True,
              help="Replace an existing qwen35c export (or empty directory) at OUT; nothing else is ever replaced.")
@click.option("--json", "as_json", is_flag=True, help="Print the export manifest summary as JSON.")
def command(source, fmt, output, quantize, name, max_batch_size, max_length, force, as_json):
    """Write SOURCE in a serving stack's format to OUT, atomically, every file hashed: a checkpoint
    (default: the bundled dense model) quantized with the format's recipe as a Hugging Face
    checkpoint, or a built onnx artifact as a Triton Inference Server model repository."""
    from qwen35c.errors import QwenError
    from qwen35c.export import export_checkpoint, export_genai, export_triton_server
    from qwen35c.models import resolve_model

    say = (lambda m: None) if as_json else info
    if fmt in ("triton-server", "genai"):
        if source is None or quantize is not None:
            raise QwenError(f"--format {fmt} takes a built onnx artifact as SOURCE (and no --quantize)")
        if fmt == "genai":
            manifest = export_genai(Path(source), output, max_length=max_length, force=force, say=say)
        else:
            manifest = export_triton_server(Path(source), output, name=name, max_batch_size=max_batch_size,
                                            max_length=max_length, force=force, say=say)
    else:
        manifest = export_checkpoint(resolve_model(source), fmt, output, quantize=quantize, force=force, say=say)
    label = (manifest.get("quantization") or {}).get("label", "full precision")
    size = sum(f["size"] for f in manifest["files"].values())
    if as_json:
        emit_json({"output": str(output), "format": fmt, "label": label, "files": manifest["files"]})
        return
    info(f"exported {output} ({fmt}, {label}, {len(manifest['files'])} files, {size / 2**20:.1f} MiB)")
