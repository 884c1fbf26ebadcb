"""The push against a Hub that misbehaves: a local server on 127.0.0.1 that never answers, answers a web page,
or quotes the token in its error; an existing repo whose visibility differs from HUB_PRIVATE; files left by an
earlier push; HF_HUB_OFFLINE with HUB_REPO_ID. The real HfApi talks to the local server (HF_ENDPOINT is
patched in huggingface_hub.constants); the repo cases use the project's FakeHub (tests/conftest.py).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from job import push
from job.config import load_settings
from job.errors import BAD_CONFIG, TRANSIENT, ConfigError, TransientError
from job.paths import RunPaths
from job.pipeline import preflight

TOKEN = "hf_pushTestToken_3c8e51a9"
REPO = "alice/med-push"


def settings(**overrides: str):
    env = {"HUB_REPO_ID": REPO, "HF_TOKEN": TOKEN, "HUB_TIMEOUT": "0.5", "RUN_NAME": "push-test"}
    return load_settings(environ=env | overrides, env_file=None)


@pytest.fixture
def folder(tmp_path):
    """A staged push/ folder: a card and an adapter."""
    f = tmp_path / "push"
    f.mkdir()
    (f / "README.md").write_text("# card\n")
    (f / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return f


@pytest.fixture
def hub_at(monkeypatch):
    """hub_at(url): the real HfApi, online, sending every request to `url` (as HF_ENDPOINT would)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import _detect_agent

    def point(url: str) -> None:
        monkeypatch.setattr("job.push.HfApi", HfApi)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # huggingface_hub fetches a registry of AI-agent names from the endpoint once per process (3 s timeout,
        # best effort, for its user agent): given here, so the test times the job's requests only.
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)

    return point


@pytest.fixture
def silent_server():
    """A loopback socket that accepts connections and never reads or answers; closed after the test."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # the 0.1 s accept timeout, or the socket closed at the end
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for c in held:
        c.close()
    server.close()


class _Reply(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, content_type, body = self.server.reply(self)
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer  # noqa: N815 (the stdlib's names)


@pytest.fixture
def replying_server():
    """replying_server(reply) -> URL of a local server answering every request with reply(handler)."""
    servers = []

    def start(reply) -> str:
        s = ThreadingHTTPServer(("127.0.0.1", 0), _Reply)
        s.daemon_threads = True
        s.reply = reply
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(s)
        return f"http://127.0.0.1:{s.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_a_hub_that_never_answers_times_out_with_exit_4(hub_at, silent_server, folder):
    hub_at(silent_server)
    t0 = time.monotonic()
    with pytest.raises(TransientError) as e:
        push.upload(settings(), folder)
    assert time.monotonic() - t0 < 3  # HUB_TIMEOUT=0.5: without a timeout this waits forever
    assert e.value.exit_code == TRANSIENT
    assert "did not answer within HUB_TIMEOUT=0.5 s" in str(e.value) and silent_server in str(e.value)


@pytest.mark.parametrize(
    ("content_type", "body", "says"),
    [
        ("text/html", "<!DOCTYPE html><html><body>Sign in to the proxy</body></html>", "not JSON"),
        ("application/json", "{}", "could not read the reply: KeyError"),
        ("application/json", "[]", "could not read the reply: TypeError"),
        ("application/json", '"ok"', "could not read the reply: TypeError"),
    ],
    ids=["html", "empty-object", "array", "string"],
)
def test_a_reply_that_is_not_the_hub_api_is_a_config_error(hub_at, replying_server, folder, content_type, body, says):
    url = replying_server(lambda h: (200, content_type, body))
    hub_at(url)
    with pytest.raises(ConfigError) as e:
        push.upload(settings(), folder)
    assert e.value.exit_code == BAD_CONFIG
    assert "HF_ENDPOINT" in str(e.value) and says in str(e.value) and url in str(e.value)


def test_an_error_that_quotes_the_token_is_printed_without_it(hub_at, replying_server, folder, run_job, monkeypatch):
    def quote_the_token(handler):
        body = {"error": f"Invalid credentials in Authorization header: {handler.headers.get('Authorization')}"}
        return 400, "application/json", json.dumps(body)

    hub_at(replying_server(quote_the_token))

    def push_only(cfg):
        logging.getLogger("job.push").warning("token check: %s", cfg.HF_TOKEN)  # a careless log line, scrubbed too
        push.upload(cfg, folder)

    monkeypatch.setattr("job.pipeline.run", push_only)
    result = run_job(
        {"HUB_REPO_ID": REPO, "HF_TOKEN": TOKEN, "HUB_TIMEOUT": "5", "OUTPUT_DIR": str(folder.parent / "out")}, "run"
    )
    assert result.exit_code == BAD_CONFIG, result.output
    assert "Invalid credentials in Authorization header: Bearer ***" in result.message
    assert "token check: ***" in result.output
    assert TOKEN not in result.output and TOKEN not in result.stderr


def test_an_existing_public_repo_is_not_pushed_to_while_hub_private_is_true(fake_hub, folder):
    fake_hub.repos[REPO] = {"private": False, "files": {".gitattributes", "README.md"}}
    with pytest.raises(ConfigError) as e:
        push.upload(settings(), folder)
    assert e.value.exit_code == BAD_CONFIG and "is a public repo, and HUB_PRIVATE=true" in str(e.value)
    assert not fake_hub.uploads and fake_hub.repos[REPO]["private"] is False  # nothing published, nothing changed
    push.upload(settings(HUB_PRIVATE="false"), folder)  # the user says public: pushed
    assert len(fake_hub.uploads) == 1


def test_an_existing_private_repo_stays_private_and_the_log_says_so(fake_hub, folder, caplog):
    fake_hub.repos[REPO] = {"private": True, "files": {".gitattributes"}}
    with caplog.at_level(logging.WARNING, logger="job.push"):
        push.upload(settings(HUB_PRIVATE="false"), folder)
    assert len(fake_hub.uploads) == 1 and fake_hub.repos[REPO]["private"] is True
    assert any("stays private" in r.getMessage() for r in caplog.records)


def test_files_of_an_earlier_push_are_deleted_in_the_same_commit(fake_hub, folder):
    earlier = {".gitattributes", "README.md", "merged/model.safetensors", "merged/config.json", "loss.png"}
    fake_hub.repos[REPO] = {"private": True, "files": set(earlier)}
    push.upload(settings(), folder)
    assert len(fake_hub.uploads) == 1  # one commit
    assert fake_hub.repos[REPO]["files"] == {".gitattributes", "README.md", "adapter_model.safetensors"}


def test_hub_offline_with_a_repo_to_push_to_is_refused_before_anything_runs(run_job, demo_env, tmp_path, monkeypatch):
    monkeypatch.setattr("job.push.hub_offline", lambda: True)  # HF_HUB_OFFLINE=1, as huggingface_hub reads it
    result = run_job(demo_env(tmp_path / "out"), "run")
    assert result.exit_code == BAD_CONFIG
    assert "HF_HUB_OFFLINE" in result.message and f"HUB_REPO_ID='{demo_env(tmp_path)['HUB_REPO_ID']}'" in result.message
    assert "starting" not in result.output  # refused before the first stage, not after training
    # Nothing to upload (no HUB_REPO_ID, or no push stage): offline is fine.
    for overrides in ({"HUB_REPO_ID": ""}, {"STAGES": "sample,format,train"}):
        cfg = load_settings(demo_env(tmp_path / "out", **overrides), env_file=None)
        assert not [p for p in preflight(cfg, RunPaths(cfg.run_dir)) if "HF_HUB_OFFLINE" in p]
