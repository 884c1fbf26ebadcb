"""The SkyPilot task YAMLs agree with the job: settings, secrets, exit codes, entrypoint, launch line.

Offline, no cloud credentials: SkyPilot parses and validates the YAMLs exactly as `sky jobs launch`
would before it provisions anything. Needs `pip install 'skypilot>=0.10,<1'` (the `cloud` extra).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from job import errors
from job.config import SETTINGS, Settings, load_settings

NOT_INSTALLED = "SkyPilot is not installed: pip install 'skypilot>=0.10,<1'"
sky = pytest.importorskip("sky", reason=NOT_INSTALLED)
if not hasattr(sky, "Task"):  # only this repository's sky/ folder, imported as a namespace package
    pytest.skip(NOT_INSTALLED, allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "sky").glob("*.yaml"))
MULTINODE = ROOT / "sky" / "train-multinode.yaml"
SECRETS = {name for name, f in SETTINGS.items() if f.metadata["secret"]}
# Where a YAML's envs may differ from the schema's defaults, and why.
INTENDED = {
    "OUTPUT_DIR": "/outputs",  # the bucket mount, not a folder on the machine's disk
    "RUN_NAME": None,  # any stable name; each YAML has its own so they never share a run directory
}
LAUNCH = {"OUTPUT_BUCKET": "s3://example-bucket/hippocratically"}  # what `--env OUTPUT_BUCKET=...` supplies

ids = [p.name for p in YAMLS]


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def task(path: Path):
    """The task as `sky jobs launch PATH --env OUTPUT_BUCKET=...` builds it."""
    return sky.Task.from_yaml_config(raw(path), env_overrides=list(LAUNCH.items()))


def test_there_are_task_yamls():
    assert {p.name for p in YAMLS} >= {"train.yaml", "train-multinode.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_yaml_loads_with_skypilot(path):
    t = sky.Task.from_yaml(str(path))  # exactly what the CLI reads, no overrides
    assert t.run and t.resources
    assert task(path).storage_mounts  # and with the bucket given at launch


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_envs_are_settings_and_never_secrets(path):
    envs = raw(path)["envs"]
    unknown = sorted(set(envs) - set(SETTINGS))
    assert not unknown, f"{path.name}: envs that are not settings in job/config.py: {unknown}"
    leaked = sorted(set(envs) & SECRETS)
    assert not leaked, f"{path.name}: secrets belong under secrets:, not envs: {leaked}"


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_env_values_parse_and_equal_schema_defaults(path):
    envs = {k: str(v) for k, v in raw(path)["envs"].items()}
    resolved = load_settings(environ=envs, env_file=None)  # the job's own parsing and validation
    defaults = Settings()
    differ = {
        f.name: (getattr(resolved, f.name), getattr(defaults, f.name))
        for f in fields(Settings)
        if getattr(resolved, f.name) != getattr(defaults, f.name) and f.name not in INTENDED
    }
    # The YAMLs cannot import the schema: a changed default (BENCHMARK_TASKS' from job/benchmark_tasks) is written in.
    fix = "\n".join(f'  {n}: "{str(d).lower() if isinstance(d, bool) else d}"' for n, (_, d) in differ.items())
    assert not differ, f"{path.name}: envs differ from job/config.py defaults (yaml, schema): {differ}; write\n{fix}"
    for name, value in INTENDED.items():
        assert name in envs, f"{path.name}: set {name} in envs"
        if value is not None:
            assert envs[name] == value, f"{path.name}: {name} should be {value!r}"


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_secrets_are_declared_as_secrets(path):
    declared = raw(path).get("secrets") or {}
    assert set(declared) == SECRETS
    t = task(path)
    given = set(t.secrets) | {ref.name for ref in t.managed_secret_refs}
    assert given == SECRETS
    assert not (set(t.envs) & SECRETS)


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_recovery_retries_exactly_the_retryable_exit_codes(path):
    for r in task(path).resources:
        recovery = r.job_recovery
        assert sorted(recovery["recover_on_exit_codes"]) == sorted(errors.RETRYABLE)
        assert errors.BAD_CONFIG not in recovery["recover_on_exit_codes"]
        # SkyPilot reruns any other non-zero exit while it has restarts left: 0 keeps bad settings final.
        assert recovery["max_restarts_on_errors"] == 0


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_spot_first_then_the_same_cards_on_demand(path):
    candidates = [(r.accelerators, r.use_spot) for r in task(path).resources]
    markets = [spot for _, spot in candidates]
    assert markets[0] is True
    assert markets == sorted(markets, reverse=True), "every spot candidate comes before every on-demand one"
    spot = [acc for acc, s in candidates if s]
    on_demand = [acc for acc, s in candidates if not s]
    assert on_demand == spot, "the on-demand fallback offers the same cards, in the same order"
    counts = {n for acc in spot for n in acc.values()}
    assert len(counts) == 1, "one GPU count for all candidates, so a recovery keeps the world size"


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_image_is_a_docker_image(path):
    for r in task(path).resources:
        assert r.extract_docker_image(), "resources.image_id must be docker:IMAGE"


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_bucket_is_mounted_at_output_dir_with_a_stable_run_name(path):
    t = task(path)
    output_dir = t.envs["OUTPUT_DIR"]
    assert output_dir in t.storage_mounts, f"{path.name}: mount the bucket at OUTPUT_DIR={output_dir}"
    storage = t.storage_mounts[output_dir]
    assert storage.source == LAUNCH["OUTPUT_BUCKET"]
    assert storage.mode.value == "MOUNT_CACHED"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", t.envs["RUN_NAME"]), "a fixed RUN_NAME, no shell expansion"


def test_each_yaml_has_its_own_run_name():
    names = [raw(p)["envs"]["RUN_NAME"] for p in YAMLS]
    assert len(set(names)) == len(names)


def _dockerfile(instruction: str) -> list[str] | None:
    """Arguments of each INSTRUCTION line of docker/Dockerfile (continuations joined); None if there is none."""
    dockerfile = ROOT / "docker" / "Dockerfile"
    if not dockerfile.exists():
        return None
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pattern = rf"^\s*{instruction}\s+(.*)$"
    return [m.group(1).strip() for m in re.finditer(pattern, text, re.IGNORECASE | re.MULTILINE)]


def test_run_calls_the_job_like_the_image_entrypoint():
    single = task(ROOT / "sky" / "train.yaml").run
    assert re.search(r"^\s*python -m job\s*$", single, re.MULTILINE), "run: must call `python -m job`"
    for path in YAMLS:
        assert "-m job" in task(path).run
    entrypoints = _dockerfile("ENTRYPOINT")
    if entrypoints is None:
        pytest.skip("no docker/Dockerfile to compare with")
    assert entrypoints, "docker/Dockerfile has no ENTRYPOINT"
    try:
        argv = json.loads(entrypoints[-1])
    except json.JSONDecodeError:
        pytest.fail(f"docker/Dockerfile ENTRYPOINT must be exec form (a JSON array): {entrypoints[-1]}")
    while argv and Path(argv[0]).name in ("tini", "dumb-init", "--"):  # an init process in front
        argv = argv[1:]
    assert [Path(argv[0]).name, *argv[1:]] == ["python", "-m", "job"], f"the image runs {argv}; run: says python -m job"


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_job_command_runs_last_in_the_same_shell(path):
    """SkyPilot appends a wait for MOUNT_CACHED uploads to run:, then exits with the last command's status."""
    run = task(path).run
    commands = [ln.strip() for ln in run.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert commands[-1].endswith("-m job"), "the job must be the last command of run:"
    assert not re.search(r"^\s*(exec\b|set\s+-\w*e)", run, re.MULTILINE), "exec or set -e skips the upload wait"


@pytest.mark.parametrize("path", YAMLS, ids=ids)
def test_run_puts_the_image_venv_first_on_path(path):
    """SkyPilot's login shell takes PATH from Debian's /etc/profile, not from the image's ENV."""
    exported = re.search(r'^\s*export PATH="?([^:"]+):\$PATH"?\s*$', task(path).run, re.MULTILINE)
    assert exported, "run: must put the image's Python environment first on PATH"
    envs = _dockerfile("ENV")
    if envs is None:
        pytest.skip("no docker/Dockerfile to compare with")
    image_path = re.search(r"(?:^|\s)PATH=([^:\s]+)", " ".join(envs))
    assert image_path, "docker/Dockerfile sets no ENV PATH"
    assert exported.group(1) == image_path.group(1), f"the image puts {image_path.group(1)} first on PATH"


def test_multinode_launch_line_uses_skypilot_topology():
    run = task(MULTINODE).run
    assert task(MULTINODE).num_nodes >= 2
    for var in ("SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS"):
        assert f"${var}" in run or "${" + var + "}" in run, f"the launch line must use ${var}"
    assert re.search(r"torchrun\b.*-m job", run, re.DOTALL)


def test_multinode_run_script_builds_the_torchrun_command(tmp_path):
    """Run the YAML's script with stand-ins for python and torchrun, as node 1 of 2 with 4 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python", "torchrun"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path}/{tool}.calls"\n')
        stub.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "4",
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8",
    }
    done = subprocess.run(["bash", "-c", task(MULTINODE).run], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "python.calls").read_text().split("\n")[0] == "-m job config"
    argv = (tmp_path / "torchrun.calls").read_text().split()
    assert argv[:4] == ["--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--master_addr=10.0.0.7"]
    assert argv[-2:] == ["-m", "job"]


def test_multinode_stops_on_bad_settings_with_their_exit_code(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\ntouch "{tmp_path}/torchrun.ran"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "4",
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8",
        "NUM_SAMPLES": "lots",  # not a number: the job's config check exits 2
    }
    script = task(MULTINODE).run.replace("python -m job", f"{sys.executable} -m job", 1)
    done = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == errors.BAD_CONFIG, done.stderr
    assert "NUM_SAMPLES" in done.stderr
    assert not (tmp_path / "torchrun.ran").exists()
