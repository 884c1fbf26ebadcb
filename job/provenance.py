"""Provenance: what made each artifact of a run, identified by content, never by name.

A stage's fingerprint is its settings (job/config.py DEPENDS), the fingerprints of the inputs it reads from
outside the run directory, and the digest of the stage before it, whose output it reads (so a changed input
reaches every later stage through that chain):

- a local file (DATASET, each BENCHMARK_DATA question file) by the sha256 of its bytes; a local BASE_MODEL
  folder by those of its files (config, tokenizer, weights). `Hashes` caches them in RUN_DIR/input_hashes.json
  by (size, mtime, ctime), so a rerun reads no 257k-row file again;
- a Hub dataset or model by the commit sha its id resolved to at the run's first start (`resolve_pins`). The
  pin is kept in the manifest and passed as `revision=` to every later load (`pinned`), so a run resumed on
  another machine reads the same revision even after the Hub repo moved on;
- the benchmark stage's questions (data/benchmark/, fetched by the sample stage) by their hashes too: from the
  Hub they are not pinned otherwise.

The code that ran a stage (package version and git commit) is recorded beside its fingerprint, not in it: a
new version of the job does not make finished work stale, and the record still names the code that made it.
The pipeline (job/pipeline.py) compares these with the manifest's records, writes them there, and hands the
train stage its fingerprint, which every checkpoint carries (job/checkpoints.py). `python -m job provenance` prints
them (`show`). This module imports nothing heavy: the CLI command must stay fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job import mixture
from job.config import DEPENDS, STAGES, Settings
from job.errors import ConfigError, classify
from job.files import atomic_write_text, is_local_path

log = logging.getLogger(__name__)

# Files of a local BASE_MODEL folder that are hashed: every non-hidden file at its top level (config,
# tokenizer, chat template, weights). Sub-folders (a Hub download's .cache/) are not read by from_pretrained.
_CHUNK = 1 << 20  # bytes read per hashing call
_LARGE = 1 << 28  # log before hashing more than this many uncached bytes (256 MiB): it takes seconds


# --- content hashes, cached ----------------------------------------------------------------------------
class Hashes:
    """sha256 of files' bytes, cached by (size, mtime_ns, ctime_ns) in a JSON file of the run directory.

    The cache key is the file's size, modification time and status-change time: an edit changes the first
    two, and restoring the modification time afterwards (touch -d, os.utime) changes the third, which no
    program can set back. A copy or a move to another disk costs one more hash, nothing else. `write=False`
    (torchrun ranks other than 0): read the cache, never write it.
    """

    def __init__(self, cache_file: Path | None, write: bool = True):
        self.path = cache_file
        self.write = write and cache_file is not None
        self.entries: dict[str, dict] = {}
        self.changed = False
        if cache_file is not None and cache_file.is_file():
            try:
                entries = json.loads(cache_file.read_text(encoding="utf-8"))
                self.entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError):  # a damaged cache is only a cache: hash again
                self.entries = {}

    @staticmethod
    def _key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def sha256(self, path: Path) -> str:
        path = Path(path).expanduser().absolute()
        before = path.stat()
        entry = self.entries.get(str(path))
        if isinstance(entry, dict) and entry.get("key") == self._key(before) and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        after = path.stat()
        if self._key(after) == self._key(before):  # not cached if it changed while being read
            self.entries[str(path)] = {"key": self._key(after), "sha256": digest}
            self.changed = True
        return digest

    def uncached_bytes(self, files: list[Path]) -> int:
        total = 0
        for f in files:
            st = f.stat()
            entry = self.entries.get(str(f.expanduser().absolute()))
            if not (isinstance(entry, dict) and entry.get("key") == self._key(st)):
                total += st.st_size
        return total

    def save(self) -> None:
        if self.write and self.changed:
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True))
            self.changed = False


# --- the code ------------------------------------------------------------------------------------------
@functools.cache
def code_version() -> dict[str, Any]:
    """{"package": version, "commit": git sha or None, "modified": uncommitted changes to tracked files or None}.

    The commit is read only where the package sits in its own git checkout (not in an installed copy or an
    image without .git); a missing or failing git leaves it None, never an error.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("hippocratically")
    except PackageNotFoundError:
        package = None
    root = Path(__file__).resolve().parents[1]
    commit = modified = None
    if (root / ".git").exists():
        try:
            git = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
            commit = git(["git", "-C", str(root), "rev-parse", "HEAD"], timeout=10).stdout.strip()
            status = git(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], timeout=30)
            modified = bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            commit = modified = None
    return {"package": package, "commit": commit or None, "modified": modified}


