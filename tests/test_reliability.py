"""What clouds and machines do to a run: full disks, refused or unreachable Hubs, two runs at once, odd card
metadata. Each case failed (a traceback, the wrong exit code, or a corrupted run) before issue 16's fixes."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from huggingface_hub.errors import HfHubHTTPError

from job import lock as run_lock
from job import push
from job.config import load_settings
from job.errors import BAD_CONFIG, LOCAL_FAILURE, OK, ConfigError, LocalFailure, TransientError
from job.files import atomic_write_text
from job.lock import RunLock
from job.paths import RunPaths
from job.report import card_data


# --- the Hub, classified by the libraries' exception types -------------------------------------------------
def _client(error: BaseException):
    class Client:
        def __init__(self, *a, **k):
            pass

        def create_repo(self, *a, **k):
            raise error

    return Client


def _http(status: int) -> HfHubHTTPError:
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status}", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    "error, expected",
    [
        (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), TransientError),  # not an OSError
        (httpx.ReadTimeout("timed out"), TransientError),
        (_http(503), TransientError),
        (_http(429), TransientError),
        (_http(401), ConfigError),
        (_http(404), ConfigError),
        (PermissionError(errno.EACCES, "Permission denied", "/outputs/run/push"), LocalFailure),  # local: no retry
        (OSError(errno.ENOSPC, "No space left on device"), LocalFailure),
    ],
    ids=["connect", "timeout", "503", "429", "401", "404", "permission", "disk-full"],
)
def test_push_failures_are_classified_by_type(error, expected, monkeypatch, tmp_path):
    monkeypatch.setattr(push, "HfApi", _client(error))
    cfg = load_settings({"HUB_REPO_ID": "alice/med", "HF_TOKEN": "hf_x"}, env_file=None)
    with pytest.raises(expected) as caught:
        push.upload(cfg, tmp_path)
    assert "HUB_REPO_ID='alice/med'" in str(caught.value)


def test_an_unclassified_error_stays_a_bug(monkeypatch, tmp_path):
    monkeypatch.setattr(push, "HfApi", _client(KeyError("repo_id")))
    cfg = load_settings({"HUB_REPO_ID": "alice/med", "HF_TOKEN": "hf_x"}, env_file=None)
    with pytest.raises(KeyError):
        push.upload(cfg, tmp_path)


# --- a full disk -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_disk_full_is_one_message_no_temp_file_and_a_rerun_works(demo_env, run_job, tmp_path):
    """The kernel's own ENOSPC: the format stage's temporary file is a link to /dev/full, so its write fails."""
    env = demo_env(tmp_path / "outputs", STAGES="sample,format", HUB_REPO_ID="")
    paths = RunPaths(tmp_path / "outputs" / env["RUN_NAME"])
    paths.data.mkdir(parents=True)
    tmp = paths.train_tokens.with_name(f".{paths.train_tokens.name}.tmp")
    tmp.symlink_to("/dev/full")

    full = run_job(env, "run")

    assert full.exit_code == LOCAL_FAILURE, full.output[-3000:]
    assert "disk full writing" in full.message and "train_tokens.jsonl" in full.message
    assert "GiB free" in full.message and "run the same command again" in full.message
    assert "Traceback" not in full.output
    assert not list(paths.root.rglob("*.tmp")) and not tmp.is_symlink()
    stages = json.loads(paths.manifest.read_text())["stages"]
    assert stages["sample"]["status"] == "done" and stages["format"]["status"] == "running"

    again = run_job(env, "run")  # space freed (the link is gone): the same command finishes the job

    assert again.exit_code == OK, again.output[-3000:]
    assert json.loads(paths.manifest.read_text())["stages"]["format"]["status"] == "done"
    assert "stage sample    already done" in again.output


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as caught:
        atomic_write_text(target, "new")
    assert caught.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --- one run per run directory -----------------------------------------------------------------------------
def _owner(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": "t0", **fields}))


def test_a_live_owner_keeps_the_run_directory(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _owner(RunPaths(tmp_path).lock, pid=other.pid, started_at="2026-11-28T08:00:00+00:00")
        with pytest.raises(TransientError, match=rf"pid {other.pid}, started 2026-11-28T08:00:00"):
            RunLock(RunPaths(tmp_path).lock).acquire()
    finally:
        other.kill()
        other.wait()
    # Its process is gone now: the lock it left is taken over at once, not after a timeout.
    with RunLock(RunPaths(tmp_path).lock) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (RunPaths(tmp_path).lock).exists()  # released


def test_a_lock_from_another_machine_expires_with_its_heartbeat(tmp_path, monkeypatch):
    path = RunPaths(tmp_path).lock
    _owner(path, host="spot-vm-that-was-preempted", pid=1)
    with pytest.raises(TransientError, match="spot-vm-that-was-preempted"):
        RunLock(path).acquire()  # fresh heartbeat: that machine may still be running
    stale = time.time() - run_lock.STALE_S - 1
    os.utime(path, (stale, stale))
    lock = RunLock(path)
    lock.acquire()
    try:
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    finally:
        lock.release()


def test_the_owner_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with RunLock(RunPaths(tmp_path).lock) as lock:
        first = json.loads(lock.path.read_text())["heartbeat_at"]
        time.sleep(0.3)
        assert json.loads(lock.path.read_text())["heartbeat_at"] > first


def test_a_torn_lock_file_is_not_a_deadlock(tmp_path):
    path = RunPaths(tmp_path).lock
    path.write_text('{"host": "x", "pi')
    stale = time.time() - run_lock.STALE_S - 1
    os.utime(path, (stale, stale))
    with RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()


# --- the model card's metadata -----------------------------------------------------------------------------
def test_card_metadata_is_valid_quoted_yaml():
    cfg = load_settings({"MODEL_LICENSE": "mit\nbase_model: evil/model\ntags: [x]"}, env_file=None)
    meta = yaml.safe_load(card_data(cfg).to_yaml())
    assert meta["license"] == "mit\nbase_model: evil/model\ntags: [x]"  # one value, nothing injected
    assert meta["base_model"] == "meta-llama/Llama-3.2-3B-Instruct" and meta["datasets"] == [
        "ruslanmv/ai-medical-chatbot"
    ]
    assert "x" not in meta["tags"]


def test_several_gpus_in_one_process_say_how_to_launch(demo_env, run_job, tmp_path, monkeypatch):
    """A multi-GPU machine without torchrun: one message before anything loads (TRL would refuse DataParallel
    with a traceback after loading the model); under torchrun (WORLD_SIZE set) the check stays quiet."""
    import torch

    from job.model import check_one_process_per_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    result = run_job(demo_env(tmp_path / "outputs", HUB_REPO_ID=""), "run")

    assert result.exit_code == BAD_CONFIG, result.output[-2000:]
    assert "4 GPUs are visible" in result.message and "torchrun --nproc_per_node=4 -m job" in result.message
    assert "CUDA_VISIBLE_DEVICES=0" in result.message and "Traceback" not in result.output
    assert not list((tmp_path / "outputs").rglob("*.jsonl"))  # nothing ran
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_one_process_per_gpu()
