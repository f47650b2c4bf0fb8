"""SIGINT and SIGTERM as an exception, so every `finally` cleanup runs before the process exits.

The CLI exits 130 on SIGINT and 143 on SIGTERM (128 + the signal), after the same cleanup as any
failure: a build's temporary directory removed, an output file's temporary sibling unlinked. Only
the first signal raises; later ones are ignored while that cleanup runs.

Native code that runs Python while it cannot unwind a Python exception (onnx's nanobind extension
initialising) would abort the process if the handler raised inside it ("terminate called after
throwing an instance of 'nanobind::python_error'"): such code runs in a `deferred()` block, which
holds a first signal and raises it when the block ends.
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


_state = {"raised": False, "deferring": 0, "held": None}


def _handler(signum, frame):
    if _state["raised"]:
        return
    _state["raised"] = True
    if _state["deferring"]:
        _state["held"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a first SIGINT/SIGTERM is held; it raises `Interrupted` when the block ends."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        held = _state["held"]
        if held is not None and not _state["deferring"]:
            _state["held"] = None
            raise Interrupted(held)   # the user's stop wins over an error of the block itself


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
        _state.update(raised=False, held=None)     # outermost block: a fresh first signal
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
