"""`python tests/faults.py [ARGS]`: `python -m job ARGS` that signals itself at a named point, as a spot preemption
would. For the kill tests only: the job has no fault-injection code; this launcher wraps the functions at whose
end a point lies, then runs the job's own `main`.

`HIPPO_KILL_AT=<point>:<n>[:TERM]` sends SIGKILL (or SIGTERM with `:TERM`) at the n-th time the process reaches
`point` (for `train.step` and `train.save`: at optimizer step n). Several specs may be given, separated by commas (a
SIGTERM, then another one while the job shuts down). `HIPPO_KILL_RANK=<r>` limits them to torchrun's RANK r. Points:
  job.imports       the SIGTERM handler is installed (job/stop.py), the job not yet imported
  job.exit          the command has returned, the process is ending
  sample.partial    the sample stage has written train.jsonl, not yet eval.jsonl
  <stage>.finished  the stage's files are written, the manifest does not say so yet
  train.step        an optimizer step has ended, before the job's own callback looks for a SIGTERM
  train.save        the Trainer has written checkpoint-n, the job has not yet marked it complete (rank 0)
  train.adapter     training is done and the adapter written to adapter.tmp, not yet moved to adapter/
  push.staged       push/ is staged, nothing uploaded
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections import Counter
from pathlib import Path

_hits: Counter = Counter()


def die(point: str, n: int | None = None) -> None:
    """Signal this process if HIPPO_KILL_AT names `point` at this hit (or at step `n`, where given)."""
    specs = [s for s in os.environ.get("HIPPO_KILL_AT", "").split(",") if s.startswith(point + ":")]
    if not specs or os.environ.get("HIPPO_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _hits[point] += 1
    for spec in specs:
        at, _, sig = spec[len(point) + 1 :].partition(":")
        if (_hits[point] if n is None else n) == int(at):
            os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)


def _then_die(fn, point: str):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        die(point)
        return out

    return wrapped


def _install() -> None:
    """Put the points in place: wrap each stage's `run`, the functions that end a partial write, and every Trainer's
    callbacks (first in line, so a SIGTERM at step n is seen by the job's callback at the same step)."""
    from transformers import TrainerCallback, trainer_callback

    from job import pipeline, push, sample
    from job.paths import RunPaths

    for stage, run in list(pipeline.RUNNERS.items()):
        pipeline.RUNNERS[stage] = wrapped = _then_die(run, f"{stage}.finished")
        setattr(sys.modules[run.__module__], run.__name__, wrapped)  # the pipeline calls train.run by name
    sample.write_jsonl = _then_die(sample.write_jsonl, "sample.partial")  # its first file is train.jsonl
    push.stage_files = _then_die(push.stage_files, "push.staged")

    replace = os.replace

    def replace_adapter(src, dst, *args, **kwargs):
        if Path(dst) == RunPaths(Path(dst).parent).adapter:
            die("train.adapter")
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_adapter

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            die("train.step", state.global_step)

        def on_save(self, args, state, control, **kwargs):  # the Trainer calls it once the checkpoint is written
            if state.is_world_process_zero:
                die("train.save", state.global_step)

    init = trainer_callback.CallbackHandler.__init__

    def init_then_kill_first(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.callbacks.insert(0, Kill())

    trainer_callback.CallbackHandler.__init__ = init_then_kill_first


if __name__ == "__main__":
    from job import stop

    stop.install()  # what `python -m job` does first thing, before its slow imports
    die("job.imports")
    _install()
    from job.__main__ import main

    code = main()
    die("job.exit")
    sys.exit(code)
