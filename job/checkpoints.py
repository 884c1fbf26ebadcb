"""Checkpoints that survive SIGKILL and SIGTERM, and resume only under the fingerprint they were trained under.

Transformers writes checkpoint-N/ file by file, so a kill can leave a partial folder. Ours count only once
`COMPLETE` (written last, fsynced) exists; we delete the unmarked ones on resume and do retention ourselves after
the marker is written, because the Trainer's own rotation runs before a new checkpoint is marked and could leave
none complete. On SIGTERM (job/stop.py) the running step finishes, the Trainer saves that step's checkpoint
through the same path (so it is marked), and the train stage raises Stopped: a preemption notice costs no steps.
Each checkpoint carries the fingerprint it was trained under (FINGERPRINT, written before the marker: the
settings, the data and the base model, job/provenance.py); a run resumes only from a checkpoint with its own
fingerprint, and moves the others aside (paths.stale_checkpoints), so changed settings or data train afresh.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from job import provenance, stop
from job.files import atomic_write_text
from job.model import is_main_process

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
# The CPU thread count a checkpoint was trained with (see pin_cpu_threads), written before the marker.
THREADS = "cpu_threads.json"
# The fingerprint the checkpoint was trained under (job/provenance.py), written before the marker.
FINGERPRINT = "fingerprint.json"
# What resuming reads: without any of these the Trainer would crash or silently restart the schedule.
REQUIRED = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt")


def _step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints with a completeness marker, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if (p / MARKER).is_file() and _step(p) >= 0]
    return sorted(found, key=_step, reverse=True)


def checkpoint_loads(path: Path) -> bool:
    """Cheap integrity check: every tensor file opens and the trainer state parses."""
    import torch
    from safetensors import safe_open

    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        log.warning("checkpoint %s lacks %s; trying an older one", path.name, ", ".join(missing))
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
        for f in [*path.glob("*.pt"), *path.glob("*.pth")]:  # optimizer, scheduler, scaler, RNG states
            torch.load(f, map_location="cpu", weights_only=False)
        return any(path.glob("adapter_model.safetensors"))
    except Exception as e:  # any failure means: do not resume from this one
        log.warning("checkpoint %s cannot be loaded (%s: %s); trying an older one", path.name, type(e).__name__, e)
        return False


def resume_point(ckpt_dir: Path, fingerprint: str | None = None, stale_dir: Path | None = None) -> Path | None:
    """Newest complete checkpoint that loads; partial folders are removed first. With `fingerprint`, only a
    checkpoint trained under that one counts: the others (other settings or data, or none recorded) are moved
    into `stale_dir`, never resumed and never deleted."""
    if not ckpt_dir.is_dir():
        return None
    if is_main_process():
        for p in ckpt_dir.glob("checkpoint-*"):
            if not (p / MARKER).is_file():
                log.info("removing incomplete checkpoint %s (the job was stopped while writing it)", p.name)
                shutil.rmtree(p, ignore_errors=True)
    candidates = complete_checkpoints(ckpt_dir)
    if fingerprint is not None:
        stale = [p for p in candidates if provenance.checkpoint_fingerprint(p) != fingerprint]
        candidates = [p for p in candidates if p not in stale]
        if stale and is_main_process():
            _move_aside(stale, fingerprint, stale_dir or ckpt_dir.with_name(ckpt_dir.name + "-stale"))
    for p in candidates:
        if checkpoint_loads(p):
            return p
        if is_main_process():
            # Training redoes this step and writes its checkpoint here again: unmark it first, so a kill
            # during that write cannot leave new files behind an old marker.
            (p / MARKER).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
    return None


def _move_aside(stale: list[Path], fingerprint: str, stale_dir: Path) -> None:
    """Move checkpoints of another fingerprint into stale_dir (a new folder beside checkpoints/)."""
    stale_dir.mkdir(parents=True, exist_ok=False)
    for p in stale:
        os.replace(p, stale_dir / p.name)
    names = ", ".join(p.name for p in stale)
    log.warning(
        "%s trained under other settings or data (fingerprint %s; this run's is %s): moved to %s, not resumed",
        names,
        ", ".join(sorted({(provenance.checkpoint_fingerprint(stale_dir / p.name) or "none")[:12] for p in stale})),
        fingerprint[:12],
        stale_dir.name,
    )


def callback(keep: int, fingerprint: dict | None = None):
    """The Trainer callback that marks each checkpoint once the Trainer has written it (THREADS and `fingerprint`
    first, the marker last), then keeps the newest `keep`; at a step's end, a stop agreed by the ranks (SIGTERM)
    saves that step and ends training."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop.agreed():  # SIGTERM (job/stop.py) on any rank: every rank saves this step, then stops
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its RNG state file
            if state.is_world_process_zero:
                import torch

                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                atomic_write_text(path / THREADS, json.dumps({"torch_threads": torch.get_num_threads()}) + "\n")
                if fingerprint is not None:  # what this checkpoint was trained under: settings, data, base model
                    atomic_write_text(path / FINGERPRINT, json.dumps(fingerprint, indent=1, default=str) + "\n")
                atomic_write_text(path / MARKER, f"step {state.global_step}\n")
                for old in complete_checkpoints(Path(args.output_dir))[keep:]:
                    # Unmark first: a kill during the delete then leaves a folder resume removes,
                    # never a "complete" one with files missing.
                    (old / MARKER).unlink(missing_ok=True)
                    shutil.rmtree(old, ignore_errors=True)
            return control

    return CheckpointMarker()


def pin_cpu_threads(resume: Path | None) -> None:
    """Use the intra-op thread count the checkpoint was trained with.

    CPU kernels (MKL/oneDNN matmuls, ATen reductions) split their float sums by thread count, and
    PyTorch takes its default count from the process's CPU affinity or OMP_NUM_THREADS, which can
    differ between the first process and a resumed one (another machine after a preemption, a
    different cpuset). One resumed stretch at another count changes the last bits of the gradients
    (the 12-step test run at 1 thread instead of 2: 2.1e-7 in the final adapter), so the resumed run
    is no longer the uninterrupted one. Checkpoints from before this file existed keep the default.
    """
    import torch

    try:
        saved = int(json.loads((resume / THREADS).read_text())["torch_threads"]) if resume else 0
    except (OSError, ValueError, KeyError, TypeError):
        saved = 0
    if saved > 0 and saved != torch.get_num_threads():
        log.info(
            "using %d CPU threads as the checkpoint did (this process defaulted to %d), so the resumed run "
            "sums floats in the same order as the uninterrupted one",
            saved,
            torch.get_num_threads(),
        )
        torch.set_num_threads(saved)
