"""SIGTERM for every command: raised as an exception in the main thread, so ``finally`` blocks run (a server
started by serve or by run's smoke stage is stopped, a partial artifact removed) before yitrt exits.

A SIGKILLed yitrt runs nothing; what it started is then stopped by ``yitrt.triton.launcher``'s parent watch.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: exit code of a command stopped by SIGTERM (128 + 15, as a shell reports a process killed by it)
TERMINATED_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so that code that stops on Ctrl-C stops on SIGTERM the same way."""


_fired: list[bool] = [False]  # whether SIGTERM came (Typer turns every KeyboardInterrupt into exit code 130)


def _raise_terminated(signum, frame) -> None:
    _fired[0] = True
    raise Terminated


def terminated() -> bool:
    """Whether SIGTERM arrived inside the current ``sigterm_raises``."""
    return _fired[0]


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread; the previous handler is restored after.
    Off the main thread (where handlers cannot be set) it does nothing."""
    _fired[0] = False
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
