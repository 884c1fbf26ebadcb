"""Training under torchrun with DDP on CPU (gloo): two processes, one set of outputs, written by rank 0."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from conftest import KILLABLE_JOB, job_process

from job.paths import RunPaths

# Loaded into every rank through PYTHONPATH: records each file opened for writing under the run directory,
# with the rank that opened it.
_SPY = """
import builtins, io, os
_open = io.open
def _spy_open(file, mode="r", *a, **k):
    root = os.environ.get("SPY_ROOT")
    if root and any(c in mode for c in "wax+") and str(file).startswith(root):
        with _open(os.path.join(os.environ["SPY_LOG"], "rank%s" % os.environ.get("RANK", "0")), "a") as f:
            f.write(str(file) + "\\n")
    return _open(file, mode, *a, **k)
builtins.open = io.open = _spy_open  # pathlib's Path.open goes through io.open
"""


@pytest.mark.slow
def test_torchrun_two_processes_one_writer(tmp_path, demo_env):
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(textwrap.dedent(_SPY))
    out = tmp_path / "outputs"
    small = {"NUM_SAMPLES": "24", "BATCH_SIZE": "2", "EPOCHS": "1", "SAVE_STEPS": "3", "STAGES": "sample,format,train"}
    env = {**demo_env(out, **small), "PYTHONPATH": str(spy), "SPY_ROOT": str(out), "SPY_LOG": str(spy)}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:  # a free port, so parallel test runs don't collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "job")
    proc = job_process(env, cwd=tmp_path, command=torchrun)
    assert proc.returncode == 0, proc.stderr[-4000:]

    run_dir = out / env["RUN_NAME"]
    manifest = json.loads(RunPaths(run_dir).manifest.read_text())
    assert [manifest["stages"][s]["status"] for s in ("sample", "format", "train")] == ["done"] * 3
    log = json.loads(RunPaths(run_dir).train_log.read_text())
    assert log["train"]["world_size"] == 2
    # 24 conversations, 2 per rank per step, 2 ranks: 6 optimizer steps (as many as batch 4 on one GPU)
    assert log["metrics"]["epoch"] == 1.0 and log["log_history"][-2]["step"] == 6
    assert (RunPaths(run_dir).adapter / "adapter_model.safetensors").is_file()

    rank0 = (spy / "rank0").read_text().splitlines()
    rank1 = (spy / "rank1").read_text().splitlines() if (spy / "rank1").exists() else []
    assert any("manifest.json" in p for p in rank0) and any("adapter" in p for p in rank0)
    # The second rank writes nothing but its own RNG state into checkpoints (the Trainer's per-rank file).
    assert all("rng_state_1" in Path(p).name for p in rank1), rank1


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, demo_env):
    """A SIGTERM that reaches rank 1 only: both ranks save the same step's checkpoint and exit 7 (STOPPED)."""
    from job.checkpoints import MARKER, complete_checkpoints

    out = tmp_path / "outputs"
    small = {"NUM_SAMPLES": "24", "BATCH_SIZE": "2", "SAVE_STEPS": "100", "STAGES": "sample,format,train"}
    small["EPOCHS"] = "1"
    env = {**demo_env(out, **small), "OMP_NUM_THREADS": "1"}
    env.update(HIPPO_KILL_AT="train.step:3:TERM", HIPPO_KILL_RANK="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *KILLABLE_JOB)
    proc = job_process(env, cwd=tmp_path, command=torchrun, timeout=300)

    assert proc.returncode != 0, proc.stderr[-4000:]  # torchrun reports its ranks' failure as its own
    assert proc.stderr.count("(exit 7: stopped by a signal") == 2, proc.stderr[-4000:]  # each rank's own message
    assert "another rank received SIGTERM" in proc.stderr
    checkpoints = complete_checkpoints(RunPaths(out / env["RUN_NAME"]).checkpoints)
    assert [c.name for c in checkpoints] == ["checkpoint-3"], proc.stderr[-4000:]
    assert (checkpoints[0] / MARKER).read_text() == "step 3\n"
    assert sorted(p.name for p in checkpoints[0].glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_ranks_wait_for_rank_0_far_longer_than_nccls_default(monkeypatch):
    """Rank 0 alone evaluates, judges and benchmarks for what can be hours; NCCL's 10-minute default would abort
    the ranks waiting for it."""
    from datetime import timedelta

    import torch.distributed as dist

    from job import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(k))
    pipeline._init_distributed()
    assert len(calls) == 1 and calls[0]["timeout"] >= timedelta(hours=12), calls
