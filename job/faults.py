"""Test hook: signal this process at a named point, as a spot preemption would. For tests only.

`HIPPO_KILL_AT=<point>:<n>[:TERM]` sends SIGKILL (or SIGTERM with `:TERM`) to this process at the
n-th `maybe_die(point)` call (or, where the caller passes `n`, e.g. the optimizer step, when that
number equals n). Unset, which is always the case outside tests/test_resume.py, `maybe_die` returns
at once. Points: `sample.partial`, `<stage>.finished` (files written, manifest not yet), `train.step`,
`train.save` (checkpoint files written, marker not yet), `train.adapter`, `push.staged` (before the
upload).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()


def maybe_die(point: str, n: int | None = None) -> None:
    spec = os.environ.get("HIPPO_KILL_AT", "")
    if not spec.startswith(point + ":"):
        return
    at, _, sig = spec[len(point) + 1 :].partition(":")
    _hits[point] += 1
    if (_hits[point] if n is None else n) == int(at):
        os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)
