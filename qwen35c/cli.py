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

from qwen35c import signals
from qwen35c.errors import QwenError
from reference.errors import CheckpointError


class _Group(click.Group):
    """Turns the errors a user can act on into one line and an exit code: QwenError / CheckpointError
    (their code, 2 unless a parity failure), an OSError (2, naming the path), SIGINT / SIGTERM (130 /
    143, after every cleanup has run)."""

    def main(self, *args, **kwargs):
        """Click's standalone handling, with its usage errors as our one line (exit 2)."""
        signals.install()
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as err:
            click.echo(f"qwen35c: error: {err.format_message()} (see --help)", err=True)
            sys.exit(err.exit_code)
        except (click.Abort, signals.Interrupted) as err:   # arrived outside a command
            click.echo("qwen35c: interrupted", err=True)
            sys.exit(getattr(err, "exit_code", 130))
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.obj and ctx.obj.get("debug"))
        try:
            return super().invoke(ctx)
        except (QwenError, CheckpointError) as err:
            if debug:
                raise
            click.echo(f"qwen35c: error: {err}", err=True)
            sys.exit(err.exit_code)
        except signals.Interrupted as err:
            click.echo(f"qwen35c: interrupted ({err}); nothing half-written was left", err=True)
            sys.exit(err.exit_code)
        except OSError as err:
            if debug:
                raise
            where = err.filename or "input/output"
            click.echo(f"qwen35c: error: {where}: {err.strerror or err}", err=True)
            sys.exit(2)


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
