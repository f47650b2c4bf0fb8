"""User-facing errors: one line that names the file, key or tensor at fault."""

from __future__ import annotations


class QwenError(Exception):
    """An error the user can act on. The CLI prints it on one line and exits with `exit_code`."""

    exit_code = 2
