"""No token leaks: a full run with canary HF_TOKEN, WANDB_API_KEY and JUDGE_API_KEY, TensorBoard on, judging
through a scripted chat-completions server, pushing through a fake Hub.

The canaries must reach the Hub client (the judge's key: the judge endpoint) and nothing else: not stdout or
stderr (file-descriptor level too), not the log, not any file under the output folder (checkpoints and the
pickled training_args.bin included; searched as raw bytes, UTF-16 and base64), not the model card, not the
uploaded files, not the TensorBoard event files. The push also fails first (token refused, then Hub down), which
is where tokens like to end up in messages; then it succeeds once, and a rerun of the finished job pushes
nothing.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
from conftest import FakeHub
from huggingface_hub.errors import HfHubHTTPError
from judge_server import JudgeServer

from job.config import STAGES
from job.errors import BAD_CONFIG, OK, TRANSIENT
from job.files import read_json
from job.paths import RunPaths

HF_CANARY = "hf_secretsTestCanary0c9e1d"
WANDB_CANARY = "wandbSecretsTestCanary4b7a02"
JUDGE_CANARY = "sk-judgeSecretsTestCanary91b3e6"
CANARIES = (HF_CANARY, WANDB_CANARY, JUDGE_CANARY)


def _encodings(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, secret.encode("utf-16-le"), base64.b64encode(raw), base64.urlsafe_b64encode(raw)]


def _leaks(folder: Path) -> list[str]:
    found = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            found += [f"{p.relative_to(folder)}: {s[:8]}..." for s in CANARIES if any(e in data for e in _encodings(s))]
    return found


def _refusing_client(hub: FakeHub, status: int) -> type:
    """The fake Hub client, except that upload_folder fails with `status` as the real one would."""

    class Refusing(hub.client_class()):
        def upload_folder(self, *args, **kwargs):
            hub.calls.append(("upload_folder", kwargs))
            request = httpx.Request("POST", "https://huggingface.co/api/models/alice/med-test/commit/main")
            raise HfHubHTTPError(f"{status} error from the fake Hub", response=httpx.Response(status, request=request))

    return Refusing


@pytest.fixture
def judge_server():
    server = JudgeServer("overlap").start()
    yield server
    server.stop()


@pytest.fixture
def env(demo_env, tmp_path, judge_server):
    out = tmp_path / "outputs"
    return demo_env(
        out,
        HF_TOKEN=HF_CANARY,
        WANDB_API_KEY=WANDB_CANARY,
        JUDGE_API_KEY=JUDGE_CANARY,
        JUDGE_MODEL="scripted",
        JUDGE_BASE_URL=judge_server.base_url,
        REPORT_TO="tensorboard",
        NUM_SAMPLES="16",
        EVAL_SAMPLES="4",
        EVAL_PROMPTS="2",
        MAX_NEW_TOKENS="8",
        EPOCHS="1",
        SAVE_STEPS="2",
        # train.run points TensorBoard here only if unset: pin it inside the run directory we search.
        TENSORBOARD_LOGGING_DIR=str(RunPaths(out / "med-test").tensorboard),
    )


def test_tokens_reach_the_hub_client_and_nothing_else(env, run_job, tmp_path, monkeypatch, capfd, judge_server):
    out = Path(env["OUTPUT_DIR"])
    run_dir = out / env["RUN_NAME"]
    hub = FakeHub(tmp_path / "fake-hub")
    outputs = []

    # 1. Everything runs; the Hub refuses the token: a configuration error, nothing marked pushed.
    monkeypatch.setattr("job.push.HfApi", _refusing_client(hub, 401))
    first = run_job(env, "run")
    outputs.append(first.output)
    assert first.exit_code == BAD_CONFIG, first.output[-3000:]
    assert "refused HF_TOKEN (401)" in first.output
    stages = read_json(RunPaths(run_dir).manifest)["stages"]
    assert [s for s in STAGES if stages[s]["status"] == "done"] == list(STAGES[:-1])

    # 2. The Hub is down: worth a retry (exit 4), still not marked pushed.
    monkeypatch.setattr("job.push.HfApi", _refusing_client(hub, 503))
    second = run_job(env, "run")
    outputs.append(second.output)
    assert second.exit_code == TRANSIENT, second.output[-3000:]
    assert read_json(RunPaths(run_dir).manifest)["stages"]["push"]["status"] == "running"

    # 3. The upload goes through, once, with the token handed to the client.
    monkeypatch.setattr("job.push.HfApi", hub.client_class())
    third = run_job(env, "run")
    outputs.append(third.output)
    assert third.exit_code == OK, third.output[-3000:]
    assert len(hub.uploads) == 1 and set(hub.tokens) == {HF_CANARY}
    assert read_json(RunPaths(run_dir).manifest)["stages"]["push"]["status"] == "done"

    # 4. A finished job run again pushes nothing (does not even create a client).
    calls, clients = len(hub.calls), len(hub.tokens)
    fourth = run_job(env, "run")
    outputs.append(fourth.output)
    assert fourth.exit_code == OK and len(hub.calls) == calls and len(hub.tokens) == clients
    outputs.append(run_job(env, "config").output)

    # The judge's key went to the judge endpoint, on every call (2 per held-out pair), and the judging ran once.
    assert len(judge_server.requests) == 2 * int(env["EVAL_PROMPTS"])
    assert {r["authorization"] for r in judge_server.requests} == {f"Bearer {JUDGE_CANARY}"}
    assert read_json(RunPaths(run_dir).metrics)["judge"]["calls"] == len(judge_server.requests)
    assert "### Model judge" in RunPaths(run_dir).model_card.read_text()

    # What was searched exists, so "not found" means something.
    assert list(RunPaths(run_dir).tensorboard.rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert list(RunPaths(run_dir).checkpoints.glob("checkpoint-*/training_args.bin")), "no pickled training args"
    card = RunPaths(run_dir).model_card.read_text()
    assert card and (hub.uploads[0]["copy"] / "README.md").read_text() == card
    upload = hub.uploads[0]["copy"]
    assert sorted(p.name for p in upload.iterdir()) == sorted(p.name for p in RunPaths(run_dir).push.iterdir())

    fd = capfd.readouterr()
    text = "\n".join([*outputs, fd.out, fd.err])
    for secret in CANARIES:
        assert secret not in text, f"{secret[:8]}... appeared in the job's output"
    assert _leaks(out) == []
    assert _leaks(upload) == []
