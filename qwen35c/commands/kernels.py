"""`qwen35c kernels`: AOT-compile the Triton kernel library for a target and list resource usage."""

from __future__ import annotations

import json
import os

import click

from qwen35c.errors import QwenError


@click.command("kernels")
@click.option("--target", required=True, help="Target name, e.g. h100-fp8, h200, a100, l40s, b200.")
@click.option("--model-shapes", "model_shapes", type=click.Choice(["0.8b", "35b-a3b"]), default=None,
              help="Only the kernels specialised for these model shapes (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records instead of a table.")
@click.option("--fresh-cache", is_flag=True, help="Compile in an empty Triton cache (honest compile times).")
def command(target: str, model_shapes: str | None, as_json: bool, fresh_cache: bool) -> None:
    """Compile every kernel for TARGET's SM; report registers, shared memory, spills and compile time."""
    from qwen35c.backends.triton import aot

    sm = aot.target_sm(target)
    shapes = [model_shapes] if model_shapes else None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        records = aot.compile_all_subprocess([sm], shapes=shapes, fresh_cache=fresh_cache)
    else:
        records = aot.compile_all([sm], shapes=shapes, fresh_cache=fresh_cache)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in records], indent=1))
    else:
        click.echo(f"{'kernel':40s} {'sm':>4s} {'warps':>5s} {'regs':>5s} {'smem':>8s} {'spill':>6s} {'sec':>6s}")
        for r in records:
            if r.skipped or r.error:
                click.echo(f"{r.name:40s} {r.sm:>4d}  {r.skipped or 'ERROR ' + r.error}")
                continue
            click.echo(f"{r.name:40s} {r.sm:>4d} {r.num_warps:>5d} {r.registers:>5d} {r.shared_bytes:>8d} "
                       f"{r.spill_bytes:>6d} {r.compile_s:>6.2f}")
    failed = [r.name for r in records if r.error]
    if failed:
        raise QwenError(f"{len(failed)} kernel(s) failed to compile for sm_{sm}: {', '.join(failed)}")
