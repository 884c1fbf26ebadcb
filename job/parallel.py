"""The per-row work of the sample and format stages on several processes, its results taken back in order.

A stage cuts its rows into chunks; worker processes do the pure per-row work on them (cleaning, tokenizing) and
the stage's own loop reads the results in the order the chunks were cut. Every decision that depends on the rows
before (duplicates, the held-out split, the first N kept, the counters, the examples) stays in that one loop, so
the files a stage writes are the same bytes for any WORKERS (tests/test_parallel.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from job.errors import LocalFailure

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

CHUNK_ROWS = 64  # rows per task: a few hundred ms of cleaning, so a task's own cost (two pickles, a pipe) is lost in it
# Chunks handed out per worker before the first result is read: each worker has the next chunk waiting while the
# stage's loop takes in the last, and the sample stage cleans at most WORKERS x 2 x CHUNK_ROWS rows past the last
# one it needs (it stops at NUM_SAMPLES + EVAL_SAMPLES kept).
AHEAD_PER_WORKER = 2
# WORKERS=auto takes at most this many: a worker of the format stage holds the tokenizer (tens of MB for
# Llama 3's), and past a few dozen the stage's own loop, not the cleaning, sets the pace.
MAX_AUTO_WORKERS = 32
LOG_EVERY_S = 15.0  # a progress line this often on a long stage (the tqdm bar is shown only on a terminal)


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def resolve_workers(setting: str, rows: int) -> int:
    """WORKERS as a process count for `rows` rows: auto is one per usable CPU up to MAX_AUTO_WORKERS, and never
    more workers than chunks (a stage of a few dozen rows runs in its own process, with no pool to start)."""
    wanted = min(cpus(), MAX_AUTO_WORKERS) if setting == "auto" else int(setting)
    return max(1, min(wanted, -(-rows // CHUNK_ROWS)))


def chunks(items: list[T], size: int = CHUNK_ROWS) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the pool ----------------------------------------------------------------------------------------------------
_task: Callable[[Any], Any] | None = None


def _start_worker(fn: Callable[[Any], Any]) -> None:
    global _task
    _task = fn
    # The job's own process answers SIGINT and SIGTERM (job/stop.py): it stops reading results and shuts the pool
    # down, and a worker killed mid-chunk would only turn that into a broken pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    # One thread per worker: the workers are the parallelism. Set before the tokenizer runs here, it also
    # keeps huggingface/tokenizers from warning that the process was forked after its thread pool ran.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the job's process dies (SIGKILL, out of memory): an orphaned
    worker would wait on its task queue for ever, holding the job's stdout open."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the line above ran
        os._exit(1)


def _run_task(item: Any) -> Any:
    return _task(item)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, stage: str, wanted: Callable[[], int] | None = None
) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) for each item, in the order of `items`.

    With workers > 1, fn runs in that many worker processes, at most AHEAD_PER_WORKER items per worker ahead of
    the one the caller is reading; `items` is read only as far as that, so a caller that stops early (close the
    iterator: `contextlib.closing`) has had little more computed than it used. An exception raised by fn is
    raised here, at its item. `wanted`, if given, says how many more items the caller may still need (asked
    before each hand-out): fewer are handed out ahead when it is lower, so a walk about to stop wastes little.

    The workers are forked from this process, deliberately: they inherit fn with what it holds (the loaded
    tokenizer, the compiled cleaning rules) at no cost, and Python's string-hash seed, so the n-gram hashes a
    worker computes for decontamination (job/benchmark.py) match the ones this process holds. Forking is unsafe
    for a child that uses CUDA or a lock another thread held; these workers run only regular expressions,
    JSON and the Rust tokenizer, and never touch torch, CUDA, logging handlers or the parent's threads (as
    PyTorch's own DataLoader workers are forked from training processes with CUDA up). Under torchrun only
    rank 0 runs these stages, after NCCL is up: the same holds.
    """
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():  # Windows cannot fork: one process
        for item in items:
            yield item, fn(item)
        return
    # Freeze what exists now into the collector's permanent generation: a collection in a worker would otherwise
    # write to every object's header and copy the parent's heap page by page into each worker.
    gc.freeze()
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(fn,)
    )
    pending: deque = deque()
    source = iter(items)
    ended = False

    def hand_out() -> None:
        nonlocal ended
        limit = workers * AHEAD_PER_WORKER if wanted is None else min(workers * AHEAD_PER_WORKER, wanted())
        while not ended and len(pending) < max(1, limit):
            item = next(source, _END)
            if item is _END:
                ended = True
            else:
                pending.append((item, pool.submit(_run_task, item)))

    try:
        hand_out()
        while pending:
            item, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                raise LocalFailure(
                    f"a worker process of the {stage} stage died (killed by the system, most often for want of "
                    f"memory); run again with fewer WORKERS (now {workers}), or WORKERS=1 to work in one process"
                ) from None
            hand_out()  # the next chunks go out before this one's rows are taken in
            yield item, result
            hand_out()  # and again once they are: the caller may need fewer now
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


_END = object()


class Progress:
    """A log line every LOG_EVERY_S seconds: rows done, rows a second; silent for a stage shorter than that."""

    def __init__(self, stage: str, workers: int, total: int | None = None):
        self.stage, self.workers, self.total = stage, workers, total
        self.start = self.last = time.monotonic()

    def update(self, rows: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            return
        self.last = now
        of = f" of {self.total:,}" if self.total else ""
        rate = rows / (now - self.start)
        log.info("%s: %s rows%s, %.0f rows/s on %d worker(s)%s", self.stage, f"{rows:,}", of, rate, self.workers, extra)
