"""One run owns a run directory at a time: a lock file that works on bucket mounts and expires with its owner.

Two jobs with the same RUN_NAME would race on checkpoints and the manifest. fcntl locks do not exist on
bucket mounts (s3fs, gcsfuse, rclone), and a lock held by a preempted machine must not block its own
recovery forever. So the lock is a small JSON file: created only if absent (O_EXCL), naming the owner
(host, pid, start time), and refreshed by a heartbeat thread every HEARTBEAT_S seconds. A lock counts as
abandoned when its owner is a process on this host that no longer exists, or this very process (a container
restarted under the same host name runs the job under the same pid again), or when its heartbeat is older
than STALE_S whatever its pid (a preempted or killed machine stops refreshing it, and in a container a pid
of the dead owner can belong to another process, or to us). Taking over an abandoned lock
rewrites it and reads it back after a moment, so of two runs taking over at once, one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from job.errors import TransientError

HEARTBEAT_S = 15.0
STALE_S = 90.0  # six missed heartbeats; a recovered spot job starts minutes after its machine died


class RunLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- reading ---------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or unreadable: treat as abandoned once its file is old enough

    def _abandoned(self, owner: dict) -> bool:
        # The heartbeat's age first: a live pid proves nothing after a restart, since pids are reused (in a
        # container the job is often pid 1 every time). A running owner rewrites the file every HEARTBEAT_S.
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > STALE_S:
            return True
        if owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int):
            if owner["pid"] == self.me["pid"]:
                return True  # this process does not hold the lock yet: a previous run under the same pid left it
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True  # its owner is gone: take it over at once
            except (PermissionError, OSError):
                pass  # alive, another user's
        return False

    def _is_mine(self, owner: dict | None) -> bool:
        return bool(owner) and all(owner.get(k) == v for k, v in self.me.items())

    # --- writing ---------------------------------------------------------------------------------
    def _write(self, exclusive: bool) -> bool:
        data = json.dumps({**self.me, "heartbeat_at": time.time()})
        if exclusive:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            return True
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, self.path)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._write(exclusive=True):
            owner = self._read()
            if owner is not None and not self._abandoned(owner):
                raise TransientError(
                    f"another run is using {self.path.parent}: host {owner.get('host')}, pid {owner.get('pid')}, "
                    f"started {owner.get('started_at')}. Wait for it to finish or stop it, or choose another "
                    f"RUN_NAME. If that run is gone, this lock expires {STALE_S:.0f} s after its last heartbeat "
                    f"(or delete {self.path})."
                )
            self._write(exclusive=False)  # abandoned: take it over
            time.sleep(0.5)  # let a concurrent taker's write land, then see who won
            if not self._is_mine(self._read()):
                return self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self._is_mine(self._read()):
                    self._write(exclusive=False)
            except OSError:
                pass  # a full or flaky disk: the next beat tries again; the stages report the disk error

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._is_mine(self._read()):
                self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
