"""SIGINT and SIGTERM as an exception, so every `finally` cleanup runs before the process exits.

The CLI exits 130 on SIGINT and 143 on SIGTERM (128 + the signal), after the same cleanup as any
failure: a build's temporary directory removed, an output file's temporary sibling unlinked. Only
the first signal raises; later ones are ignored while that cleanup runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"raised": False}


def _handler(signum, frame):
    if _state["raised"]:
        return
    _state["raised"] = True
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT/SIGTERM to `Interrupted` for the rest of the process (the CLI's entry point)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Within the block SIGINT/SIGTERM raise `Interrupted` (library callers that did not `install`);
    the previous handlers come back after it. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.getsignal(sig) for sig in SIGNALS}
    if any(h is not _handler for h in old.values()):
        _state["raised"] = False     # outermost block: a fresh first signal
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
