"""Training under torchrun with DDP on CPU (gloo): two processes, one set of outputs, written by rank 0."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from conftest import job_process

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
