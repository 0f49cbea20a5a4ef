"""Signals as exceptions, so that an interrupted command cleans up after itself.

Ctrl-C raises KeyboardInterrupt in Python; SIGTERM (what `kill`, systemd, Docker and CI runners
send) and SIGHUP (the terminal closed) kill the process on the spot by default, leaving temporary
files, half-written outputs and temporary folders behind. While a command runs, they raise
`Terminated` (a KeyboardInterrupt) instead, so every `finally` block and cleanup handler runs.
Exit codes follow the shells' convention, 128 + the signal number: 130 for Ctrl-C, 143 for
SIGTERM, 129 for SIGHUP.
"""

from __future__ import annotations

import contextlib
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP received (raised like Ctrl-C's KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def describe(exc: KeyboardInterrupt) -> str:
    signum = getattr(exc, "signum", signal.SIGINT)
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"{what}; temporary and partial files were removed"


@contextlib.contextmanager
def signals_as_exceptions():
    """While the block runs, SIGTERM and SIGHUP raise `Terminated` and SIGINT KeyboardInterrupt.
    Further signals are ignored once the first arrived (the cleanup it starts must not be cut
    short); the previous handlers come back afterwards. Only the main thread can set handlers:
    elsewhere (an application's worker thread) nothing changes."""
    def handler(signum, frame):
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    previous = {}
    try:
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
