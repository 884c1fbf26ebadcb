"""Stage 1, sample: draw, clean and split conversations; write data/train.jsonl, eval.jsonl, stats.json.

Rows are visited in a seeded random order and cleaned one at a time until NUM_SAMPLES +
EVAL_SAMPLES usable rows are kept, so a 257k-row Hub dataset is never cleaned (or held in
Python objects) in full: `datasets` keeps it memory-mapped in Arrow and we index into it.
The first EVAL_SAMPLES kept rows are the held-out split, so the eval set does not move when
NUM_SAMPLES changes. Duplicates are removed by a normalised Patient key across both splits,
which is what makes train and eval disjoint.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from job.config import Settings
from job.errors import ConfigError, TransientError
from job.faults import maybe_die
from job.files import atomic_write_text, write_jsonl

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MIN_REPLY_CHARS = 20  # shorter "replies" are fragments like "Hi." left after boilerplate removal

# --- cleaning rules -----------------------------------------------------------------------------
# Each rule is a (name, function) pair; stats.json counts the rows each one changed.
# Punctuation after a link ends the sentence, not the link: "see www.x.org. Then" becomes "see. Then".
_URL = re.compile(r"\s*(?:https?://|www\.)\S+?(?=[.,;:!?)\]]*(?:\s|$))", re.I)
_ARROW = re.compile(r"\s*-->\s*")
# Sentences that belong to the Q&A platforms, not to medicine. Removing the whole sentence keeps
# the reply grammatical ("Hello, welcome to Chat Doctor." vanishes rather than becoming "Hello,").
_BOILERPLATE = re.compile(
    r"chat\s*doctor|health\s*care\s*magic|icliniq|thanks? (you )?for (using|choosing|posting|asking|"
    r"contacting|your (query|question)|the (query|question))|welcome to|for further (queries|doubts|"
    r"information),? consult|hope (this|i have|my answer)[\w\s]{0,30}(helps?|answered|useful|solves)|"
    r"wish(ing)? you (good|a speedy|speedy) (health|recovery)|feel free to (ask|contact|write)|"
    r"let me know if you have any (other|further|more) (questions?|quer)",
    re.I,
)
# A trailing sign-off such as "Regards, Dr. Satyanarayan Kabra", "Take care. Dr Ravi" or a bare
# "Regards, Dr." left when the name was boilerplate. "Dr" must follow a sign-off word or start a
# sentence, so advice that ends "... see your Dr. soon." is not cut.
_SIGNOFF_WORDS = r"\b(?:regards|best wishes|take care|thanks|thank you|good luck|sincerely)\b[\s,.!]*"
_NAME_WORD = r"[\s,]+[a-z][\w.]*"
_SIGNOFF = re.compile(
    rf"(?:{_SIGNOFF_WORDS})+\bdr\b\.?(?:{_NAME_WORD}){{0,4}}[\s.,]*$"
    rf"|(?:^|(?<=[.!?]))\s*\bdr\b\.?(?:{_NAME_WORD}){{1,4}}[\s.,]*$",
    re.I,
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])(\s+)")  # the separator is kept, so paragraphs survive


def _whitespace(text: str) -> str:
    text = text.replace("\u00a0", " ").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _urls(text: str) -> str:
    return _URL.sub("", text)


def _arrows(text: str) -> str:
    return _ARROW.sub(" ", text)


def _boilerplate(text: str) -> str:
    parts = _SENTENCE_SPLIT.split(text) + [""]  # sentence, separator, sentence, ..., separator
    text = "".join(s + sep for s, sep in zip(parts[::2], parts[1::2]) if not _BOILERPLATE.search(s)).rstrip()
    # Sign-offs can repeat ("Regards. Dr. X. Take care"), so strip until stable.
    while (stripped := _SIGNOFF.sub("", text).rstrip()) != text:
        text = stripped
    return text


RULES = [("whitespace", _whitespace), ("urls", _urls), ("arrows", _arrows), ("boilerplate", _boilerplate)]
DOCTOR_ONLY_RULES = {"boilerplate"}  # patients don't write platform boilerplate; their "Dr." is a greeting


def clean_text(text: Any, field: str = "doctor", changed: Counter | None = None) -> str:
    """Apply every cleaning rule in order; count in `changed` which rules altered the text."""
    text = "" if text is None else str(text)
    for name, rule in RULES:
        if name in DOCTOR_ONLY_RULES and field != "doctor":
            continue
        # Tidy the spaces a removal leaves behind, so they are not counted as the whitespace rule's
        # work (that counts the raw text's tabs, \u00a0, \r\n ...) and the next rule sees single spaces.
        new = _whitespace(rule(text))
        if new != text and changed is not None:
            changed[f"{field}.{name}"] += 1
        text = new
    return text


def dedup_key(text: str) -> str:
    """Near-exact duplicate key: lowercase letters and digits only (case, punctuation, spacing ignored)."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


