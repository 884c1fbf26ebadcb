"""Shared fixtures: a tiny model built once, and one real pipeline run with the Hub replaced at its boundary.

Fixtures for other test modules to reuse:

- ``tiny_model_dir`` (session): folder of a 2-layer Llama model + BPE tokenizer (trained on the fixture's
  texts, Llama-3-style chat template), written by ``job.tiny_model.build`` (the demo's). Use it as BASE_MODEL.
- ``tiny_gguf`` (session): the same model as a GGUF file without a chat template (tests/tiny_gguf.py).
- ``demo_env`` (session): ``demo_env(output_dir, **overrides) -> dict[str, str]``, every environment variable
  a small, CPU, offline run needs: the demo's settings plus BASE_MODEL, OUTPUT_DIR, RUN_NAME, HUB_REPO_ID and
  HF_TOKEN (= ``CANARY_TOKEN``). Overrides are setting names, e.g. ``demo_env(d, LORA_R="4")``.
- ``run_job`` (session): ``run_job(env, *argv, cwd=None) -> JobResult(exit_code, output, stderr)`` runs
  ``python -m job`` in-process (``job.__main__.main``) with exactly ``env`` as the job's settings (no .env
  unless ``cwd`` holds one), capturing what it printed and logged; ``.message`` is the error message.
- ``demo_run`` (session): the whole pipeline run once with ``demo_env``; returns ``DemoRun`` (run_dir, env,
  hub, exit_code, output). ``hub`` is the ``FakeHub`` that stood in for ``job.push.HfApi``. Treat the run
  directory as read-only; use ``demo_run_copy`` for anything that writes.
- ``demo_run_copy`` (function): a private copy of ``demo_run``'s output folder; returns a ``DemoRun`` whose
  env points OUTPUT_DIR at the copy and whose ``hub`` is a fresh ``FakeHub`` patched in for this test only.
- ``fake_hub`` (function): a fresh ``FakeHub`` patched in as ``job.push.HfApi`` for one test.

And one function, for tests that need a real process (exit status, signals, torchrun):
``job_process(env, *argv, cwd, command=("-m", "job"), kill_on_line=None, timeout=600)`` runs
``python -m job *argv`` to its end and returns the ``subprocess.CompletedProcess`` (stdout, stderr as text).
``command=KILLABLE_JOB`` runs the job through tests/faults.py, which signals it where HIPPO_KILL_AT says.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

# Tests never touch the network: the tiny model and the fixture are local, the Hub client is faked.
# Set before huggingface_hub reads its constants (test modules import job.* after this file).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from huggingface_hub import HfApi  # noqa: E402

from job.__main__ import DEMO, FIXTURE  # noqa: E402
from job.config import SETTINGS  # noqa: E402
from job.files import read_jsonl  # noqa: E402
from job.paths import RunPaths  # noqa: E402

# `make test` runs two xdist workers (--dist loadgroup --no-loadscope-reorder: with no groups marked, the
# workers take the tests one at a time, in collection order). The two longest go first, so xdist deals them
# one to each worker, and the image build (mostly downloads and disk) runs beside the kill chain instead of
# after it.
LONGEST = ("test_container.py::test_image_builds_and_runs_the_demo", "test_resume.py::test_kill_anywhere_then_rerun")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """LONGEST first, then the other slow tests, then the rest in file order. Only how long a run takes
    depends on this: every test is independent of the others."""
    rank = {name: i for i, name in enumerate(LONGEST)}

    def key(item: pytest.Item) -> tuple[int, bool]:
        return rank.get(f"{item.path.name}::{item.name}", len(LONGEST)), item.get_closest_marker("slow") is None

    items.sort(key=key)


REPO = Path(__file__).resolve().parents[1]
KILLABLE_JOB = (str(Path(__file__).with_name("faults.py")),)  # `python -m job` that HIPPO_KILL_AT can signal
CANARY_TOKEN = "hf_canary_DO_NOT_LEAK_7f3a9c"  # must never appear in any file, log or upload
HUB_REPO_ID = "alice/med-test"
RUN_NAME = "med-test"
# On top of the demo's settings: fewer conversations so the shared run stays well under a minute of
# training on 2 CPU cores (32 conversations x 2 epochs / batch 4 = 16 optimizer steps, a checkpoint every 5).
TEST_SPEED = {"NUM_SAMPLES": "32"}
# A run small and exact enough to stop, kill and rerun many times: 24 conversations / batch 2 = 12 optimizer
# steps, padded batches (PACKING=false) so the step count is exact, a checkpoint every 2 steps.
SMALL_RUN = {
    "DATASET": str(FIXTURE),
    "NUM_SAMPLES": "24",
    "EVAL_SAMPLES": "4",
    "EVAL_PROMPTS": "2",
    "MAX_NEW_TOKENS": "4",
    "MAX_SEQ_LENGTH": "256",
    "BATCH_SIZE": "2",
    "PACKING": "false",
    "SAVE_STEPS": "2",
    "HUB_REPO_ID": "",
    # One benchmark task from the bundled questions (3 of them): the stage runs, offline, in seconds.
    "BENCHMARK_TASKS": "mmlu_anatomy",
    "BENCHMARK_DATA": DEMO["BENCHMARK_DATA"],
}


# --- the Hub, faked at its boundary ----------------------------------------------------------------------
class FakeHub:
    """Stands in for ``huggingface_hub.HfApi`` (patched as ``job.push.HfApi``) and records what the job asked.

    Calls are bound against the real ``HfApi`` method signatures, so a misspelled keyword fails here as it
    would against the Hub. Attributes:
      tokens   -- the ``token=`` each client was created with
      calls    -- [(method, arguments)] in call order (``self`` left out, defaults not filled in)
      uploads  -- one dict per ``upload_folder``: its arguments plus ``files``, the sorted relative paths in
                  ``folder_path`` at upload time, and ``copy``, a folder holding a copy of what was uploaded
      repos    -- repo id -> {"private": bool, "files": set of paths in the repo}; set one before the job runs
                  to stand for a repo that exists already. ``upload_folder`` applies ``delete_patterns`` as the
                  Hub does (fnmatch against remote paths; ``.gitattributes`` is always kept).
    """

    def __init__(self, store: Path):
        self.store = Path(store)
        self.tokens: list[str | None] = []
        self.calls: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []
        self.repos: dict[str, dict] = {}

    def methods(self, name: str) -> list[dict]:
        return [args for method, args in self.calls if method == name]

    def client_class(self) -> type:
        hub = self

        def bind(method: str, args: tuple, kwargs: dict) -> dict:
            bound = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)
            out = dict(bound.arguments)
            out.pop("self", None)
            out.update(out.pop("kwargs", {}) or {})
            return out

        class FakeHfApi:
            def __init__(self, *args, **kwargs):
                hub.tokens.append(bind("__init__", args, kwargs).get("token"))

            def create_repo(self, *args, **kwargs):
                a = bind("create_repo", args, kwargs)
                hub.calls.append(("create_repo", a))
                hub.repos.setdefault(a["repo_id"], {"private": bool(a.get("private")), "files": {".gitattributes"}})
                return f"https://huggingface.co/{a['repo_id']}"

            def repo_info(self, *args, **kwargs):
                a = bind("repo_info", args, kwargs)
                hub.calls.append(("repo_info", a))
                return SimpleNamespace(id=a["repo_id"], private=hub.repos[a["repo_id"]]["private"])

            def upload_folder(self, *args, **kwargs):
                a = bind("upload_folder", args, kwargs)
                folder = Path(a["folder_path"])
                copy = hub.store / f"upload-{len(hub.uploads)}"
                shutil.copytree(folder, copy)
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                hub.calls.append(("upload_folder", a))
                hub.uploads.append({**a, "files": files, "copy": copy})
                patterns = a.get("delete_patterns") or []
                patterns = [patterns] if isinstance(patterns, str) else patterns
                repo = hub.repos.setdefault(a["repo_id"], {"private": True, "files": {".gitattributes"}})
                repo["files"] = {
                    f
                    for f in repo["files"]
                    if f == ".gitattributes" or not any(fnmatch.fnmatch(f, p) for p in patterns)
                } | set(files)
                return SimpleNamespace(commit_url=f"https://huggingface.co/{a['repo_id']}/commit/fake")

        return FakeHfApi


@pytest.fixture(scope="session", autouse=True)
def hub_reachable():
    """The fake Hub answers whatever HF_HUB_OFFLINE says (set above so that no library reaches the network):
    the job's check that refuses HUB_REPO_ID under HF_HUB_OFFLINE is told the Hub is online. A test of that
    check patches job.push.hub_offline back, or runs the job as a process (job_process)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("job.push.hub_offline", lambda: False)
        yield


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    """A fresh FakeHub patched in as job.push.HfApi for one test."""
    hub = FakeHub(tmp_path / "fake-hub")
    monkeypatch.setattr("job.push.HfApi", hub.client_class())
    return hub


