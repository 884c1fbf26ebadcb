"""The outside tester's hostile cases of issue 26 (disk, signals, the lock, inputs): each failed on the code before
the fix (a traceback, the wrong exit code, a silent mistake or a run blocked forever)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job import lock as run_lock
from job.lock import RunLock
from job.paths import RunPaths


# --- the lock: a live pid is not proof of a live owner -------------------------------------------------------
def _owner(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": "t0", **fields}))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_live_pid_with_an_old_heartbeat_is_stale(tmp_path):
    """In a container a dead owner's pid is soon another process's: its heartbeat's age decides."""
    path = RunPaths(tmp_path).lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _owner(path, pid=other.pid)
        _age(path, run_lock.STALE_S + 1)
        with RunLock(path):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_under_our_own_pid_is_taken_over_at_once(tmp_path):
    """A restarted container runs the job under the same host name and pid (pid 1, say): that lock is ours."""
    path = RunPaths(tmp_path).lock
    _owner(path, started_at="2026-12-01T00:00:00+00:00")  # fresh heartbeat, this pid, an earlier start
    t0 = time.monotonic()
    with RunLock(path):
        assert json.loads(path.read_text())["started_at"] != "2026-12-01T00:00:00+00:00"
    assert time.monotonic() - t0 < run_lock.STALE_S


def test_a_live_owner_with_a_fresh_heartbeat_still_blocks(tmp_path):
    from job.errors import TransientError

    path = RunPaths(tmp_path).lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _owner(path, pid=other.pid)
        _age(path, run_lock.HEARTBEAT_S)  # one beat late is not stale
        with pytest.raises(TransientError, match=f"pid {other.pid}"):
            RunLock(path).acquire()
    finally:
        other.kill()
        other.wait()
