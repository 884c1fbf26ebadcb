"""Run the stages in order, recording each in the manifest; skip what is already done.

    sample -> format -> train -> evaluate -> benchmark -> push     (each: job/<stage module>.run(cfg, paths))

A stage is done only when the manifest says so, its files still exist, and its fingerprint is unchanged:
the settings its output depends on (job/config.py DEPENDS), the content of the inputs it reads and the stage
before it (job/provenance.py). The manifest is written (atomically) only after a stage's files are complete,
with that fingerprint and the code that ran it. A changed setting or input of a finished stage is an error
naming it, unless REDO=true, which reruns that stage and the stages after it; a finished stage left out of
STAGES must be unchanged too, or the stages after it would describe work these settings did not do. The
train stage gets its fingerprint, which its checkpoints carry. The report (job/report.py: the model card and
loss plot) is rendered here, once, from what the manifest recorded, after the last stage whose files it shows
(REPORT_INPUTS) and before the push that uploads it; the manifest records it apart from the stages, under
"report". One process owns the run directory at a time (job/lock.py). Under torchrun only training runs on
every rank; rank 0 does the rest while the others wait.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from job import benchmark, errors, evaluate, formatting, mixture, provenance, push, report, sample, stop, train
from job.config import DEPENDS, STAGES, Settings
from job.errors import ConfigError
from job.files import atomic_write_text, is_local_path
from job.lock import RunLock
from job.model import (
    check_base_model,
    check_one_process_per_gpu,
    check_quantization,
    is_main_process,
    local_rank,
    resolve_precision,
    world_size,
)
from job.paths import RunPaths

log = logging.getLogger(__name__)

RUNNERS = {
    "sample": sample.run,
    "format": formatting.run,
    "train": train.run,
    "evaluate": evaluate.run,
    "benchmark": benchmark.run,
    "push": push.run,
}
REPORT_INPUTS = ("evaluate", "benchmark")  # the stages whose files the model card shows


def run(cfg: Settings) -> dict:
    paths = RunPaths(cfg.run_dir)
    _init_distributed()
    manifest = load_manifest(paths)
    main = is_main_process()
    # Hub inputs are pinned to a commit once, by rank 0, and every rank loads that one (job/provenance.py).
    pins = _broadcast(provenance.resolve_pins(cfg, manifest.get("pins")) if main else None)
    provenance.use_pins(pins)
    hashes = provenance.Hashes(paths.input_hashes, write=main)
    todo = plan(cfg, paths, manifest, hashes)
    # The report is rendered after the last stage it shows that runs now; if none runs, only when its files are gone.
    report_after = next((s for s in reversed(todo) if s in REPORT_INPUTS), None)
    with stop.handling_sigterm(), RunLock(paths.lock) if main else nullcontext():
        if main:
            _record_pins(cfg, paths, manifest, pins, hashes, write_report=report_after is None)
        _log_skipped(cfg, manifest, todo)
        for stage in todo:
            if stage != "train" and not main:
                _barrier()  # wait for rank 0 to finish this stage
                manifest = _wait_until_done(paths, stage)
                continue
            record = _start(cfg, paths, manifest, stage, hashes, main)
            log.info("stage %-9s starting", stage)
            t0 = time.perf_counter()
            if stage == "train":  # its checkpoints carry the fingerprint; it resumes only from matching ones
                artifacts = train.run(cfg, paths, record | {"code": provenance.code_version()})
            else:
                artifacts = RUNNERS[stage](cfg, paths)
            _release_gpu_memory()
            seconds = round(time.perf_counter() - t0, 1)
            if main:
                _finish(paths, manifest, stage, record, seconds, artifacts)
            log.info("stage %-9s done in %.1f s", stage, seconds)
            if main and stage == report_after:
                _write_report(cfg, paths, manifest)
            _barrier()  # the other ranks wait here for rank 0's stages, and for each other after training
    return manifest


def _record_pins(cfg: Settings, paths: RunPaths, manifest: dict, pins: dict, hashes, write_report: bool) -> None:
    """Rank 0, once it owns the run directory: saves the hashes and new pins, and renders the report again when
    evaluation is done but the report is unrecorded or gone (deleted, or the run was stopped before it)."""
    hashes.save()
    if pins and manifest.get("pins") != pins:
        manifest["pins"] = pins
        save_manifest(paths, manifest)
    recorded = manifest.get("report", {}).get("artifacts")
    evaluated = manifest["stages"].get("evaluate", {}).get("status") == "done"
    if write_report and evaluated and not (recorded and all((paths.root / a).exists() for a in recorded)):
        _write_report(cfg, paths, manifest)


def _log_skipped(cfg: Settings, manifest: dict, todo: list[str]) -> None:
    # `todo` is a tail of the selected stages (plan), so these all come before the first stage that runs.
    for stage in (s for s in STAGES if s in cfg.stages and s not in todo):
        log.info("stage %-9s already done (%s); skipping", stage, manifest["stages"][stage]["finished_at"])


def _start(cfg: Settings, paths: RunPaths, manifest: dict, stage: str, hashes, main: bool) -> dict:
    """The stage's fingerprint from what it reads now, upstream stages just rerun included (recorded when it is
    done). Rank 0 records it as running; every stage downstream of one being (re)run is stale from now on."""
    i = STAGES.index(stage)
    upstream = provenance.record_digest(manifest["stages"][STAGES[i - 1]]) if i else None
    record = provenance.fingerprint(cfg, paths, stage, upstream, hashes)
    if main:
        for later in STAGES[i:]:
            manifest["stages"].pop(later, None)
        if stage != "push":
            manifest.pop("report", None)
        manifest["stages"][stage] = {"status": "running", "started_at": _now(), **record}
        manifest["versions"] = versions()
        save_manifest(paths, manifest)
        hashes.save()
    return record


def _finish(paths: RunPaths, manifest: dict, stage: str, record: dict, seconds: float, artifacts: list) -> None:
    manifest["stages"][stage] = {
        "status": "done",
        **record,
        "code": provenance.code_version(),
        "started_at": manifest["stages"][stage]["started_at"],
        "finished_at": _now(),
        "seconds": seconds,
        "artifacts": [str(Path(a).relative_to(paths.root)) for a in artifacts],
    }
    save_manifest(paths, manifest)


# --- the report ----------------------------------------------------------------------------------------
def _write_report(cfg: Settings, paths: RunPaths, manifest: dict) -> None:
    """Render the model card and loss plot from the stages' files and records, and record them in the manifest."""
    files = report.write(cfg, paths, manifest)
    manifest["report"] = {"rendered_at": _now(), "artifacts": [str(f.relative_to(paths.root)) for f in files]}
    save_manifest(paths, manifest)


