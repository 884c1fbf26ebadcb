"""The outside tester's hostile cases of issue 26 (disk, signals, the lock, inputs): each failed on the code before
the fix (a traceback, the wrong exit code, a silent mistake or a run blocked forever)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job import lock as run_lock
from job.benchmark_tasks import FIXTURES as BENCH_FIXTURE
from job.lock import RunLock
from job.paths import RunPaths


# --- the lock: a live pid is not proof of a live owner -------------------------------------------------------
def _owner(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": "t0", **fields}))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_live_pid_with_an_old_heartbeat_is_stale(tmp_path):
    """In a container a dead owner's pid is soon another process's: its heartbeat's age decides."""
    path = RunPaths(tmp_path).lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _owner(path, pid=other.pid)
        _age(path, run_lock.STALE_S + 1)
        with RunLock(path):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_under_our_own_pid_is_taken_over_at_once(tmp_path):
    """A restarted container runs the job under the same host name and pid (pid 1, say): that lock is ours."""
    path = RunPaths(tmp_path).lock
    _owner(path, started_at="2026-12-01T00:00:00+00:00")  # fresh heartbeat, this pid, an earlier start
    t0 = time.monotonic()
    with RunLock(path):
        assert json.loads(path.read_text())["started_at"] != "2026-12-01T00:00:00+00:00"
    assert time.monotonic() - t0 < run_lock.STALE_S


def test_a_live_owner_with_a_fresh_heartbeat_still_blocks(tmp_path):
    from job.errors import TransientError

    path = RunPaths(tmp_path).lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _owner(path, pid=other.pid)
        _age(path, run_lock.HEARTBEAT_S)  # one beat late is not stale
        with pytest.raises(TransientError, match=f"pid {other.pid}"):
            RunLock(path).acquire()
    finally:
        other.kill()
        other.wait()