# --- running the job -------------------------------------------------------------------------------------
@dataclass
class JobResult:
    exit_code: int
    output: str  # stdout, stderr and INFO+ log records, interleaved
    stderr: str = ""  # what went to stderr alone (the error message and its exit-code line)

    @property
    def message(self) -> str:
        """The job's error message: from the last line that starts with 'error: ' up to the exit-code line (a
        message may quote a library's own "C error: ...")."""
        text = "\n" + self.stderr
        assert "\nerror: " in text, self.output[-2000:]
        return text[text.rindex("\nerror: ") + len("\nerror: ") :].split("\n(exit ")[0].strip()


class _Tee(io.StringIO):
    """A stream that also copies what it is written into another one."""

    def __init__(self, other: io.StringIO):
        super().__init__()
        self.other = other

    def write(self, s: str) -> int:
        self.other.write(s)
        return super().write(s)


@contextlib.contextmanager
def _job_environment(env: dict[str, str], cwd: Path):
    """os.environ = the current one without any setting names, plus `env`; restored afterwards, whatever the
    job itself set (the train stage sets TENSORBOARD_LOGGING_DIR)."""
    saved, saved_cwd = dict(os.environ), os.getcwd()
    try:
        for name in SETTINGS:
            os.environ.pop(name, None)
        os.environ.update(env)
        os.chdir(cwd)  # no developer .env is picked up
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved)