def describe_code(code: Any) -> str:
    if not isinstance(code, dict):
        return "not recorded"
    text = f"hippocratically {code.get('package') or '(version unknown)'}"
    if code.get("commit"):
        text += f", git {str(code['commit'])[:12]}" + (" with uncommitted changes" if code.get("modified") else "")
    return text


# --- Hub revisions: resolved once, pinned in the manifest -----------------------------------------------
_PINS: dict[str, dict] = {}  # the revisions this process loads (use_pins): setting name -> {id, revision}


def use_pins(pins: dict | None) -> None:
    """Make job/model.py and job/sample.py load these revisions (the pipeline calls this before any load)."""
    _PINS.clear()
    _PINS.update(pins or {})


def pinned(name: str, value: str) -> str | None:
    """The pinned commit of setting `name` when it still names `value`; None for a local path or no pin."""
    pin = _PINS.get(name)
    return pin.get("revision") if isinstance(pin, dict) and pin.get("id") == value else None


def is_hub_id(name: str, value: str) -> bool:
    """Whether DATASET or BASE_MODEL names a Hub repository rather than a local file or folder."""
    if name == "DATASET":
        local = is_local_path(value)
    else:
        local = Path(value).expanduser().exists() or value.startswith((".", "/", "~"))
    return not local and "/" in value.strip("/") and " " not in value


def _cached_revision(repo_id: str, repo_type: str) -> str | None:
    """The commit the local Hugging Face cache holds for the repo's main branch (offline runs)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / "main"
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha or None


def hub_revision(name: str, repo_id: str, repo_type: str, token: str | None) -> str:
    """The commit sha the Hub's main branch of `repo_id` points at now (offline: the one the cache holds)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token or None)
    try:
        info = api.dataset_info(repo_id) if repo_type == "dataset" else api.model_info(repo_id)
        if info.sha:
            return info.sha
        raise ValueError("the Hub gave no commit sha")
    except Exception as e:
        cached = _cached_revision(repo_id, repo_type)
        if cached:
            why = type(e).__name__
            log.info("%s=%r: the Hub did not answer (%s); using the revision in the local cache", name, repo_id, why)
            return cached
        err = classify(e, f"{name}={repo_id!r}")
        if err is not None:
            raise err from None
        raise ConfigError(f"{name}={repo_id!r}: its revision could not be resolved ({type(e).__name__}: {e})") from None


def resolve_pins(cfg: Settings, pins: dict | None) -> dict:
    """The manifest's pins, with every Hub input of these settings pinned: an input pinned for the same id keeps
    its revision (resumed runs, other machines); one not pinned yet, or whose id changed, is resolved now."""
    out = {k: v for k, v in (pins or {}).items() if isinstance(v, dict)}
    named = [(key, value, "dataset") for key, value in mixture.input_names(cfg.DATASET)]
    for name, value, repo_type in [*named, ("BASE_MODEL", cfg.BASE_MODEL, "model")]:
        if not is_hub_id(name.partition("[")[0], value):
            continue
        if out.get(name, {}).get("id") == value and out[name].get("revision"):
            continue
        revision = hub_revision(name, value, repo_type, cfg.HF_TOKEN)
        out[name] = {"id": value, "revision": revision, "pinned_at": _now()}
        log.info("%s=%r: pinned to revision %s; this run loads that revision from now on", name, value, revision)
    return out


# --- fingerprints --------------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity(inp: dict) -> Any:
    """What an input's fingerprint compares: its content hash or its revision (None when it is gone)."""
    return inp.get("sha256") or inp.get("revision")


def file_input(path: Path, hashes: Hashes) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        return {"id": str(path), "missing": True}
    return {"id": str(path), "sha256": hashes.sha256(p), "bytes": p.stat().st_size}


def files_input(label: str, folder: Path, names: list[str], hashes: Hashes) -> dict:
    """A set of files in one folder: each file's sha256, and one over all of them (names included)."""
    folder = Path(folder).expanduser()
    files = {n: (hashes.sha256(folder / n) if (folder / n).is_file() else None) for n in sorted(names)}
    inp = {"id": label, "files": files, "sha256": _digest(files)}
    if None in files.values():
        inp["missing"] = True
    return inp


def _hub_input(name: str, value: str) -> dict | None:
    """A Hub input's id and pinned revision; `name` is its setting, or DATASET[source] for a mixture's source."""
    return {"id": value, "revision": pinned(name, value)} if is_hub_id(name.partition("[")[0], value) else None


def base_model_input(cfg: Settings, hashes: Hashes) -> dict:
    value = cfg.BASE_MODEL
    if hub := _hub_input("BASE_MODEL", value):
        return hub
    path = Path(value).expanduser()
    if path.is_file():  # a single-file model (.gguf)
        return file_input(path, hashes)
    if not path.is_dir():
        return {"id": value, "missing": True}
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    big = hashes.uncached_bytes(files)
    if big > _LARGE:
        log.info("hashing BASE_MODEL's files once (%.1f GiB): a content fingerprint of the base model", big / 2**30)
    inp = files_input(value, path, [f.name for f in files], hashes)
    inp["bytes"] = sum(f.stat().st_size for f in files)
    return inp