# --- .env lines python-dotenv ignores ------------------------------------------------------------------------
def test_dotenv_lines_without_equals_are_named_not_silently_dropped(tmp_path, caplog):
    from job.config import load_settings

    token = "hf_" + "x1" * 20  # a token pasted without its NAME=: named by its line, never printed whole
    env_file = tmp_path / ".env"
    env_file.write_text(f"# settings\nNUM_SAMPLES=30\n\nEVAL_SAMPLES 8\n{token}\n  BATCH_SIZE\nSEED=7\n")
    with caplog.at_level("WARNING"):
        cfg = load_settings({}, env_file=env_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert cfg.NUM_SAMPLES == 30 and cfg.SEED == 7 and cfg.EVAL_SAMPLES == 100  # the rest still counts
    assert any("line 4 ignored ('EVAL_SAMPLES 8')" in w and "NAME=value" in w for w in warnings), warnings
    assert any("line 5 ignored ('hf_x…')" in w for w in warnings), warnings
    assert any("line 6 ignored ('BATCH_SIZE')" in w for w in warnings), warnings
    assert len(warnings) == 3 and not any(token in w for w in warnings)  # comments and blank lines are fine


# --- whole numbers too large for the libraries -----------------------------------------------------------------
def test_every_whole_number_setting_has_an_upper_bound_below_64_bits():
    from job.config import SETTINGS, ConfigError, load_settings

    ints = [n for n, f in SETTINGS.items() if f.type in (int, "int")]
    assert "BENCHMARK_LIMIT" in ints and len(ints) > 10
    for name in ints:
        f = SETTINGS[name]
        assert f.metadata["min"] is not None and f.metadata["max"] is not None, name
        assert f.metadata["max"] < 2**62, name  # counts reach numpy, torch and lm-eval as 64-bit integers
        with pytest.raises(ConfigError, match=rf"{name}={2**64}: must be between"):
            load_settings({name: str(2**64)}, env_file=None)


def test_benchmark_limit_above_64_bits_is_refused_up_front(demo_env, run_job, tmp_path):
    result = run_job(demo_env(tmp_path / "outputs", BENCHMARK_LIMIT=str(2**63 + 1)), "run")
    assert result.exit_code == 2, result.output[-2000:]
    assert f"BENCHMARK_LIMIT={2**63 + 1}: must be between 1 and" in result.message
    assert "questions per task" in result.message and "Traceback" not in result.output
    assert not (tmp_path / "outputs").exists()  # nothing ran


# --- benchmark questions whose answer is not one of the choices ------------------------------------------------
def _questions(folder: Path, task: str, edit: dict, at: int = 1, blank_first: bool = False) -> Path:
    """A copy of the bundled questions of `task` in `folder`, with question `at` (0-based) changed by `edit`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (BENCH_FIXTURE / f"{task}.jsonl").read_text().splitlines() if line.strip()]
    rows[at].update(edit)
    text = ("\n" if blank_first else "") + "".join(json.dumps(r) + "\n" for r in rows)
    (folder / f"{task}.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize(
    "task, edit, expect",
    [
        ("mmlu_anatomy", {"answer": -1}, "line 3: field 'answer' is -1; it must be the number of the right choice"),
        ("mmlu_anatomy", {"answer": None}, "line 3: field 'answer' is null"),
        ("mmlu_anatomy", {"answer": 4}, "field 'answer' is 4"),
        ("mmlu_anatomy", {"answer": 1.5}, "field 'answer' is 1.5"),
        ("medmcqa", {"cop": None}, "line 3: field 'cop' is null"),
        ("medqa_4options", {"label": -2}, "line 3: field 'label' is -2"),
        ("pubmedqa", {"final_decision": "perhaps"}, "field 'final_decision' is \"perhaps\"; it must be one of yes, no"),
        ("pubmedqa", {"final_decision": None}, "field 'final_decision' is null; it must be one of yes, no, maybe"),
    ],
    ids=["minus-one", "null", "past-the-end", "float", "medmcqa-null", "medqa-negative", "word", "word-null"],
)
def test_fetch_refuses_an_answer_that_is_not_a_choice(task, edit, expect, tmp_path):
    from job import benchmark
    from job.config import Settings, with_overrides
    from job.errors import ConfigError

    folder = _questions(tmp_path / "bench", task, edit, blank_first=True)  # line numbers count the blank line
    cfg = with_overrides(Settings(), BENCHMARK_DATA=str(folder), BENCHMARK_TASKS=task)
    with pytest.raises(ConfigError) as caught:
        benchmark.fetch(cfg, tmp_path / "out")
    message = str(caught.value)
    assert f"BENCHMARK_DATA file {folder / f'{task}.jsonl'}" in message and expect in message, message
    assert "Fix or delete that line" in message
    assert not (tmp_path / "out").exists()  # nothing half-fetched


def test_a_bad_answer_stops_the_job_before_training_with_exit_2(demo_env, run_job, tmp_path):
    folder = _questions(tmp_path / "bench", "mmlu_anatomy", {"answer": None})
    env = demo_env(tmp_path / "outputs", BENCHMARK_DATA=str(folder), BENCHMARK_TASKS="mmlu_anatomy", HUB_REPO_ID="")
    result = run_job(env, "run")
    assert result.exit_code == 2, result.output[-3000:]
    assert "mmlu_anatomy.jsonl, task mmlu_anatomy, line 2: field 'answer' is null" in result.message
    assert "Traceback" not in result.output and "stage train" not in result.output


def test_a_question_file_edited_after_fetching_is_refused_before_the_model_loads(demo_run_copy, run_job):
    paths = demo_run_copy.paths
    paths.benchmark.unlink()  # the benchmark stage runs again
    _questions(paths.benchmark_data, "mmlu_anatomy", {"answer": -1})
    result = run_job(demo_run_copy.env, "run")
    assert result.exit_code == 2, result.output[-3000:]
    assert f"{paths.benchmark_data / 'mmlu_anatomy.jsonl'}" in result.message
    assert "line 2: field 'answer' is -1" in result.message and "REDO=true" in result.message
    assert "Traceback" not in result.output


# --- a damaged eval/benchmark.json -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    ['{"tasks": {"overall": {"base": 0.5', '{"tasks": [], "raw": {}, "key": {}}', "[]"],
    ids=["truncated", "tasks-a-list", "a-list"],
)
def test_a_damaged_benchmark_file_is_scored_again_on_rerun(damage, demo_run_copy, run_job):
    paths = demo_run_copy.paths
    paths.benchmark.write_text(damage)
    result = run_job({**demo_run_copy.env, "REDO": "true", "BENCHMARK_LIMIT": "2"}, "run")  # benchmark reruns
    assert result.exit_code == 0, result.output[-3000:]
    assert "benchmark.json is damaged" in result.output and "scoring every task again" in result.output
    assert json.loads(paths.benchmark.read_text())["tasks"]["overall"]["n"] > 0


def test_a_damaged_benchmark_file_read_by_the_push_is_one_message_then_a_rerun_heals(demo_run_copy, run_job):
    import shutil

    paths = demo_run_copy.paths
    paths.benchmark.write_text('{"tasks": {"overall": "fine"}, "raw": {}, "key": {}}')
    shutil.rmtree(paths.push)  # the push stage runs again and reads the benchmark's results for its gate
    first = run_job(demo_run_copy.env, "run")
    assert first.exit_code == 2, first.output[-3000:]
    assert "benchmark.json is damaged (tasks.overall lacks one of" in first.message
    assert "moved to benchmark.json.damaged" in first.message and "Run the same command again" in first.message
    assert "Traceback" not in first.output

    again = run_job(demo_run_copy.env, "run")
    assert again.exit_code == 0, again.output[-3000:]
    assert "stage benchmark starting" in again.output
    assert json.loads(paths.benchmark.read_text())["tasks"]["overall"]["n"] > 0


# --- SIGTERM at any moment is exit 7 with a message ------------------------------------------------------------
def test_sigterm_while_python_imports_the_job_is_exit_7_with_a_message(demo_env, tmp_path):
    from conftest import KILLABLE_JOB, job_process

    env = {**demo_env(tmp_path / "outputs"), "HIPPO_KILL_AT": "job.imports:1:TERM"}
    proc = job_process(env, cwd=tmp_path, command=KILLABLE_JOB, timeout=120)
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-3000:])
    assert "stopped by SIGTERM before the job started; nothing to save" in proc.stderr
    assert "(exit 7: stopped by a signal" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_second_sigterm_while_shutting_down_keeps_exit_7(demo_env, tmp_path):
    from conftest import KILLABLE_JOB, job_process

    out = tmp_path / "outputs"
    env = demo_env(out, STAGES="sample,format", HUB_REPO_ID="")
    env["HIPPO_KILL_AT"] = "format.finished:1:TERM,job.exit:1:TERM"  # the second arrives as the process ends
    proc = job_process(env, cwd=tmp_path, command=KILLABLE_JOB, timeout=300)
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-3000:])
    assert "stopped by SIGTERM; finished stages are kept" in proc.stderr and "Traceback" not in proc.stderr
    assert not RunPaths(out / env["RUN_NAME"]).lock.exists()  # the shutdown finished: the lock was released


# --- full and read-only disks ----------------------------------------------------------------------------------
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
TRAIN_ONLY = {"STAGES": "sample,format,train", "HUB_REPO_ID": "", "SAVE_STEPS": "2", "NUM_SAMPLES": "16"}


@needs_dev_full
@pytest.mark.parametrize("how", ["free-space", "probe-write"])
def test_a_full_disk_during_a_checkpoint_save_is_exit_6(how, demo_env, run_job, tmp_path, monkeypatch):
    """torch.save reports the kernel's ENOSPC as RuntimeError("... file write failed"), with no errno: the disk
    itself is checked. `free-space`: statvfs says the disk is full; `probe-write`: it claims room, but a write
    there fails with ENOSPC."""
    import errno
    import shutil
    from collections import namedtuple

    import torch

    env = demo_env(tmp_path / "outputs", **TRAIN_ONLY)
    paths = RunPaths(tmp_path / "outputs" / env["RUN_NAME"])
    real_save, real_usage = torch.save, shutil.disk_usage

    def save(obj, f, *args, **kwargs):  # the checkpoint's files go to a disk that takes nothing: /dev/full
        full = isinstance(f, (str, os.PathLike)) and str(paths.checkpoints) in str(f)
        return real_save(obj, "/dev/full" if full else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if how == "free-space":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(
            shutil, "disk_usage", lambda p: usage(2**40, 2**40, 0) if str(paths.root) in str(p) else real_usage(p)
        )
    else:
        paths.checkpoints.mkdir(parents=True)
        (paths.checkpoints / f".disk-probe-{os.getpid()}").symlink_to("/dev/full")

    result = run_job(env, "run")

    assert result.exit_code == 6, result.output[-3000:]
    message = result.message
    assert f"train: writing {paths.checkpoints}" in message and "RuntimeError" in message, message
    assert "GiB free on the disk of" in message and "run the same command again" in message
    if how == "probe-write":
        assert f"disk full writing {paths.checkpoints} ({os.strerror(errno.ENOSPC)}" in message
    assert "Traceback" not in result.output
    assert not list(paths.checkpoints.glob(".disk-probe-*"))  # the probe leaves nothing behind


def test_an_error_in_training_on_a_disk_with_room_stays_a_bug(demo_env, run_job, tmp_path, monkeypatch):
    """The check is of the disk, not of the error: a RuntimeError on a disk that takes the probe is exit 1."""
    import torch

    def broken(*a, **k):
        raise RuntimeError("a defect in saving")

    monkeypatch.setattr(torch, "save", broken)
    result = run_job(demo_env(tmp_path / "outputs", **TRAIN_ONLY), "run")
    assert result.exit_code == 1, result.output[-3000:]
    assert "a defect in saving" in result.output


@needs_dev_full
def test_a_full_disk_at_start_is_exit_6_naming_the_folder_and_its_free_space(demo_env, run_job, tmp_path):
    env = demo_env(tmp_path / "outputs", HUB_REPO_ID="")
    paths = RunPaths(tmp_path / "outputs" / env["RUN_NAME"])
    paths.root.mkdir(parents=True)
    (paths.root / ".write-test").symlink_to("/dev/full")  # the start's test write lands on a disk that is full

    result = run_job(env, "run")

    assert result.exit_code == 6, result.output[-3000:]
    message = result.message
    assert f"OUTPUT_DIR={env['OUTPUT_DIR']!r}: disk full writing {paths.root}" in message, message
    assert f"GiB free on the disk of {paths.root}" in message and "Free space on that disk" in message
    assert "Traceback" not in result.output


def test_a_read_only_disk_at_start_is_exit_6(demo_env, run_job, tmp_path, monkeypatch):
    import errno
    import pathlib

    env = demo_env(tmp_path / "outputs", HUB_REPO_ID="")
    root = tmp_path / "outputs" / env["RUN_NAME"]
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a read-only mount answers
        if self == root:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    result = run_job(env, "run")
    assert result.exit_code == 6, result.output[-3000:]
    message = result.message
    assert f"cannot write {root} (Read-only file system; " in message and "GiB free on the disk of" in message
    assert "remount it writable or choose a folder on another disk" in message


@needs_dev_full
def test_a_write_error_names_the_file_and_its_own_disk(tmp_path, monkeypatch):
    """write() and flush() errors carry no file name: the file is found in the traceback, and the free space is
    of its disk, not of the current folder's."""
    from job.errors import LocalFailure, classify

    target = tmp_path / "eval" / "metrics.json"
    target.parent.mkdir()
    target.symlink_to("/dev/full")
    monkeypatch.chdir("/")

    def stage_writes():
        with open(target, "w") as f:
            f.write("{}")
            f.flush()

    with pytest.raises(OSError) as caught:
        stage_writes()
    assert caught.value.filename is None  # what the kernel's error gives
    err = classify(caught.value, "evaluate")
    assert isinstance(err, LocalFailure)
    assert f"disk full writing {target}" in str(err) and f"free on the disk of {target}" in str(err), str(err)
    assert "a file" not in str(err) and "disk of /)" not in str(err)


def test_a_write_error_with_no_file_anywhere_names_the_folders_written(tmp_path, monkeypatch):
    import errno

    from job import errors

    monkeypatch.setattr(errors, "folders_written", [str(tmp_path / "run"), str(tmp_path / "hf")])
    err = errors.classify(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "push")
    assert "a file it did not name" in str(err)
    assert f"free on the disk of {tmp_path}" in str(err) and str(err).count("GiB free") == 2


def test_a_done_stage_without_its_time_loads(tmp_path):
    """Only the skip's log line reads finished_at; a hand-edited record without it was a KeyError there."""
    from job.pipeline import load_manifest

    paths = RunPaths(tmp_path)
    paths.manifest.write_text('{"stages": {"sample": {"status": "done", "fingerprint": {}, "artifacts": []}}}')
    assert load_manifest(paths)["stages"]["sample"]["finished_at"] == "time not recorded"
