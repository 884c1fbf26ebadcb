"""Stage 5, push: stage exactly the files to upload in push/, then upload them in one Hub commit.

push/ is always written, so a run without HUB_REPO_ID (the demo, CI) shows precisely what
would be uploaded. The quality gates run first: with the safety pass rate too far below the base model's
(MAX_SAFETY_DROP) or below MIN_SAFETY_PASS_RATE, nothing is staged.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from huggingface_hub import HfApi

from job import benchmark, safety
from job.config import Settings
from job.errors import QualityGateError, classify
from job.faults import maybe_die
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


def upload(cfg: Settings, folder: Path) -> str:
    """One commit with everything in `folder`. Failures are classified by huggingface_hub's and httpx's
    exception types (job/errors.py): unreachable or 5xx is worth a retry, a refused token is not."""
    api = HfApi(token=cfg.HF_TOKEN)
    what = f"HUB_REPO_ID={cfg.HUB_REPO_ID!r}"
    try:
        api.create_repo(cfg.HUB_REPO_ID, repo_type="model", private=cfg.HUB_PRIVATE, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=cfg.HUB_REPO_ID,
            repo_type="model",
            commit_message=f"Hippocratically run {cfg.RUN_NAME}: adapter, tokenizer, metrics, model card",
        )
    except Exception as e:
        err = classify(e, what)
        if err is None:
            raise
        raise err from None
    return str(getattr(info, "commit_url", info))


def run(cfg: Settings, paths: RunPaths) -> list[Path]:
    check_quality_gates(cfg, paths)
    benchmark.check_gate(cfg, paths)  # MAX_BENCHMARK_DROP
    folder = stage_files(cfg, paths)
    maybe_die("push.staged")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not cfg.HUB_REPO_ID:
        log.info("HUB_REPO_ID is empty: nothing uploaded. The %d files that would be are in %s", len(files), folder)
        return [folder]
    url = upload(cfg, folder)
    log.info("pushed %d files to https://huggingface.co/%s (%s)", len(files), cfg.HUB_REPO_ID, url)
    return [folder]
