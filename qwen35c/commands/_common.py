"""Helpers shared by several commands (model argument, token parsing, JSON output)."""

from __future__ import annotations

import json
import sys

import click

from qwen35c.errors import QwenError


def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise QwenError(f"{option}: expected comma-separated integers, got '{text}'") from None
    if not ids:
        raise QwenError(f"{option}: no token ids given")
    return ids


def emit_json(payload: dict) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True))


def info(message: str) -> None:
    """Progress and notes go to stderr, so stdout stays the command's result."""
    click.echo(message, err=True)
    sys.stderr.flush()
