"""The one error type of the reference package: a checkpoint or config the user must fix."""

from __future__ import annotations


class CheckpointError(Exception):
    """A bad checkpoint or config. The message names the file, key or tensor at fault."""

    exit_code = 2