# --- loading ------------------------------------------------------------------------------------
def is_local_path(name: str) -> bool:
    p = Path(name)
    return p.suffix.lower() in LOCAL_SUFFIXES or p.exists() or name.startswith((".", "/", "~"))


def check_local_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"DATASET={str(path)!r}: no such file. Give a .jsonl/.json/.csv/.parquet path or a Hub id.")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ConfigError(f"DATASET={str(path)!r}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}.")
    if path.stat().st_size == 0:
        raise ConfigError(f"DATASET={str(path)!r}: the file is empty.")
    if path.suffix.lower() != ".parquet":
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(
                        f"DATASET={str(path)!r}: line {lineno} is not UTF-8 ({e.reason} at byte {e.start}). "
                        "Re-save the file as UTF-8."
                    ) from None
                if path.suffix.lower() == ".jsonl" and line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(
                            f"DATASET={str(path)!r}: line {lineno} is not valid JSON ({e.msg}, column {e.colno}). "
                            "Fix or delete that line: each line must be one JSON object."
                        ) from None


def load_rows(cfg: Settings):
    """Return the dataset as a memory-mapped `datasets.Dataset` (Hub id or local file)."""
    import datasets

    name = cfg.DATASET
    try:
        if is_local_path(name):
            path = Path(name).expanduser()
            check_local_file(path)
            builder = LOCAL_SUFFIXES[path.suffix.lower()]
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(name, split=cfg.DATASET_SPLIT, token=cfg.HF_TOKEN or None)
    except ConfigError:
        raise
    except (ConnectionError, TimeoutError) as e:
        raise TransientError(f"DATASET={name!r}: could not reach the Hugging Face Hub ({e}). Retry later.") from None
    except Exception as e:  # datasets raises many types; classify by what the message says
        msg = str(e)
        if any(w in msg.lower() for w in ("connection", "timed out", "temporarily", "couldn't reach", "offline")):
            raise TransientError(f"DATASET={name!r}: the Hub could not be reached ({msg}). Retry later.") from None
        raise ConfigError(f"DATASET={name!r}: could not be loaded: {type(e).__name__}: {msg}") from None


