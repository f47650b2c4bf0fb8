"""`qwen35c targets`: every target in the registry, with its backend and whether this install builds it."""

from __future__ import annotations

import click

from qwen35c.commands._common import emit_json


@click.command("targets")
@click.option("--json", "as_json", is_flag=True)
def command(as_json):
    """List the build targets."""
    from qwen35c.targets import TARGETS

    if as_json:
        emit_json({name: {**t.to_json(), "buildable": t.build_blocker() is None, "blocker": t.build_blocker()}
                   for name, t in TARGETS.items()})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qwen35c targets")
    for col in ("target", "hardware", "SM", "backend", "weights", "activations", "gate", "buildable here"):
        table.add_column(col)
    for t in TARGETS.values():
        table.add_row(t.name, t.hardware, f"sm_{t.sm}" if t.sm else "-", t.backend, t.weights, t.activations,
                      t.precision, "yes" if t.build_blocker() is None else "no (backend/quant missing)")
    Console(width=160).print(table)
