"""Test hook: signal this process at a named point, as a spot preemption would. For tests only.

`HIPPO_KILL_AT=<point>:<n>[:TERM]` sends SIGKILL (or SIGTERM with `:TERM`) to this process at the
n-th `maybe_die(point)` call (or, where the caller passes `n`, e.g. the optimizer step, when that
number equals n). Several such specs may be given, separated by commas (a SIGTERM, then another one
while the job shuts down). `HIPPO_KILL_RANK=<r>` limits them to the process of torchrun's RANK r.
Unset, which is always the case outside the tests, `maybe_die` returns at once. Points: `job.imports`
(`python -m job` still importing), `job.exit` (the command has returned, the process is ending),
`sample.partial`, `<stage>.finished` (files written, manifest not yet), `train.step`, `train.save`
(checkpoint files written, marker not yet), `train.adapter`, `push.staged` (before the upload).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()


def maybe_die(point: str, n: int | None = None) -> None:
    specs = [s for s in os.environ.get("HIPPO_KILL_AT", "").split(",") if s.startswith(point + ":")]
    if not specs or os.environ.get("HIPPO_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _hits[point] += 1
    for spec in specs:
        at, _, sig = spec[len(point) + 1 :].partition(":")
        if (_hits[point] if n is None else n) == int(at):
            os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)
