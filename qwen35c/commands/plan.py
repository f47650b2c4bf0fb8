"""`qwen35c plan ART`: the execution plan of a triton artifact (its kernel launches and host ops)."""

from __future__ import annotations

import click


@click.command("plan")
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print the plan's JSON form instead of its text.")
def command(artifact, as_json):
    """Print ARTIFACT's plan: per program (prefill, decode), the ordered launches (kernel,
    specialisation, grid, bindings) and the named host ops; diffable like `qwen35c ir`."""
    from qwen35c.artifact import artifact_file
    from qwen35c.errors import QwenError
    from qwen35c.runtime import open_checked

    manifest, _backend = open_checked(artifact)
    section = manifest["backend"]
    if section["name"] != "triton":
        raise QwenError(f"{artifact}: a {section['name']} artifact has no kernel plan (see `qwen35c ir` for its IR)")
    file = artifact_file(artifact, manifest, section["plan" if as_json else "plan_text"])
    click.echo(file.read_text(), nl=False)