def _run_job(env: dict[str, str], *argv: str, cwd: Path | None = None) -> JobResult:
    from job.__main__ import main

    cwd = cwd or Path(env.get("OUTPUT_DIR", ".")).parent
    cwd.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    err = _Tee(buf)
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)  # also makes the job's logging.basicConfig a no-op
    root.setLevel(logging.INFO)
    try:
        with _job_environment(env, cwd), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            code = main(list(argv or ["run"]))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return JobResult(code, buf.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def run_job():
    """run_job(env, *argv, cwd=None) -> JobResult: `python -m job *argv` (default: run) in-process, settings = env."""
    return _run_job


def job_process(
    env: dict[str, str],
    *argv: str,
    cwd: Path,
    command: tuple[str, ...] = ("-m", "job"),
    kill_on_line: re.Pattern | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m job *argv` (or `python *command *argv`) as a real process in `cwd`, waited for.

    Its environment: this one without any setting name or HIPPO_KILL_AT, offline, plus `env`. PYTHONPATH is env's
    own, then this checkout, so the child runs this code and not an installed copy. `kill_on_line`: SIGKILL it when
    a line it writes to stderr matches (stderr is read as it is written; stdout goes to a file, so neither blocks).
    """
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "HIPPO_KILL_AT"}
    environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH"), str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    args = [sys.executable, *command, *argv]
    expired = threading.Event()
    with (
        tempfile.TemporaryFile("w+", errors="replace") as stdout,
        subprocess.Popen(
            args,
            cwd=cwd,
            env=environ,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout kills torchrun's ranks too
        ) as proc,
    ):

        def expire() -> None:  # the ranks of a hung torchrun hold stderr open: kill the whole group, not only it
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if kill_on_line is not None and kill_on_line.search(line):
                    proc.send_signal(signal.SIGKILL)
                    kill_on_line = None
            proc.wait()
        finally:
            timer.cancel()
        stdout.seek(0)
        done = subprocess.CompletedProcess(args, proc.returncode, stdout.read(), "".join(lines))
    if expired.is_set():
        raise subprocess.TimeoutExpired(args, timeout, done.stdout, done.stderr)
    return done


# --- the tiny model and the shared run -------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama model + tokenizer (BPE trained on the fixture's texts), built once."""
    from job import tiny_model

    texts = [v for row in read_jsonl(FIXTURE) for v in row.values() if isinstance(v, str)]
    return tiny_model.build(tmp_path_factory.mktemp("tiny-model"), texts)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """``tiny_model_dir`` written as a GGUF file (tests/tiny_gguf.py: Q8_0 weights, the tokenizer, no chat template,
    like Gemma's base GGUFs), for BASE_MODEL. Runs that load it should set HF_HOME to a folder of their own: the
    dequantized copy is written there (job/gguf_base.py)."""
    from tiny_gguf import write_llama_gguf

    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def demo_env(tiny_model_dir):
    """demo_env(output_dir, **overrides) -> the environment of a small CPU run of the whole job."""

    def make(output_dir: str | Path, **overrides: str) -> dict[str, str]:
        env = {
            **DEMO,
            **TEST_SPEED,
            "BASE_MODEL": str(tiny_model_dir),
            "OUTPUT_DIR": str(output_dir),
            "RUN_NAME": RUN_NAME,
            "HUB_REPO_ID": HUB_REPO_ID,
            "HF_TOKEN": CANARY_TOKEN,
        }
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    return make


@dataclass
class DemoRun:
    run_dir: Path  # OUTPUT_DIR/RUN_NAME
    env: dict[str, str]  # the settings it ran with
    hub: FakeHub  # what the job asked of the (fake) Hub
    exit_code: int
    output: str = field(repr=False)  # everything it printed and logged

    @property
    def output_dir(self) -> Path:
        return self.run_dir.parent

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_env) -> DemoRun:
    """The whole pipeline (sample, format, train, evaluate, push) run once, with job.push.HfApi faked."""
    base = tmp_path_factory.mktemp("demo-run")
    env = demo_env(base / "outputs")
    hub = FakeHub(base / "fake-hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("job.push.HfApi", hub.client_class())
        result = _run_job(env, "run")
    run = DemoRun(Path(env["OUTPUT_DIR"]) / env["RUN_NAME"], env, hub, result.exit_code, result.output)
    (base / "job-output.log").write_text(result.output)
    assert run.exit_code == 0, f"the demo run failed (exit {run.exit_code}):\n{result.output[-5000:]}"
    return run


@pytest.fixture
def demo_run_copy(demo_run, tmp_path, fake_hub) -> DemoRun:
    """A private copy of demo_run's output folder, with its own FakeHub; safe to rerun, kill or corrupt."""
    out = tmp_path / "outputs"
    shutil.copytree(demo_run.output_dir, out, copy_function=shutil.copy2)
    env = {**demo_run.env, "OUTPUT_DIR": str(out)}
    return replace(demo_run, run_dir=out / env["RUN_NAME"], env=env, hub=fake_hub, output="")


# Model families beyond Llama (tests/test_families.py, tests/test_cuda_graphs.py): each one's config class, its
# fields beyond the tiny shape, and the LoRA targets LORA_TARGET_MODULES=auto gives it.
WINDOW = 16  # the tiny families' sliding window (Mistral's, Gemma 2's): shorter than every fixture conversation
FAMILIES = {
    "qwen2": ("Qwen2Config", {}, ["q_proj", "v_proj"]),  # biased q/k/v projections
    "qwen3": ("Qwen3Config", {"head_dim": 16}, ["q_proj", "v_proj"]),  # RMSNorm on q and k per head
    "mistral": ("MistralConfig", {"sliding_window": WINDOW, "head_dim": 16}, ["q_proj", "v_proj"]),
    "phi3": ("Phi3Config", {}, ["qkv_proj"]),  # q, k and v in one fused projection
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW}, ["q_proj", "v_proj"]),  # capped logits
}


def tiny_family(family: str, tok, out: Path) -> Path:
    """A 2-layer random model of `family` (FAMILIES) in the tiny Llama's shape, saved with `tok` to `out`."""
    import torch
    import transformers

    from job.tiny_model import TINY

    name, extra, _ = FAMILIES[family]
    config = getattr(transformers, name)(
        **TINY,  # the tiny Llama's shape
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():  # larger weights than the init's: attention patterns that differ per token
        if p.ndim == 2:
            p.data.normal_(0, 0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_gemma3_config(tok, window: int):
    """A 2-layer Gemma 3 text config for the tiny tokenizer: one sliding-window layer of `window` tokens and one
    global layer, each with its own rotary base, as the real Gemma 3 has."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
