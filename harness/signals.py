"""SIGTERM handled like Ctrl-C: a job scheduler's stop (or `kill`) must clean up as an interrupt does.

The handler raises `Terminated`, a KeyboardInterrupt, so every path that cleans up after Ctrl-C runs for
SIGTERM too: temporary folders (`mmlora-work-*`, `mmlora-offload-*`, ...) are removed by their context
managers, a report being written is dropped (harness.output.atomic_dir), a bench sweep keeps its finished
points. `harness.cli.main` turns it into exit 143 (128 + SIGTERM), as a shell reports a process it killed.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_TERMINATED = 128 + int(signal.SIGTERM)  # 143
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)  # 130


class Terminated(KeyboardInterrupt):
    """SIGTERM was received."""


def _on_sigterm(signum, frame):
    # a second SIGTERM while the first one's cleanup runs would cut that cleanup short and leave temporary data:
    # it is ignored (SIGKILL still stops the process)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated while the block runs (the previous handler is put back after it, so a test
    process calling `main` keeps its own). Python sets handlers from the main thread only: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(e: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


@contextmanager
def deferred():
    """SIGINT and SIGTERM held back (delivered on exit) while a few renames put a finished report in place:
    an interrupt between them would leave neither the old report nor the new one at the path."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
