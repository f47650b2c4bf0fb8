"""`qwen35c build --model DIR --target T -o OUT`: compile a checkpoint into a verified artifact."""

from __future__ import annotations

from pathlib import Path

import click

from qwen35c.commands._common import emit_json, info


@click.command("build")
@click.option("--model", "model", required=False, help="Checkpoint directory (default: the bundled dense model).")
@click.option("--target", "target", default="cpu", show_default=True, help="Target name (see `qwen35c targets`).")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Artifact directory.")
@click.option("--pipeline", default=None, help="Override the target's pass pipeline (name or text).")
@click.option("--backend", default=None, help="Override the target's backend.")
@click.option("--quantize", "quantize", default=None, metavar="SCHEME",
              help="Quantize with SCHEME (fp8-block128, fp8-tensor, fp8-channel, int4-rtn, int4-awq, int4-gptq; "
                   "options may follow: 'int4-gptq act-order=true'), replacing the target's quantize options. "
                   "'--target cpu --quantize fp8-block128' builds a CPU artifact of the FP8 GPU targets' weights.")
@click.option("--force", is_flag=True,
              help="Replace an existing qwen35c artifact (or empty directory) at OUT; nothing else is ever replaced.")
@click.option("--no-check", is_flag=True, help="Skip the build's own parity check (manifest says 'not run').")
@click.option("--no-mtp", is_flag=True,
              help="Leave the checkpoint's MTP head out (speculative decoding then drafts by prompt lookup).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def command(model, target, output, pipeline, backend, quantize, force, no_check, no_mtp, as_json):
    """Trace MODEL, run the target's pipeline, lower it with the backend and write OUT atomically."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from qwen35c.build import build_artifact
    from qwen35c.models import resolve_model

    path = resolve_model(model)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.fields[stage]:<8}"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("", total=None, stage="start")

        def progress(stage: str, message: str, fraction: float | None) -> None:
            bar.update(task, stage=stage, description=message[-70:],
                       total=1.0 if fraction is not None else None, completed=fraction or 0)

        report = build_artifact(path, target, output, pipeline=pipeline, backend=backend, force=force,
                                check=not no_check, progress=progress, quantize=quantize, mtp=not no_mtp)
    manifest = report.manifest
    for warning in report.warnings:
        info(f"warning: {warning}")
    if as_json:
        emit_json({"output": str(report.out), "seconds": report.seconds, "stages": dict(report.stages),
                   "warnings": report.warnings,
                   "target": manifest["target"]["name"], "parity": manifest["parity"],
                   "files": manifest["files"]})
        return
    for stage, seconds in report.stages:
        info(f"  {stage:<13} {seconds:7.2f} s")
    size = sum(f["size"] for f in manifest["files"].values())
    if manifest.get("quantization"):
        q = manifest["quantization"]
        info(f"  quantized      {q['label']}: {len(q['quantized'])} linears, {len(q['kept'])} kept"
             + (f", {len(q['not_lowered'])} routed-expert tensors high precision" if q["not_lowered"] else ""))
    info(f"built {report.out} (target {manifest['target']['name']}, backend {manifest['backend']['name']}, "
         f"{size / 2**20:.1f} MiB) in {report.seconds:.1f} s; parity: {manifest['parity'].get('summary', 'not run')}")
