"""`qwen35c engine BUNDLE -o DIR`: stage 2 of the tensorrt backend (the engine, where TensorRT and the GPU are)."""

from __future__ import annotations

import click


@click.command("engine")
@click.argument("bundle")
@click.option("-o", "--output", required=True, help="Directory (created): a Triton model repository with the engine (qwen35c/1/model.plan) + engine.json.")
@click.option("--force", is_flag=True, help="Replace an existing engine directory this command wrote.")
def command(bundle, output, force):
    """Build BUNDLE's TensorRT engine (its plugins' PTX registered as ahead-of-time plugins), run it
    on the verify prompt set against the reference and write it with its parity report. Exits 3,
    writing nothing, where TensorRT (>= 10.15) or a GPU of the bundle's SM is missing."""
    from qwen35c.engine import build_engine

    record = build_engine(bundle, output, force=force, say=lambda m: click.echo(m, err=True))
    click.echo(f"engine {output}: TensorRT {record['tensorrt']} on {record['gpu']}; parity {record['parity']['summary']}")
