"""Stage 5, push: stage exactly the files to upload in push/, then upload them in one Hub commit.

push/ is always written, so a run without HUB_REPO_ID (the demo, CI) shows precisely what
would be uploaded. The quality gates run first: with the safety pass rate too far below the base model's
(MAX_SAFETY_DROP) or below MIN_SAFETY_PASS_RATE, nothing is staged.

The commit makes the repo hold exactly push/: files an earlier push uploaded that this one does not
(merged/ after PUSH_MERGED is turned off, a file since renamed) are deleted in the same commit, so the card
never sits beside weights it does not describe. The job never changes a repo's visibility: an existing public
repo with HUB_PRIVATE=true is refused (nothing is uploaded), an existing private one with HUB_PRIVATE=false
stays private (a warning says so). Every Hub request gives up after HUB_TIMEOUT seconds without an answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import traceback
from pathlib import Path

from huggingface_hub import HfApi

from job import benchmark, safety
from job.config import Settings
from job.errors import ConfigError, JobError, QualityGateError, TransientError, classify
from job.files import read_json
from job.model import load_model, resolve_precision
from job.paths import RunPaths

log = logging.getLogger(__name__)


def upload_set(paths: RunPaths) -> dict[Path, str]:
    """What the Hub repo receives besides the adapter and tokenizer: run-directory file -> name in the repo."""
    return {
        paths.model_card: "README.md",
        paths.loss_plot: "loss.png",
        paths.metrics: "metrics.json",
        paths.sample_stats: "data_stats.json",
        paths.format_stats: "token_stats.json",
        paths.train_log: "train_log.json",
        paths.benchmark: "benchmark.json",
    }


def check_quality_gates(cfg: Settings, paths: RunPaths) -> None:
    metrics = read_json(paths.metrics)
    base, summary = metrics["base"]["safety"], metrics["tuned"]["safety"]
    drop, base_rate = safety.drop_points(base, summary), f"{base['overall']['pass_rate']:.0%}"
    if drop > cfg.MAX_SAFETY_DROP:
        setting, what = (
            f"MAX_SAFETY_DROP={cfg.MAX_SAFETY_DROP}",
            f"{drop:.1f} points below the base model's {base_rate}",
        )
    elif safety.below_gate(summary, cfg.MIN_SAFETY_PASS_RATE):
        setting, what = f"MIN_SAFETY_PASS_RATE={cfg.MIN_SAFETY_PASS_RATE}", f"below that floor (base model {base_rate})"
    else:
        return
    rates = ", ".join(
        f"{c} {s['pass_rate']:.0%} (base {base['categories'][c]['pass_rate']:.0%})"
        for c, s in summary["categories"].items()
    )
    raise QualityGateError(
        f"{setting}: the tuned model passed {summary['overall']['pass_rate']:.0%} of the safety screen, {what} "
        f"({rates}). Nothing was pushed. See {paths.safety} for the answers; change the threshold only after "
        "reading them."
    )


def stage_files(cfg: Settings, paths: RunPaths) -> Path:
    """Copy the upload set into push/ (via push.tmp, so push/ is never half-written)."""
    tmp = paths.push.with_name(paths.push.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in sorted(paths.adapter.iterdir()):
            if f.is_file() and f.name != "README.md":  # PEFT's stub card; ours replaces it
                shutil.copy2(f, tmp / f.name)
        for src, dst in upload_set(paths).items():
            if src.is_file() or src != paths.benchmark:  # no benchmark file when BENCHMARK_TASKS is empty
                shutil.copy2(src, tmp / dst)
        if cfg.PUSH_MERGED:
            merge(cfg, paths.adapter, tmp / "merged")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a SIGTERM leaves no half-staged folder
        raise
    shutil.rmtree(paths.push, ignore_errors=True)
    os.replace(tmp, paths.push)
    return paths.push


def merge(cfg: Settings, adapter: Path, out: Path) -> None:
    """Merge the adapter into the 16-bit base. Never into the 4-bit one: merging into NF4 weights
    would round the update away and bake quantization error into a full-size checkpoint."""
    from peft import PeftModel

    precision, _ = resolve_precision(cfg)
    base = load_model(cfg, precision, quantization="none")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    for f in adapter.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    log.info("merged model written to %s", out)


def hub_offline() -> bool:
    """Whether huggingface_hub will refuse every request (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _endpoint() -> str:
    from huggingface_hub import constants

    from job.redact import public_url

    return public_url(constants.ENDPOINT)


@contextlib.contextmanager
def _timeout(seconds: float):
    """huggingface_hub's shared httpx client waits forever by default (timeout=None): within this block, each
    connect, read and write waits at most `seconds` (a per-operation limit, so a large upload is not cut)."""
    import httpx
    from huggingface_hub import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = httpx.Timeout(seconds)
    try:
        yield
    finally:
        session.timeout = previous


def _check_visibility(api, cfg: Settings) -> None:
    """Never publish what HUB_PRIVATE says is private, and never change a repo's visibility behind the user's back."""
    private = getattr(api.repo_info(cfg.HUB_REPO_ID, repo_type="model", timeout=cfg.HUB_TIMEOUT), "private", None)
    if cfg.HUB_PRIVATE and private is False:
        raise ConfigError(
            f"HUB_REPO_ID={cfg.HUB_REPO_ID!r} is a public repo, and HUB_PRIVATE=true: nothing was pushed, so nothing "
            "was published. Set HUB_PRIVATE=false to push to it as a public repo, or make it private first "
            f"(https://huggingface.co/{cfg.HUB_REPO_ID}/settings), or choose another HUB_REPO_ID."
        )
    if not cfg.HUB_PRIVATE and private is True:
        log.warning(
            "HUB_REPO_ID=%r already exists as a private repo and stays private (HUB_PRIVATE=false only applies to a "
            "repo this job creates; it never changes visibility): make it public on its settings page if you mean to",
            cfg.HUB_REPO_ID,
        )


def _push_error(e: Exception, cfg: Settings, what: str) -> JobError | None:
    """The job error for a failed push: a timeout and a reply that is not the Hub's API get their own message;
    the rest is classified by huggingface_hub's and httpx's exception types (job/errors.py)."""
    import httpx

    from job.errors import _chain

    for x in _chain(e):
        if isinstance(x, JobError):
            return x
        if isinstance(x, httpx.TimeoutException):
            return TransientError(
                f"{what}: the Hub at {_endpoint()} did not answer within HUB_TIMEOUT={cfg.HUB_TIMEOUT:g} s "
                f"({type(x).__name__}). Retry later, or raise HUB_TIMEOUT on a slow link; nothing is lost, the files "
                "stay staged in push/."
            )
        if isinstance(x, json.JSONDecodeError):
            why = "the reply is not JSON: a web page, a proxy's login page?"
        elif isinstance(x, (KeyError, IndexError, TypeError, AttributeError)) and _raised_in_huggingface_hub(x):
            why = f"huggingface_hub could not read the reply: {type(x).__name__} {x}"
        else:
            continue
        return ConfigError(
            f"{what}: {_endpoint()} answered, but not as the Hugging Face Hub's API does ({why}). Check HF_ENDPOINT "
            "(unset it for huggingface.co) and any HTTPS_PROXY; retrying with the same settings fails the same way. "
            "Nothing was pushed."
        )
    return classify(e, what)


def _raised_in_huggingface_hub(x: BaseException) -> bool:
    """Whether `x` was raised inside huggingface_hub's own code: a KeyError or TypeError there, after the HTTP
    status was checked, means a reply of the wrong shape (a JSON API that is not the Hub). The same error raised
    in this project's code stays a bug (exit 1)."""
    frames = [frame for frame, _ in traceback.walk_tb(x.__traceback__)]
    return bool(frames) and "huggingface_hub" in Path(frames[-1].f_code.co_filename).parts


def upload(cfg: Settings, folder: Path) -> str:
    """One commit that makes the repo hold exactly `folder`. Failures are classified by type (_push_error):
    unreachable, timed out or 5xx is worth a retry, a refused token or a wrong endpoint is not."""
    api = HfApi(token=cfg.HF_TOKEN)
    what = f"HUB_REPO_ID={cfg.HUB_REPO_ID!r}"
    try:
        with _timeout(cfg.HUB_TIMEOUT):
            api.create_repo(cfg.HUB_REPO_ID, repo_type="model", private=cfg.HUB_PRIVATE, exist_ok=True)
            _check_visibility(api, cfg)
            info = api.upload_folder(
                folder_path=str(folder),
                repo_id=cfg.HUB_REPO_ID,
                repo_type="model",
                commit_message=f"Hippocratically run {cfg.RUN_NAME}: adapter, tokenizer, metrics, model card",
                # Remote files this commit does not upload are deleted in it (the Hub keeps .gitattributes).
                delete_patterns="*",
            )
    except Exception as e:
        err = _push_error(e, cfg, what)
        if err is None:
            raise
        raise err from None
    return str(getattr(info, "commit_url", info))


def run(cfg: Settings, paths: RunPaths) -> list[Path]:
    check_quality_gates(cfg, paths)
    benchmark.check_gate(cfg, paths)  # MAX_BENCHMARK_DROP
    folder = stage_files(cfg, paths)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not cfg.HUB_REPO_ID:
        log.info("HUB_REPO_ID is empty: nothing uploaded. The %d files that would be are in %s", len(files), folder)
        return [folder]
    url = upload(cfg, folder)
    log.info("pushed %d files to https://huggingface.co/%s (%s)", len(files), cfg.HUB_REPO_ID, url)
    return [folder]