# --- the stage ----------------------------------------------------------------------------------
def sample(cfg: Settings, ds, guard=None) -> tuple[list[dict], list[dict], dict]:
    """Walk `ds` in seeded random order; return (train, eval, stats). `guard`: a job.benchmark.Decontaminator."""
    import numpy as np
    from tqdm.auto import tqdm

    columns = {"description": cfg.DESCRIPTION_COLUMN, "patient": cfg.PATIENT_COLUMN, "doctor": cfg.DOCTOR_COLUMN}
    required = ["patient", "doctor"] + (["description"] if cfg.USE_DESCRIPTION else [])
    missing = [f"{k.upper()}_COLUMN={columns[k]!r}" for k in required if columns[k] not in ds.column_names]
    if missing:
        raise ConfigError(
            f"DATASET={cfg.DATASET!r} lacks the column(s) {', '.join(missing)}; "
            f"it has {ds.column_names}. Set the *_COLUMN settings to match."
        )
    wanted = cfg.NUM_SAMPLES + cfg.EVAL_SAMPLES
    order = np.random.default_rng(cfg.SEED).permutation(len(ds))
    dropped: Counter = Counter()
    changed: Counter = Counter()
    seen_exact: set[tuple[str, str]] = set()
    seen_keys: set[str] = set()
    kept: list[dict] = []
    read = 0
    chunk = 1024  # rows fetched from Arrow per call: one call per row is ~100x slower
    with tqdm(total=wanted, desc="sample", unit="row", disable=None) as bar:
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk].tolist()
            batch = ds[idx]
            for j, i in enumerate(idx):
                read += 1
                raw = {k: batch[c][j] if c in batch else "" for k, c in columns.items()}
                row = {k: clean_text(v, k, changed) for k, v in raw.items()}
                if not row["patient"]:
                    dropped["empty_patient"] += 1
                    continue
                if not row["doctor"]:
                    dropped["empty_doctor"] += 1
                    continue
                if len(row["doctor"]) < MIN_REPLY_CHARS:
                    dropped["reply_too_short"] += 1
                    continue
                exact = (row["patient"], row["doctor"])
                if exact in seen_exact:
                    dropped["exact_duplicate"] += 1
                    continue
                seen_exact.add(exact)
                key = dedup_key(row["patient"])
                if key in seen_keys:
                    dropped["near_duplicate"] += 1
                    continue
                seen_keys.add(key)
                # --- decontamination (job/benchmark.py): the first EVAL_SAMPLES kept rows are the held-out
                # split; a later row sharing 13 words in a row with one of them or with a benchmark question
                # is dropped, counted as overlap_benchmark / overlap_held_out.
                if guard is not None:
                    if len(kept) < cfg.EVAL_SAMPLES:
                        guard.hold_out(row)
                    elif source := guard.overlap(row):
                        dropped[f"overlap_{source}"] += 1
                        continue
                # --- end decontamination ---
                row["source_index"] = int(i)
                kept.append(row)
                bar.update(1)
                if len(kept) == wanted:
                    break
            if len(kept) == wanted:
                break

    if len(kept) < wanted:
        raise ConfigError(
            f"NUM_SAMPLES={cfg.NUM_SAMPLES} + EVAL_SAMPLES={cfg.EVAL_SAMPLES} need {wanted} usable rows, but "
            f"DATASET={cfg.DATASET!r} has only {len(kept)} after cleaning ({read} read; dropped: "
            f"{dict(dropped) or 'none'}). Lower NUM_SAMPLES or EVAL_SAMPLES."
        )
    eval_rows, train_rows = kept[: cfg.EVAL_SAMPLES], kept[cfg.EVAL_SAMPLES :]
    lengths = [len(r["patient"]) + len(r["doctor"]) for r in kept]
    stats = {
        "dataset": cfg.DATASET,
        "rows_in_dataset": len(ds),
        "rows_read": read,
        "rows_kept": len(kept),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "dropped": dict(sorted(dropped.items())),
        "changed": dict(sorted(changed.items())),
        "chars_per_conversation": {
            "mean": round(statistics.fmean(lengths), 1),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
    }
    return train_rows, eval_rows, stats


def run(cfg: Settings, run_dir: Path) -> list[Path]:
    from job import benchmark
    from job.paths import RunPaths

    ds = load_rows(cfg)
    # --- benchmark questions (BENCHMARK_TASKS), fetched here for the benchmark stage and decontamination ---
    guard = benchmark.fetch(cfg, RunPaths(run_dir).benchmark_data)
    train_rows, eval_rows, stats = sample(cfg, ds, guard)
    stats["decontamination"] = guard.summary()
    out = run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train_rows)
    maybe_die("sample.partial")
    write_jsonl(out / "eval.jsonl", eval_rows)
    atomic_write_text(out / "stats.json", json.dumps({"sample": stats}, indent=2))
    log.info(
        "sampled %d train + %d eval rows from %d read (dropped %s)",
        len(train_rows),
        len(eval_rows),
        stats["rows_read"],
        stats["dropped"] or "none",
    )
    return [out / "train.jsonl", out / "eval.jsonl", out / "stats.json"]
