"""Exit codes, the errors that map to them, and how an outside failure is classified.

The SkyPilot recovery settings (sky/*.yaml `recover_on_exit_codes`) and the README's table follow this
table: only RETRYABLE codes are worth an automatic retry; a bad setting, a full disk or a quality gate
fails the same way twice.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

OK = 0
BUG = 1  # an unexpected exception: a defect in this project, report it
BAD_CONFIG = 2  # bad setting or input data: fix it, a retry fails the same way
OUT_OF_MEMORY = 3  # GPU memory ran out: lower BATCH_SIZE or MAX_SEQ_LENGTH
TRANSIENT = 4  # the Hub, the network or the judge endpoint failed, or another run holds the run directory
QUALITY_GATE = 5  # the safety screen or the medical benchmark stopped the push: nothing was pushed
LOCAL_FAILURE = 6  # this machine's disk is full or read-only, or a folder is not writable
STOPPED = 7  # SIGTERM (spot preemption, docker stop): finished work and a checkpoint were saved
INTERRUPTED = 130  # Ctrl-C (SIGINT), the shell's convention: finished stages and checkpoints are kept

EXIT_CODES = {
    OK: "success",
    BUG: "unexpected error (a bug: please report it with the log)",
    BAD_CONFIG: "bad setting or input: fix what the message names; retrying will not help",
    OUT_OF_MEMORY: "out of GPU memory: lower BATCH_SIZE or MAX_SEQ_LENGTH, or turn on GRADIENT_CHECKPOINTING",
    TRANSIENT: "outside failure (Hub, network, judge endpoint, run directory busy): retry later; managed cloud "
    "jobs retry this automatically",
    QUALITY_GATE: "a quality gate (safety screen or medical benchmark) stopped the push: nothing was pushed",
    LOCAL_FAILURE: "local failure (disk full or read-only, folder not writable): fix the machine, then run the same "
    "command again",
    STOPPED: "stopped by a signal after saving: run the same command again to resume",
    INTERRUPTED: "interrupted (Ctrl-C): run the same command again to resume",
}
# Exit codes a managed cloud job restarts on. STOPPED is here for SIGTERMs that do not take the machine
# away (a Kubernetes eviction): a preempted VM is recovered by SkyPilot whatever the code.
RETRYABLE = (TRANSIENT, STOPPED)


class JobError(Exception):
    exit_code = BUG


class ConfigError(JobError):
    """A setting or an input (data file, model, token) is wrong; the message says which and how to fix it."""

    exit_code = BAD_CONFIG


class OutOfMemory(JobError):
    exit_code = OUT_OF_MEMORY


class TransientError(JobError):
    exit_code = TRANSIENT


class QualityGateError(JobError):
    exit_code = QUALITY_GATE


class LocalFailure(JobError):
    exit_code = LOCAL_FAILURE


class Stopped(JobError):
    exit_code = STOPPED


def _chain(e: BaseException):
    """The exception and its causes: libraries wrap the error that matters (Transformers re-raises the
    Hub's as OSError, huggingface_hub wraps httpx's)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def classify(e: BaseException, what: str) -> JobError | None:
    """A JobError for a failure from outside our code, by the libraries' exception types (never by the text of
    their messages), or None when it is none of these. `what` names the setting or thing being done."""
    import httpx

    for x in _chain(e):
        if isinstance(x, JobError):
            return x
        if error := _hub_error(x, what):
            return error
        if isinstance(x, (httpx.TransportError, ConnectionError, TimeoutError)):
            return TransientError(f"{what}: the network or the Hub could not be reached ({type(x).__name__}); retry")
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return disk_error(x, what, file_being_written(x))
    return None


def _hub_error(x: BaseException, what: str) -> JobError | None:
    from huggingface_hub import errors as hub

    if isinstance(x, hub.GatedRepoError):
        return ConfigError(
            f"{what}: access denied. Accept the model's license on its Hub page and set HF_TOKEN to a token "
            "of that account."
        )
    not_found = (hub.RepositoryNotFoundError, hub.RevisionNotFoundError, hub.EntryNotFoundError)
    if isinstance(x, not_found) and not isinstance(x, hub.LocalEntryNotFoundError):
        return ConfigError(f"{what}: not found on the Hugging Face Hub (or private without HF_TOKEN): {x}")
    if isinstance(x, hub.OfflineModeIsEnabled):
        return ConfigError(f"{what}: not in the local cache and HF_HUB_OFFLINE is set; unset it or fill the cache")
    if not isinstance(x, hub.HfHubHTTPError):
        return None
    status = getattr(getattr(x, "response", None), "status_code", None)
    if status in (401, 403):
        return ConfigError(f"{what}: the Hub refused HF_TOKEN ({status}); use a token with the right access")
    if status is None or status >= 500 or status in (408, 429):
        return TransientError(f"{what}: the Hub failed ({status}); retry later")
    return ConfigError(f"{what}: the Hub rejected the request ({status}): {x}")


