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


def _swallowing(frame) -> bool:
    """Whether Python would ignore an exception raised in `frame`: inside a weakref finalizer or a `__del__`, which
    the garbage collector and object deallocation call, printing "Exception ignored in ..." and going on (CI saw a
    SIGTERM land in one: the run finished with exit 0)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (code.co_name == "__call__" and code.co_filename.endswith("weakref.py")):
            return True
        frame = frame.f_back
    return False


RETRY_S = 0.01  # how soon a Terminated held back from a finalizer is raised again


def _raise_when_safe(signum, frame):
    if _swallowing(frame):  # not here, where it would be lost: again in RETRY_S, once the finalizer has returned
        signal.signal(signal.SIGALRM, _raise_when_safe)
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    raise Terminated()


def _on_sigterm(signum, frame):
    # a second SIGTERM while the first one's cleanup runs would cut that cleanup short and leave temporary data:
    # it is ignored (SIGKILL still stops the process)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _raise_when_safe(signum, frame)


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated while the block runs (the previous handler is put back after it, so a test
    process calling `main` keeps its own). Python sets handlers from the main thread only: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    alarm = signal.getsignal(signal.SIGALRM)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # a retry still armed (see _raise_when_safe) is dropped
        signal.signal(signal.SIGALRM, alarm)
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