# --- what to run ---------------------------------------------------------------------------------------
def plan(cfg: Settings, paths: RunPaths, manifest: dict, hashes: provenance.Hashes | None = None) -> list[str]:
    """The selected stages that will run, after checking everything knowable before a model loads; all problems
    are reported together. Once one stage runs, every selected stage after it runs too (its inputs are new)."""
    hashes = hashes or provenance.Hashes(None)
    problems = preflight(cfg, paths)
    done = manifest["stages"]
    last = max((STAGES.index(s) for s in cfg.stages if s in STAGES), default=-1)
    todo: list[str] = []
    upstream: str | None = None  # the digest of the stage before, as the next stage will read it
    for stage in STAGES[: last + 1]:
        rec = done.get(stage, {})
        finished = rec.get("status") == "done"
        now = provenance.fingerprint(cfg, paths, stage, upstream, hashes)
        upstream = provenance.record_digest(rec) if finished and not todo else now["digest"]
        if stage not in cfg.stages:
            problems += _unselected_problem(cfg, stage, rec, now, finished, todo)
        elif todo or not finished or _must_rerun(cfg, paths, stage, rec, now, problems):
            todo.append(stage)
    if {"format", "train", "evaluate"} & set(todo):  # the model's own files, for stages that will load it
        problems += _problems_of(check_base_model, cfg, lora="train" in todo)
    if problems:
        raise ConfigError("Cannot start:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    return todo


def _unselected_problem(cfg: Settings, stage: str, rec: dict, now: dict, finished: bool, todo: list) -> list[str]:
    """[why a stage left out of STAGES stops a later selected one], or []: it must be finished and unchanged."""
    later = next(s for s in STAGES[STAGES.index(stage) + 1 :] if s in cfg.stages)
    if not finished:
        return [f"STAGES={cfg.STAGES!r}: stage '{later}' needs '{stage}' finished first; add it"]
    if todo:
        return [
            f"STAGES={cfg.STAGES!r}: stage '{stage}' reads what '{todo[-1]}' writes, which runs now, so "
            f"'{later}' needs '{stage}' run again too; add it"
        ]
    if why := _why_stale(stage, rec, now, cfg, redo=False):
        return [
            f"STAGES={cfg.STAGES!r}: stage '{stage}' is not selected, and it finished with other settings "
            f"or inputs ({'; '.join(why)}), so '{later}' and the stages after it would describe work these "
            f"settings did not do (an adapter they did not train). Add '{stage}' to STAGES (with "
            "REDO=true) to redo it, or set the settings back"
        ]
    return []


def _must_rerun(cfg: Settings, paths: RunPaths, stage: str, rec: dict, now: dict, problems: list[str]) -> bool:
    """Whether a finished, selected stage runs again: its files are gone, or it changed and REDO is set (changed
    without REDO is a problem, added to `problems`)."""
    missing = [a for a in rec.get("artifacts", []) if not (paths.root / a).exists()]
    if missing:
        log.warning("stage %s was done but %s is gone: running it again", stage, ", ".join(missing))
        return True
    why = _why_stale(stage, rec, now, cfg, redo=cfg.REDO)
    if why and cfg.REDO:
        log.info("REDO: stage %s reruns (%s)", stage, "; ".join(why))
        return True
    if why:
        problems.append(
            f"stage '{stage}' already finished in {paths.root} with other settings or inputs ({'; '.join(why)}). "
            "Set REDO=true to rerun it and the stages after it, or choose another RUN_NAME"
        )
    return False


def _why_stale(stage: str, rec: dict, now: dict, cfg: Settings, redo: bool) -> list[str]:
    """Why a finished stage no longer matches these settings and inputs: one phrase per changed setting or input,
    and the stage before it if that was redone since. [] when it matches. A record of an older version, without
    inputs, matches when its settings do (logged), except under `redo`."""
    recorded = rec.get("fingerprint", {})
    why = [
        f"{k}: {recorded.get(k)!r} -> {v!r}"
        for k, v in cfg.fingerprint_for(DEPENDS[stage]).items()
        if recorded.get(k) != v
    ]
    if "digest" not in rec:  # recorded by a version that fingerprinted settings only
        if not why:
            if redo:
                return ["its inputs were not recorded (an older version ran it)"]
            log.info(
                "stage %s was recorded by an older version of the job, without its inputs' fingerprints: taken as "
                "unchanged (REDO=true reruns it)",
                stage,
            )
        return why
    changed, gone = provenance.changed_inputs(rec.get("inputs", {}), now["inputs"])
    for what in gone:
        log.warning("stage %s: %s is gone; its recorded output is kept", stage, what)
    why += changed
    if not why and rec.get("upstream") != now["upstream"]:
        before = STAGES[STAGES.index(stage) - 1]
        why.append(f"stage '{before}', whose output it read, was redone since")
    return why


def preflight(cfg: Settings, paths: RunPaths) -> list[str]:
    """Problems knowable before loading anything: a writable run directory, a token, the data file, hardware."""
    problems = _write_problems(cfg, paths)
    selected = set(cfg.stages)
    if "push" in selected and cfg.HUB_REPO_ID and not cfg.HF_TOKEN:
        problems.append(
            f"HUB_REPO_ID={cfg.HUB_REPO_ID!r} needs HF_TOKEN in the environment (a token with write access); "
            "or leave HUB_REPO_ID empty to stage the files without uploading"
        )
    if "push" in selected and cfg.HUB_REPO_ID and push.hub_offline():  # else found only after training
        problems.append(
            f"HUB_REPO_ID={cfg.HUB_REPO_ID!r} cannot be pushed to with HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: "
            "unset it to push, or leave HUB_REPO_ID empty to stage the files in push/ without uploading"
        )
    if "sample" in selected:
        try:
            named = mixture.input_names(cfg.DATASET)  # reads a mixture file, which may be the problem
        except ConfigError as e:
            named, problems = [], [*problems, str(e)]
        for _, source in named:
            if is_local_path(source):
                problems += _problems_of(sample.check_local_file, Path(source).expanduser())
    if {"train", "evaluate", "push"} & selected:
        problems += _problems_of(resolve_precision, cfg) + _problems_of(check_quantization, cfg)
    if "train" in selected:
        problems += _problems_of(check_one_process_per_gpu)
    return problems


def _write_problems(cfg: Settings, paths: RunPaths) -> list[str]:
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        if is_main_process():  # one writer: the other ranks never write into the run directory
            probe = paths.root / ".write-test"
            try:
                with probe.open("w") as f:
                    f.write("ok")
                    f.flush()
                    os.fsync(f.fileno())  # a full disk may take the write into memory and refuse it only here
            finally:
                probe.unlink(missing_ok=True)
    except OSError as e:
        if e.errno in errors.DISK_ERRNOS:  # the disk or the folder's permissions: exit 6, not a bad setting
            raise errors.disk_error(e, f"OUTPUT_DIR={cfg.OUTPUT_DIR!r}", str(paths.root)) from None
        return [f"OUTPUT_DIR={cfg.OUTPUT_DIR!r}: cannot write {paths.root} ({e.strerror}); choose a writable folder"]
    return []


def _problems_of(check, *args, **kwargs) -> list[str]:
    """[the message of the ConfigError `check` raises], or [] when it passes: so all problems are listed at once."""
    try:
        check(*args, **kwargs)
    except ConfigError as e:
        return [str(e)]
    return []


# --- the manifest --------------------------------------------------------------------------------------
def load_manifest(paths: RunPaths) -> dict:
    if not paths.manifest.is_file():
        return {"stages": {}}
    try:
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        _check_manifest_shape(manifest)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{paths.manifest} is damaged ({e}), so which stages finished is unknown. Delete it to run every "
            f"stage again in {paths.root} (checkpoints are kept and training resumes), or choose another RUN_NAME."
        ) from None
    return manifest


