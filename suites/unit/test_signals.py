"""SIGTERM is raised as Terminated where Python keeps it: a SIGTERM that lands while a weakref finalizer runs (the
garbage collector or a deallocation calls it, and Python prints "Exception ignored in ..." for whatever it
raises) must still stop the run. CI saw one lost that way: the run finished with exit 0."""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref

import pytest

from harness import signals


class _Held:
    pass


def test_a_sigterm_during_a_weakref_finalizer_is_raised_after_it_not_lost():
    finished = []

    def slow_cleanup():  # the finalizer: the signal arrives while it sleeps, its handler runs inside it
        time.sleep(0.3)
        finished.append(True)

    alarm = signal.getsignal(signal.SIGALRM)
    with signals.sigterm_raises():
        obj = _Held()
        weakref.finalize(obj, slow_cleanup)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(signals.Terminated):
            del obj  # the finalizer runs now, by deallocation
            time.sleep(2)  # Terminated must come here, once the finalizer returned
    assert finished == [True]  # the finalizer itself ran to its end
    assert signal.getsignal(signal.SIGALRM) is alarm  # the retry's handler is put back


def test_a_sigterm_anywhere_else_is_raised_at_once():
    with signals.sigterm_raises():
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        with pytest.raises(signals.Terminated):
            time.sleep(2)
        assert time.monotonic() - t0 < 1
