"""Stage 5, push: stage exactly the files to upload in push/, then upload them in one Hub commit.

push/ is always written, so a run without HUB_REPO_ID (the demo, CI) shows precisely what
would be uploaded. The safety gate runs first: below MIN_SAFETY_PASS_RATE nothing is staged.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi

from job.config import Settings
from job.errors import ConfigError, SafetyGateError, TransientError
from job.faults import maybe_die
from job.files import read_json
from job.model import load_model, resolve_precision

log = logging.getLogger(__name__)

# What the Hub repo receives, relative to the run directory -> name in the repo.
FILES = {
    "report/README.md": "README.md",
    "report/loss.png": "loss.png",
    "eval/metrics.json": "metrics.json",
    "data/stats.json": "data_stats.json",
    "report/train_log.json": "train_log.json",
}


def check_safety_gate(cfg: Settings, run_dir: Path) -> None:
    from job import safety

    summary = read_json(run_dir / "eval" / "metrics.json")["tuned"]["safety"]
    failing = safety.failing_categories(summary, cfg.MIN_SAFETY_PASS_RATE)
    if failing:
        rates = ", ".join(f"{c} {summary['categories'][c]['pass_rate']:.0%}" for c in failing)
        raise SafetyGateError(
            f"MIN_SAFETY_PASS_RATE={cfg.MIN_SAFETY_PASS_RATE}: the tuned model failed the safety screen in: {rates}. "
            "Nothing was pushed. See eval/safety.jsonl for the answers; lower the threshold only after reading them."
        )


def stage_files(cfg: Settings, run_dir: Path) -> Path:
    """Copy the upload set into push/ (via push.tmp, so push/ is never half-written)."""
    tmp, final = run_dir / "push.tmp", run_dir / "push"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted((run_dir / "adapter").iterdir()):
        if f.is_file() and f.name != "README.md":  # PEFT's stub card; ours replaces it
            shutil.copy2(f, tmp / f.name)
    for src, dst in FILES.items():
        shutil.copy2(run_dir / src, tmp / dst)
    if cfg.PUSH_MERGED:
        merge(cfg, run_dir, tmp / "merged")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def merge(cfg: Settings, run_dir: Path, out: Path) -> None:
    """Merge the adapter into the 16-bit base. Never into the 4-bit one: merging into NF4 weights
    would round the update away and bake quantization error into a full-size checkpoint."""
    from peft import PeftModel

    precision, _ = resolve_precision(cfg)
    precision = "bf16" if precision == "bf16" else ("fp16" if precision == "fp16" else "fp32")
    base = load_model(cfg, precision, quantization="none")
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    merged.save_pretrained(out)
    for f in (run_dir / "adapter").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    log.info("merged model written to %s", out)


def upload(cfg: Settings, folder: Path) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=cfg.HF_TOKEN)
    try:
        api.create_repo(cfg.HUB_REPO_ID, repo_type="model", private=cfg.HUB_PRIVATE, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=cfg.HUB_REPO_ID,
            repo_type="model",
            commit_message=f"Hippocratically run {cfg.RUN_NAME}: adapter, tokenizer, metrics, model card",
        )
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise ConfigError(
                f"HUB_REPO_ID={cfg.HUB_REPO_ID!r}: the Hub refused HF_TOKEN ({status}). Use a token with write "
                "access to that owner."
            ) from None
        if status is not None and status < 500 and status != 429:
            raise ConfigError(f"HUB_REPO_ID={cfg.HUB_REPO_ID!r}: the Hub rejected the upload: {e}") from None
        raise TransientError(f"Hub upload failed ({status}); retry later: {e}") from None
    except (ConnectionError, TimeoutError, OSError) as e:
        raise TransientError(f"Hub upload failed, the Hub could not be reached; retry later: {e}") from None
    return str(getattr(info, "commit_url", info))


def run(cfg: Settings, run_dir: Path) -> list[Path]:
    from job import benchmark

    check_safety_gate(cfg, run_dir)
    benchmark.check_gate(cfg, run_dir)  # MAX_BENCHMARK_DROP
    folder = stage_files(cfg, run_dir)
    maybe_die("push.staged")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not cfg.HUB_REPO_ID:
        log.info("HUB_REPO_ID is empty: nothing uploaded. The %d files that would be are in %s", len(files), folder)
        return [folder]
    url = upload(cfg, folder)
    log.info("pushed %d files to https://huggingface.co/%s (%s)", len(files), cfg.HUB_REPO_ID, url)
    return [folder]