# The manifest's shape as the pipeline reads it: key -> type, for the whole file, each stage's record and the
# report's. A hand-edited file with another type where the pipeline reads one would fail later with a traceback.
_MANIFEST_SHAPE = {"stages": dict, "report": dict, "versions": dict}
_RECORD_SHAPE = {"status": str, "fingerprint": dict, "artifacts": list, "finished_at": str, "started_at": str}


def _check_manifest_shape(manifest: Any) -> None:
    """ValueError naming the first field of `manifest` whose type is not what the pipeline reads."""

    def check(record: Any, shape: dict[str, type], where: str) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{where or 'the file'} is a JSON {_json_type(record)}, not an object")
        for key, typ in shape.items():
            if key in record and not isinstance(record[key], typ):
                name = f"{where}.{key}" if where else key
                raise ValueError(f"{name} is a JSON {_json_type(record[key])}, not {_json_type(typ(), article=True)}")

    check(manifest, _MANIFEST_SHAPE, "")
    if "stages" not in manifest:
        raise ValueError("no 'stages' object")
    records = [(f"stages.{name}", r) for name, r in manifest["stages"].items()]
    for where, record in records + ([("report", manifest["report"])] if "report" in manifest else []):
        check(record, _RECORD_SHAPE, where)
        if not all(isinstance(a, str) for a in record.get("artifacts", [])):
            raise ValueError(f"{where}.artifacts holds something other than file names")
        if record.get("status") == "done":
            record.setdefault("finished_at", "time not recorded")  # only the log reads it


