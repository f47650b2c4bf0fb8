"""Helpers shared by several commands (option types, token parsing, JSON output, progress)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator

import click

from qwen35c.errors import QwenError
from qwen35c.settings import MAX_THREADS

THREADS = click.IntRange(1, MAX_THREADS)
SEED = click.IntRange(0, 2**63 - 1)


class FiniteFloat(click.ParamType):
    """A float within [lo, hi] (either bound optional, `lo_open` excludes lo); NaN and inf refused."""

    name = "float"

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.lo is not None and (number < self.lo or (self.lo_open and number == self.lo)):
            self.fail(f"{number} must be {'>' if self.lo_open else '>='} {self.lo}", param, ctx)
        if self.hi is not None and number > self.hi:
            self.fail(f"{number} must be <= {self.hi}", param, ctx)
        return number


def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise QwenError(f"{option}: expected comma-separated integers, got '{text}'") from None
    if not ids:
        raise QwenError(f"{option}: no token ids given")
    return ids


def _finite(value):
    """NaN and inf (a rate over zero tokens) become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit_json(payload: dict) -> None:
    click.echo(json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False))


def info(message: str) -> None:
    """Progress and notes go to stderr, so stdout stays the command's result."""
    click.echo(message, err=True)
    sys.stderr.flush()


@contextlib.contextmanager
def status(stage: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A spinner with the current step on a terminal's stderr (nothing when quiet or not a terminal);
    yields `say(message)`."""
    if quiet or not sys.stderr.isatty():
        yield lambda message: None
        return
    from rich.console import Console

    with Console(stderr=True).status(f"{stage}: starting") as spinner:
        yield lambda message: spinner.update(f"{stage}: {message[-90:]}")
