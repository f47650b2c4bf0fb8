"""`qwen35c matrix`: the CI build matrix, one job per target (runner label, build and verify commands)."""

from __future__ import annotations

import json

import click


@click.command("matrix")
@click.option("--format", "fmt", type=click.Choice(["json", "github"]), default="json", show_default=True,
              help="github: one `matrix=<json>` line for $GITHUB_OUTPUT.")
@click.option("--model", default="./model", show_default=True, help="Checkpoint path used in the commands.")
def command(fmt, model):
    """Print the CI matrix."""
    from qwen35c.targets import TARGETS

    jobs = []
    for t in TARGETS.values():
        out = f"artifacts/{t.name}"
        jobs.append({"target": t.name, "runner": t.runner, "backend": t.backend, "sm": t.sm,
                     "buildable": t.build_blocker() is None,
                     "build": f"qwen35c build --model {model} --target {t.name} -o {out}",
                     "verify": f"qwen35c verify {out} --reference {model} --json"})
    doc = {"include": jobs}
    if fmt == "github":
        click.echo("matrix=" + json.dumps(doc, separators=(",", ":")))
    else:
        click.echo(json.dumps(doc, indent=2))
