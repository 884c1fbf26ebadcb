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
