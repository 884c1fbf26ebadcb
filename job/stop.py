"""SIGTERM: what spot VMs, `docker stop` and Kubernetes send seconds to minutes before they kill the job.

Outside training the handler raises `Stopped` at once: every file is written whole or not at all
(job/files.py) and the manifest marks a stage done only after its files, so nothing finished is lost.
Inside training (`during_training`) it only records the request: the train stage's callback then lets
the running optimizer step finish, has the Trainer save a complete, marked checkpoint, and stops, so
a preemption notice costs no steps. Either way the job exits with STOPPED (job/errors.py) and the same
command resumes.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from job.errors import Stopped

_requested = threading.Event()
_deferred = False


def _handler(signum, frame) -> None:
    _requested.set()
    if not _deferred:
        raise Stopped("stopped by SIGTERM; finished stages are kept: run the same command again to resume")


@contextlib.contextmanager
def handling_sigterm():
    """Within this block SIGTERM stops the job as described above (main thread only, as Python requires)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def requested() -> bool:
    return _requested.is_set()


@contextlib.contextmanager
def during_training():
    """Within this block a SIGTERM waits for the end of the current optimizer step (see module docstring)."""
    global _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = False