def stage_inputs(cfg: Settings, paths, stage: str, hashes: Hashes) -> dict[str, dict]:
    """What `stage` reads from outside the stages before it, by content. Named by the setting that points at
    it, or by the run-directory folder."""
    inputs: dict[str, dict] = {}
    tasks = [f"{t}.jsonl" for t in cfg.benchmark_tasks]
    if stage == "sample":
        if mixture.is_file(cfg.DATASET):  # the file's text decides each source's format and columns
            inputs["DATASET"] = file_input(Path(cfg.DATASET.strip()), hashes)
        for key, value in mixture.input_names(cfg.DATASET):  # each source of a mixture on its own
            inputs[key] = _hub_input(key, value) or file_input(Path(value), hashes)
        if tasks and cfg.BENCHMARK_DATA:
            inputs["BENCHMARK_DATA"] = files_input(cfg.BENCHMARK_DATA, Path(cfg.BENCHMARK_DATA), tasks, hashes)
    if stage in ("format", "train", "evaluate", "benchmark") or (stage == "push" and cfg.PUSH_MERGED):
        inputs["BASE_MODEL"] = base_model_input(cfg, hashes)
    if stage == "benchmark" and tasks:
        folder = paths.benchmark_data
        inputs["benchmark questions"] = files_input(folder.relative_to(paths.root).as_posix(), folder, tasks, hashes)
    return inputs


def fingerprint(cfg: Settings, paths, stage: str, upstream: str | None, hashes: Hashes) -> dict:
    """The stage's record as these settings and inputs make it: settings, inputs, the digest of the stage
    before it, and the digest of all three (what a checkpoint or a later run compares)."""
    settings = cfg.fingerprint_for(DEPENDS[stage])
    inputs = stage_inputs(cfg, paths, stage, hashes)
    ids = {k: identity(v) for k, v in inputs.items()}
    return {
        "fingerprint": settings,
        "inputs": inputs,
        "upstream": upstream,
        "digest": _digest({"settings": settings, "inputs": ids, "upstream": upstream}),
    }


def record_digest(rec: dict) -> str:
    """A stage record's digest; for a record written before fingerprints had inputs, one of its settings."""
    return rec.get("digest") or "settings-only:" + _digest(rec.get("fingerprint"))


def _short(inp: dict | None) -> str:
    if not inp:
        return "absent"
    if inp.get("missing") and not identity(inp):
        return "missing"
    if inp.get("revision"):
        return f"revision {inp['revision'][:12]}"
    return f"sha256 {str(inp.get('sha256'))[:12]}"


def changed_inputs(recorded: dict, now: dict) -> tuple[list[str], list[str]]:
    """(what changed, what is gone) between two stages' inputs, one phrase per input, naming it."""
    changed, gone = [], []
    for name in sorted(set(recorded) | set(now)):
        old, new = recorded.get(name), now.get(name)
        if new and new.get("missing"):
            if old and identity(old):
                gone.append(f"{name} {new['id']}")
            continue
        if old is None or new is None or identity(old) != identity(new) or old.get("id") != new.get("id"):
            where = (new or old or {}).get("id", "")
            changed.append(f"input {name} {where} changed{_changed_files(old, new)}: {_short(old)} -> {_short(new)}")
    return changed, gone


def _changed_files(old: dict | None, new: dict | None) -> str:
    """' (a, b ...)': the first five files that differ between two sets of files; '' for anything else."""
    if not (old and new and isinstance(old.get("files"), dict) and isinstance(new.get("files"), dict)):
        return ""
    files = [n for n in sorted(set(old["files"]) | set(new["files"])) if old["files"].get(n) != new["files"].get(n)]
    return f" ({', '.join(files[:5])}{' ...' if len(files) > 5 else ''})" if files else ""


