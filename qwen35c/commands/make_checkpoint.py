"""`qwen35c make-checkpoint`: a random checkpoint in the official layout (tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import click

from qwen35c.commands._common import info


@click.command("make-checkpoint")
@click.option("--preset", required=True, help="tiny | tiny-moe | tiny-next | 0.8b | 4b | 9b | 27b | 35b-a3b")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--layout", type=click.Choice(["vlm", "text"]), default="vlm", show_default=True,
              help="vlm: model.language_model.* (official); text: model.* (text-only export).")
@click.option("--experts", type=click.Choice(["fused", "per-expert"]), default="fused", show_default=True)
def command(preset, seed, output, layout, experts):
    """Write a random bf16 checkpoint for PRESET, tensor by tensor (bounded memory)."""
    from reference.checkpoint import PRESETS, make_random_checkpoint
    from qwen35c.errors import QwenError

    if preset not in PRESETS:
        raise QwenError(f"--preset: unknown preset '{preset}', expected one of {', '.join(PRESETS)}")
    path = make_random_checkpoint(preset, seed, output, layout=layout, experts=experts.replace("-", "_"))
    size = sum(p.stat().st_size for p in path.iterdir())
    info(f"wrote {path} ({size / 2**20:.1f} MiB)")
