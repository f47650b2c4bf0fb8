"""The `qwen35c` command line.

Every subcommand lives in its own module under `qwen35c/commands/` and exposes a click command
named `command`; this file only collects them, so adding a command never touches a shared file.
Errors the user can fix (bad checkpoint, bad option) are `QwenError`s or `CheckpointError`s: one line, exit code 2,
no traceback unless `--debug`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from qwen35c.errors import QwenError
from reference.errors import CheckpointError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (QwenError, CheckpointError) as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"qwen35c: error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="qwen35c")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """qwen35c: compile, verify and run Qwen3.5 models."""
    ctx.obj = {"debug": debug}


def _register_commands() -> None:
    import qwen35c.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


_register_commands()