def _json_type(value: Any, article: bool = False) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "true/false", int: "number", float: "number"}
    name = "null" if value is None else names.get(type(value), type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}" if article else name


def save_manifest(paths: RunPaths, manifest: dict) -> None:
    atomic_write_text(paths.manifest, json.dumps(manifest, indent=2, default=str))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


# --- processes and devices -----------------------------------------------------------------------------
def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    """Rank 0's `obj` on every rank (under torchrun); `obj` itself otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# How long a collective may wait. The other ranks wait in a barrier while rank 0 alone samples, evaluates (with
# a judge), benchmarks and pushes: hours with a large dataset, BENCHMARK_LIMIT or EVAL_PROMPTS, a slow judge
# endpoint or a merged upload. NCCL's default of 10 minutes would abort them mid-run. A rank that dies is caught
# by torchrun, which stops the others; this timeout only bounds a hang with every process alive.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


def _init_distributed() -> None:
    """Under torchrun, join the process group early so non-training stages can wait on rank 0."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)


def _release_gpu_memory() -> None:
    """After a stage: free what it left on the GPU and start a fresh peak-memory count for the next.

    What a stage leaves in reference cycles is freed only when Python's cycle collector runs, at a time
    of its choosing: without this the training model can still be allocated next to evaluation's.
    """
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _wait_until_done(paths: RunPaths, stage: str, timeout_s: float = 600.0) -> dict:
    """Rank 0's manifest as this rank sees it, once it says `stage` is done.

    On one machine the barrier is enough. Across nodes the run directory is a bucket mount that
    shows another node's writes after an upload and a cache expiry (seconds), so we poll.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = load_manifest(paths)
        if manifest["stages"].get(stage, {}).get("status") == "done":
            return manifest
        if time.monotonic() > deadline:
            raise ConfigError(
                f"stage '{stage}' finished on rank 0 but {paths.manifest} does not show it here after "
                f"{timeout_s:.0f} s: OUTPUT_DIR must be storage that every node sees (a shared bucket mount)."
            )
        time.sleep(2)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