# The errors of a disk that takes no more (full, over quota, read-only) or of a folder we may not write.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_ERRNOS = (*DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM)
# What a run needs, for the message: the run directory and the Hugging Face cache (the 3B model).
_NEEDS = (
    "A run directory needs about 1 GB (plus 7 GB with PUSH_MERGED), the Hugging Face cache (HF_HOME) about 7 GB "
    "for the 3B model."
)
# The folders this job writes to (the run directory, the Hugging Face cache), set when a run starts
# (job/__main__.py): a write error that names no file gets the free space of each.
folders_written: list[str] = []


def disk_error(x: OSError, what: str, file: str | None) -> LocalFailure:
    """The LocalFailure for OSError `x` (an errno of DISK_ERRNOS) raised writing `file` (None: unknown)."""
    if file:
        where, free = file, disk_free(file)
    else:
        where = "a file it did not name"
        free = "; ".join(disk_free(f) for f in folders_written) or disk_free(None)
    if x.errno in DISK_FULL:
        return LocalFailure(
            f"{what}: disk full writing {where} ({x.strerror}; {free}). {_NEEDS} Free space on that disk, then run "
            "the same command again: finished stages and checkpoints are kept."
        )
    if x.errno == errno.EROFS:
        fix = "remount it writable or choose a folder on another disk"
    else:
        fix = f"fix its permissions (the job runs as user id {os.getuid()}) or choose a writable folder"
    return LocalFailure(f"{what}: cannot write {where} ({x.strerror}; {free}); {fix}, then run the same command again")


def file_being_written(e: BaseException) -> str | None:
    """The file an OSError (or one it caused) was about: its own filename, else the file object open for writing
    in the innermost frame of its traceback that holds one. A failed write() or fsync() names no file, so
    without this the message would say "a file" and give the free space of the wrong disk."""
    for x in _chain(e):
        if isinstance(x, OSError) and (x.filename or x.filename2):
            return str(x.filename or x.filename2)
    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    names = (_name_if_written(v) for frame in reversed(frames) for v in list(frame.f_locals.values()))
    return next((name for name in names if name is not None), None)  # the innermost frame first


def _name_if_written(value: Any) -> str | None:
    mode, name = getattr(value, "mode", None), getattr(value, "name", None)
    writing = isinstance(value, io.IOBase) and isinstance(mode, str) and set(mode) & set("wax+")
    return name if writing and isinstance(name, str) else None


def _existing(path: str | os.PathLike) -> Path:
    """`path`, or its nearest folder that exists (a disk's figures are read there)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_free(path: str | os.PathLike | None) -> str:
    p = _existing(path or ".")
    try:
        return f"{shutil.disk_usage(p).free / 2**30:.1f} GiB free on the disk of {p}"
    except OSError:
        return "free space unknown"


def disk_failure(folder: Path, need_bytes: int, what: str, cause: BaseException) -> LocalFailure | None:
    """A LocalFailure when `folder`'s disk cannot take `need_bytes` more, for an error raised while writing there
    that carries no errno: torch.save reports a full disk as RuntimeError("... file write failed"), safetensors
    as its own SafetensorError. Judged on the disk itself, never on the message: its free space for this user
    (statvfs), then a write of `need_bytes` (at most PROBE_MAX) with fsync, whose OSError has the errno. None
    when the disk takes it: then `cause` was something else."""
    folder = Path(folder)
    existing = _existing(folder)
    why = f"{type(cause).__name__}: {str(cause)[:200]}"
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = None
    if free is not None and free < need_bytes:
        return LocalFailure(
            f"{what}: the disk of {folder} is full ({why}): {disk_free(existing)}, about {need_bytes / 2**20:.0f} MiB "
            f"needed. {_NEEDS} Free space on that disk, then run the same command again: finished stages and "
            "complete checkpoints are kept."
        )
    probe = existing / f".disk-probe-{os.getpid()}"
    try:
        with probe.open("wb") as f:
            block = b"\0" * 2**20
            for _ in range(max(1, min(need_bytes, PROBE_MAX) // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())  # a full disk may take the write into memory and refuse it only here
    except OSError as x:
        if x.errno in DISK_ERRNOS:
            return disk_error(x, f"{what} ({why})", str(folder))
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


PROBE_MAX = 256 * 2**20  # bytes the probe writes at most: a checkpoint of the 3B model's adapter is ~30 MB