# --- reading a run's record (python -m job provenance) ---------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def checkpoint_fingerprint(path: Path) -> str | None:
    """The digest a checkpoint was trained under (job/checkpoints.py writes it before the marker); None if absent."""
    try:
        digest = json.loads((Path(path) / "fingerprint.json").read_text(encoding="utf-8")).get("digest")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def collect(run_dir: Path) -> dict:
    """What made each artifact of the run in `run_dir`, from its manifest and checkpoints, as one JSON object."""
    from job.paths import RunPaths

    paths = RunPaths(Path(run_dir))
    if not paths.manifest.is_file():
        raise ConfigError(
            f"{paths.manifest} does not exist: nothing has run in {paths.root}. Pass the run directory "
            "(OUTPUT_DIR/RUN_NAME), or set OUTPUT_DIR and RUN_NAME as the run had them."
        )
    try:
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            raise ValueError("no 'stages' object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{paths.manifest} is damaged ({e}); its provenance cannot be read.") from None
    stages = {st: _stage_record(rec) for st in STAGES if isinstance(rec := manifest["stages"].get(st), dict)}
    train_digest = stages.get("train", {}).get("digest")
    checkpoints = [_checkpoint(p, train_digest) for p in sorted(paths.checkpoints.glob("checkpoint-*"))]
    stale = sorted(p.name for p in paths.root.glob("checkpoints-stale-*") if p.is_dir())
    return {
        "run_dir": str(paths.root),
        "pins": manifest.get("pins", {}),
        "stages": stages,
        "checkpoints": checkpoints,
        "stale_checkpoints": stale,
        "report": manifest.get("report"),
        "versions": manifest.get("versions"),
    }


def _checkpoint(path: Path, train_digest: str | None) -> dict:
    digest = checkpoint_fingerprint(path)
    matches = digest is not None and digest == train_digest
    return {"name": path.name, "complete": (path / "COMPLETE").is_file(), "digest": digest, "matches_train": matches}


def _stage_record(rec: dict) -> dict:
    settings = rec.get("fingerprint") if isinstance(rec.get("fingerprint"), dict) else {}
    return {
        "status": rec.get("status"),
        "digest": rec.get("digest"),
        "settings_digest": _digest(settings) if settings else None,
        "settings": settings,
        "inputs": rec.get("inputs") if isinstance(rec.get("inputs"), dict) else None,
        "upstream": rec.get("upstream"),
        "code": rec.get("code"),
        "started_at": rec.get("started_at"),
        "finished_at": rec.get("finished_at"),
        "artifacts": rec.get("artifacts", []),
    }


def _input_line(name: str, inp: Any) -> str:
    if not isinstance(inp, dict):
        return f"{name}: {inp!r}"
    what = inp.get("id", "")
    if "revision" in inp:  # a Hub id
        ident = f"revision {inp.get('revision') or 'not pinned'}"
    elif inp.get("sha256"):
        ident = f"sha256 {inp['sha256']}"
    else:
        ident = "missing"
    size = f", {inp['bytes']:,} bytes" if isinstance(inp.get("bytes"), int) else ""
    files = f", {len(inp['files'])} files" if isinstance(inp.get("files"), dict) else ""
    return f"{name}: {what}  {ident}{size}{files}"


def show(info: dict) -> str:
    """`collect`'s object as text: one block per stage, then checkpoints, report and pins."""
    lines = [f"Provenance of {info['run_dir']}", ""]
    for stage, s in info["stages"].items():
        lines += _stage_lines(stage, s)
    if info["checkpoints"]:
        lines.append("")
        for c in info["checkpoints"]:
            state = "complete" if c["complete"] else "incomplete"
            match = "matches the train stage" if c["matches_train"] else "does not match the train stage"
            lines.append(f"checkpoint {c['name']}: {state}, fingerprint {c['digest'] or 'none'} ({match})")
    for name in info["stale_checkpoints"]:
        lines.append(f"moved aside: {name}/ (checkpoints of other settings or data; never resumed)")
    report = info.get("report")
    if isinstance(report, dict):
        lines += ["", f"report    rendered {report.get('rendered_at')}: {', '.join(report.get('artifacts', []))}"]
    pins = info.get("pins") or {}
    lines.append("")
    lines += [
        f"pinned    {name}={pin.get('id')} at revision {pin.get('revision')} (since {pin.get('pinned_at')})"
        for name, pin in pins.items()
    ] or ["pinned    nothing: no input comes from the Hub"]
    return "\n".join(lines) + "\n"


def _stage_lines(stage: str, s: dict) -> list[str]:
    lines = [
        f"{stage:<9} {s['status'] or '?'}, finished {s['finished_at'] or '-'}",
        f"    fingerprint   {s['digest'] or 'not recorded (written by an older version: settings only)'}",
        f"    settings      {s['settings_digest'] or 'not recorded'} ({len(s['settings'])} settings)",
    ]
    if s["inputs"] is None:
        lines.append("    inputs        not recorded (written by an older version)")
    lines += [f"    input         {_input_line(name, inp)}" for name, inp in (s["inputs"] or {}).items()]
    if s["upstream"]:
        lines.append(f"    after         {s['upstream']}")
    lines.append(f"    code          {describe_code(s['code'])}")
    if s["artifacts"]:
        lines.append(f"    made          {', '.join(s['artifacts'])}")
    return lines
