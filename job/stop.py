"""SIGTERM: what spot VMs, `docker stop` and Kubernetes send seconds to minutes before they kill the job.

`python -m job` installs the handler first thing (`install`), before it imports anything heavy, and keeps it
until the process ends, so a SIGTERM at any moment ends in STOPPED (job/errors.py) with a message, never in
the shell's 143:
- before the job's work begins (Python still importing, settings being read): noted, and the job stops as
  soon as its command starts (`handling_sigterm`), with nothing to save;
- outside training: the handler raises `Stopped` at once. Every file is written whole or not at all
  (job/files.py) and the manifest marks a stage done only after its files, so nothing finished is lost;
- inside training (`during_training`): it only notes the request. The train stage's callback then lets the
  running optimizer step finish, has the Trainer save a complete, marked checkpoint, and stops, so a
  preemption notice costs no steps. Under torchrun the ranks agree on that step (`agreed`);
- after the first: further SIGTERMs are only noted, so the shutdown the first one began (the checkpoint,
  the lock's release) finishes and the exit code stays STOPPED.
The same command resumes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

from job.errors import Stopped

log = logging.getLogger(__name__)

_requested = threading.Event()
_deferred = False  # in training: the train stage's callback stops at the end of the step
_active = 0  # depth of handling_sigterm blocks: the handler raises only inside one
_process_wide = False  # install() was called: the handler stays for the life of the process


def _handler(signum, frame) -> None:
    first = not _requested.is_set()
    _requested.set()
    if first and _active and not _deferred:
        raise Stopped("stopped by SIGTERM; finished stages are kept: run the same command again to resume")


def install() -> None:
    """Handle SIGTERM for the rest of this process's life (`python -m job` calls this before anything else)."""
    global _process_wide
    signal.signal(signal.SIGTERM, _handler)
    _process_wide = True


@contextlib.contextmanager
def handling_sigterm():
    """Within this block SIGTERM stops the job as described above (main thread only, as Python requires).

    Blocks nest. Without install() (the job called in-process, by the tests) the outermost block installs the
    handler, forgets an earlier run's request, and when it ends puts the previous handler back and forgets its
    own request (else training called later in the same process, outside any block, would stop after a step)."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = _active == 0
    previous = None
    if outer and not _process_wide:
        _requested.clear()
        previous = signal.signal(signal.SIGTERM, _handler)
    _active += 1
    try:
        if outer and _requested.is_set():  # it came while Python was still importing the job
            raise Stopped("stopped by SIGTERM before the job started; nothing to save: run the same command again")
        yield
    finally:
        _active -= 1
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            _requested.clear()


def requested() -> bool:
    return _requested.is_set()


def request() -> None:
    """Note a stop as a SIGTERM would, without raising: a rank that learns another rank's SIGTERM (`agreed`)."""
    _requested.set()


@contextlib.contextmanager
def during_training():
    """Within this block a SIGTERM waits for the end of the current optimizer step (see module docstring)."""
    global _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = False


_control_group: Any = None  # torch.distributed's gloo group for the stop flag (agreed), made once


def agreed() -> bool:
    """Whether any rank has been asked to stop, agreed by every rank at the same optimizer step: a SIGTERM can
    reach one rank only (one node's notice, a kill of one process), and a rank that saved and stopped alone would
    leave the others waiting in the next step's gradient all-reduce.

    One all-reduce of a flag per optimizer step, on a gloo (CPU) group of its own: on the NCCL group the flag
    would be a GPU tensor whose read waits for the step's kernels, idling the GPU while the host queues the next
    step. A rank that learns of another's SIGTERM notes it as its own (request), so it exits STOPPED too."""
    global _control_group
    import torch
    import torch.distributed as dist

    mine = requested()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return mine
    if _control_group is None:  # every rank reaches its first step end: new_group is collective
        _control_group = dist.new_group(backend="gloo")
    flag = torch.tensor([int(mine)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control_group)
    if flag.item() and not mine:
        log.warning("another rank received SIGTERM: saving this step's checkpoint with it, then stopping")
        request()
    return bool(flag.item())
