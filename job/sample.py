"""Stage 1, sample: draw, clean and split conversations; write data/train.jsonl, eval.jsonl, stats.json.

Rows of any DATA_FORMAT become one shape here (job/formats.py): a conversation of user and assistant turns.

Rows are visited in a seeded random order and taken one at a time until NUM_SAMPLES +
EVAL_SAMPLES usable rows are kept, so a 257k-row Hub dataset is never cleaned (or held in
Python objects) in full: `datasets` keeps it memory-mapped in Arrow and we index into it.
The cleaning itself runs a little ahead of the walk on WORKERS processes (job/parallel.py);
every decision below is taken in the walk, in order, so the files do not depend on WORKERS.
The first EVAL_SAMPLES kept rows are the held-out split, so the eval set does not move when
NUM_SAMPLES changes. Duplicates are removed by a normalised key of the user turns (the patient's message)
across both splits, which is what makes train and eval disjoint. A mixture (DATASET=source:weight,...,
job/mixture.py) walks each source so, to its share of both splits, its rows marked with their "source".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import statistics
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

from job import benchmark, formats, mixture, parallel
from job.clean import RULE_NAMES, clean_text
from job.config import Settings, with_overrides
from job.errors import ConfigError, classify
from job.files import LOCAL_SUFFIXES, atomic_write_text, is_local_path, write_jsonl
from job.paths import RunPaths
from job.provenance import pinned

log = logging.getLogger(__name__)

# A shorter last reply is a fragment like "Hi." left after boilerplate removal. The last one only: in a longer
# conversation a short question back ("Since when?") is a reply as good as any.
MIN_REPLY_CHARS = 20

EXAMPLES_PER_RULE = 3  # before/after rows kept per rule in data/cleaning_examples.jsonl, for a reader to audit


def dedup_key(text: str) -> str:
    """Near-exact duplicate key: lowercase letters and digits only (case, punctuation, spacing ignored)."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


# --- loading ------------------------------------------------------------------------------------
def check_local_file(path: Path) -> None:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"DATASET={str(path)!r}: no such file. Give a .jsonl/.json/.csv/.parquet path or a Hub id.")
    if suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"DATASET={str(path)!r}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}.")
    if path.stat().st_size == 0:
        raise ConfigError(f"DATASET={str(path)!r}: the file is empty.")
    if suffix != ".parquet":
        blank = True
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                _check_line(path, lineno, line, suffix == ".jsonl")
                blank = blank and not line.strip()
        if blank:
            raise ConfigError(f"DATASET={str(path)!r}: the file holds only blank lines, no rows.")
    if suffix == ".json":
        _check_json_file(path)


def _check_line(path: Path, lineno: int, line: bytes, jsonl: bool) -> None:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"DATASET={str(path)!r}: line {lineno} is not UTF-8 ({e.reason} at byte {e.start}). "
            "Re-save the file as UTF-8."
        ) from None
    if not (jsonl and line.strip()):
        return
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DATASET={str(path)!r}: line {lineno} is not valid JSON ({e.msg}, column {e.colno}). "
            "Fix or delete that line: each line must be one JSON object."
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(
            f"DATASET={str(path)!r}: line {lineno} is a JSON {_json_kind(obj)}, not an object. "
            'Each line must be one object such as {"Patient": "...", "Doctor": "..."}.'
        )


def _json_kind(obj: Any) -> str:
    return {list: "array", str: "string", dict: "object"}.get(type(obj), type(obj).__name__)


def _check_json_file(path: Path) -> None:
    """A .json file must hold a list of row objects or JSON lines; one object is one row, not a dataset."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return  # JSON lines in a .json file: the loader reads them line by line
    if isinstance(obj, dict) and not (obj and all(isinstance(v, list) for v in obj.values())):  # not columnar
        raise ConfigError(
            f"DATASET={str(path)!r}: the file holds one JSON object (keys {sorted(obj)[:5]}), not a list of rows. "
            'Write the rows as a JSON array [{"Patient": ..., "Doctor": ...}, ...] '
            "or one object per line in a .jsonl file."
        )
    if not isinstance(obj, (dict, list)):
        raise ConfigError(f"DATASET={str(path)!r}: the file holds a JSON {_json_kind(obj)}, not a list of rows.")
    for i, item in enumerate(obj if isinstance(obj, list) else ()):
        if not isinstance(item, dict):
            raise ConfigError(
                f"DATASET={str(path)!r}: item {i} of the array is a JSON {_json_kind(item)}, not an object. "
                'Each item must be one object such as {"Patient": "...", "Doctor": "..."}.'
            )


def load_rows(cfg: Settings, pin: str = "DATASET"):
    """Return the dataset as a memory-mapped `datasets.Dataset` (Hub id or local file); `pin` names the revision
    pinned for it (job/mixture.py's input_names)."""
    import datasets

    name = cfg.DATASET
    try:
        if is_local_path(name):
            path = Path(name).expanduser()
            check_local_file(path)
            builder = LOCAL_SUFFIXES[path.suffix.lower()]
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        # The commit this run pinned the Hub dataset to (job/provenance.py): a resumed run reads the same rows.
        revision = pinned(pin, name)
        extra = {"revision": revision} if revision else {}
        return datasets.load_dataset(name, split=cfg.DATASET_SPLIT, token=cfg.HF_TOKEN or None, **extra)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types: classify by type, else a bad input naming DATASET
        err = classify(e, f"DATASET={name!r}")
        if err is not None:
            raise err from None
        raise ConfigError(f"DATASET={name!r}: could not be loaded: {_root_cause(e)}") from None


def _root_cause(e: BaseException) -> str:
    """The error that started it: `datasets` wraps a parser's own (pandas' "EOF inside string starting at row 1",
    Arrow's "The surrogate pair in string is invalid") in a DatasetGenerationError that names neither."""
    while e.__cause__ is not None:  # `raise ... from`: the wrapped error (not one raised while handling it)
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


# --- the stage ----------------------------------------------------------------------------------
def load_sources(cfg: Settings) -> list[tuple[Settings, Any, float]]:
    """(the settings naming one source as DATASET, its rows, its share) per source of DATASET (job/mixture.py)."""
    found = mixture.named(cfg.DATASET)
    if [key for key, _ in found] == ["DATASET"]:  # one source, read as before mixtures
        return [(cfg, load_rows(cfg), 1.0)]
    loaded = []
    for key, source in found:
        sub = with_overrides(cfg, DATASET=source.name, **source.settings)  # a mixture file's source sets its own
        loaded.append((sub, load_rows(sub, key), source.share))
    return loaded


def sample(cfg: Settings, ds, examples: list[dict] | None = None, guard=None) -> tuple[list[dict], list[dict], dict]:
    """Walk `ds` in seeded random order; return (train, eval, stats). `ds` is a dataset, or load_sources' list.

    `examples`, when given, receives up to EXAMPLES_PER_RULE before/after rows per doctor-reply rule;
    `guard` (a job.benchmark.Decontaminator) drops training rows that share 13 words with a benchmark
    question or a held-out row. A mixture's sources are each walked in their own seeded order: first each
    source's share of EVAL_SAMPLES, then its share of NUM_SAMPLES, so every held-out row of every source is
    known before a training row is checked against them; duplicates are found across sources."""
    sources = ds if isinstance(ds, list) else [(cfg, ds, 1.0)]
    shares = [share for _, _, share in sources]
    held, trained = mixture.quotas(cfg.EVAL_SAMPLES, shares), mixture.quotas(cfg.NUM_SAMPLES, shares)
    mixed = len(sources) > 1
    walks = [_Walk(sub, rows, h + t, mixed, examples, guard) for (sub, rows, _), h, t in zip(sources, held, trained)]
    seen: tuple[set, set] = (set(), set())  # the turns and dedup keys of the rows kept so far, across sources
    try:
        for held_out, counts in ((True, held), (False, trained)):
            for walk, count in zip(walks, counts):
                walk.take(count, held_out, seen)
    finally:
        for walk in walks:
            walk.rows.close()  # stops its worker processes
    return _mix(cfg, walks, shares) if mixed else _split(cfg, walks[0])


class _Walk:
    """One source's rows in its seeded order, cleaned ahead on WORKERS processes (job/parallel.py); `take` keeps
    them one at a time, in that order, exactly as one process would."""

    def __init__(self, cfg: Settings, ds, wanted: int, mixed: bool, examples: list[dict] | None, guard):
        import numpy as np

        self.cfg, self.ds, self.wanted, self.mixed, self.examples, self.guard = cfg, ds, wanted, mixed, examples, guard
        self.fmt, why = formats.detect(cfg, ds)
        log.info("DATA_FORMAT: %s (%s)%s", self.fmt, why, f" for DATASET source {cfg.DATASET!r}" if mixed else "")
        formats.check_fields(cfg, self.fmt, ds)
        self.kept: tuple[list[dict], list[dict]] = ([], [])  # (held out, train)
        self.read = 0
        self.dropped: Counter = Counter()
        self.changed: Counter = Counter()
        self.held = Counter(e["rule"] for e in examples or ())
        order = np.random.default_rng(cfg.SEED).permutation(len(ds))
        self.rows = self._rows(order)

    def _rows(self, order):
        workers = parallel.resolve_workers(self.cfg.WORKERS, len(self.ds))
        clean = functools.partial(_clean_chunk, self.guard is not None)
        reader = functools.partial(formats.read, self.cfg, self.fmt)
        source = _raw_chunks(self.ds.select_columns(formats.fields(self.cfg, self.ds)), order, reader)
        progress = parallel.Progress("sample", workers)

        def needed() -> int:  # chunks still needed if every row were kept, plus one: few are cleaned for nothing
            return -(-(self.wanted - sum(map(len, self.kept))) // parallel.CHUNK_ROWS) + 1

        with contextlib.closing(parallel.ordered_map(clean, source, workers, "sample", wanted=needed)) as chunks:
            for (idx, raws, error), cleaned in chunks:
                yield from zip(idx, raws, cleaned)
                if error is not None:  # the row after this chunk's last is not text: raised when the walk reaches it
                    raise error
                progress.update(self.read, f", {sum(map(len, self.kept)):,} of {self.wanted:,} kept")

    def take(self, count: int, held_out: bool, seen: tuple[set, set]) -> None:
        """Keep the next `count` usable rows (held out or train)."""
        from tqdm.auto import tqdm

        if not count:
            return
        kept = self.kept[0 if held_out else 1]
        goal = len(kept) + count
        with tqdm(total=count, desc="sample", unit="row", disable=None) as bar:
            for i, raw, (row, fired, key, grams) in self.rows:
                self.read += 1
                self.changed.update(fired)
                if self.examples is not None:
                    _keep_examples(self.examples, self.held, i, raw, row, fired)
                if reason := _drop_reason(row, key, grams, seen, self.guard, held_out):
                    self.dropped[reason] += 1
                    continue
                row["source_index"] = int(i)
                kept.append(row)
                bar.update(1)
                if len(kept) == goal:
                    return
            raise self._too_few()

    def _too_few(self) -> ConfigError:
        cfg, kept = self.cfg, sum(map(len, self.kept))
        counts = f"only {kept} after cleaning ({self.read} read; dropped: {dict(self.dropped) or 'none'})"
        if not self.mixed:
            return ConfigError(
                f"NUM_SAMPLES={cfg.NUM_SAMPLES} + EVAL_SAMPLES={cfg.EVAL_SAMPLES} need {self.wanted} usable rows, but "
                f"DATASET={cfg.DATASET!r} has {counts}. Lower NUM_SAMPLES or EVAL_SAMPLES."
            )
        return ConfigError(
            f"DATASET={cfg.DATASET!r}: its share of NUM_SAMPLES + EVAL_SAMPLES needs {self.wanted} usable rows, "
            f"but it has {counts}. Lower its weight or NUM_SAMPLES, or add rows to it: a mixture never fills one "
            "source's share from another."
        )


def _drop_reason(row: dict, key: str, grams, seen: tuple[set, set], guard, held_out: bool) -> str | None:
    """Why the walk drops a cleaned row (its counter's name), or None; `seen` remembers the rows it passed.

    Decontamination (job/benchmark.py): the first EVAL_SAMPLES kept rows are the held-out split; a later row
    sharing 13 words in a row with one of them or with a benchmark question is dropped as overlap_<source>.
    Duplicates: the same turns (exact), or the same user turns up to case, punctuation and spacing (near: a
    question answered twice counts once)."""
    if reason := _unusable(row):
        return reason
    exact, keys = seen
    turns = tuple(formats.turns(row))
    if turns in exact:
        return "exact_duplicate"
    exact.add(turns)
    if key in keys:
        return "near_duplicate"
    keys.add(key)
    if guard is not None and held_out:
        guard.hold_out(row, grams)
    elif guard is not None and (source := guard.overlap(row, grams)):
        return f"overlap_{source}"
    return None


def _unusable(row: dict) -> str | None:
    """Why a cleaned conversation cannot be trained on: a user or assistant turn that cleaning emptied, or a last
    reply too short to be one."""
    if not all(m["content"] for m in row["messages"] if m["role"] == "user"):
        return "empty_patient"
    replies = formats.replies(row)
    if not all(replies):
        return "empty_doctor"
    if not any(map(formats.trained, row["messages"])):
        return "no_trained_reply"  # every assistant turn has weight 0 (OpenAI's format): nothing to learn from
    return "reply_too_short" if len(replies[-1]) < MIN_REPLY_CHARS else None


def _split(cfg: Settings, walk: _Walk) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, stats) of one source's kept rows."""
    eval_rows, train_rows = walk.kept
    lengths = [sum(map(len, formats.turns(r))) for r in eval_rows + train_rows]
    chars = {"mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths), "max": max(lengths)}
    stats = {
        "dataset": cfg.DATASET,
        "data_format": walk.fmt,
        "rows_in_dataset": len(walk.ds),
        "rows_read": walk.read,
        "rows_kept": len(lengths),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "dropped": dict(sorted(walk.dropped.items())),
        "changed": dict(sorted(walk.changed.items())),
        "chars_per_conversation": chars,
        "assistant_turns": sum(len(formats.replies(r)) for r in eval_rows + train_rows),
    }
    return train_rows, eval_rows, stats


def _mix(cfg: Settings, walks: list[_Walk], shares: list[float]) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, stats) of a mixture: each split's rows interleaved to the sources' shares, so that any first
    rows of it (EVAL_PROMPTS of the held-out ones, say) hold the mixture too; stats per source under "sources"."""
    parts = [_split(walk.cfg, walk) for walk in walks]
    for walk, (train_rows, eval_rows, _) in zip(walks, parts):
        for row in eval_rows + train_rows:
            row["source"] = walk.cfg.DATASET
    train_rows, eval_rows = (_interleave([p[k] for p in parts]) for k in (0, 1))
    _, _, stats = _split(cfg, _Merged(walks, eval_rows, train_rows))
    stats["data_format"] = ",".join(dict.fromkeys(walk.fmt for walk in walks))
    stats["sources"] = [
        {"dataset": walk.cfg.DATASET, "weight": round(share, 6), **{k: v for k, v in st.items() if k != "dataset"}}
        for walk, share, (_, _, st) in zip(walks, shares, parts)
    ]
    return train_rows, eval_rows, stats


def _interleave(lists: list[list[dict]]) -> list[dict]:
    """The lists' rows merged evenly: the k-th of n rows of a list goes at (k + 0.5) / n (ties: the first list)."""
    placed = [((k + 0.5) / len(rows), s, k) for s, rows in enumerate(lists) for k in range(len(rows))]
    return [lists[s][k] for _, s, k in sorted(placed)]


class _Merged:
    """The walks of a mixture's sources, summed as _split reads one walk."""

    def __init__(self, walks: list[_Walk], eval_rows: list[dict], train_rows: list[dict]):
        self.kept, self.fmt = (eval_rows, train_rows), walks[0].fmt
        self.ds = range(sum(len(w.ds) for w in walks))
        self.read = sum(w.read for w in walks)
        self.dropped = sum((w.dropped for w in walks), Counter())
        self.changed = sum((w.changed for w in walks), Counter())


# --- the per-row work, done ahead on the worker processes -----------------------------------------------------------
ARROW_ROWS = 1024  # rows fetched from Arrow per call: one call per row pays Arrow's per-call overhead each time


def _raw_chunks(ds, order, read):
    """(dataset indices, their rows as conversations, error) per chunk of parallel.CHUNK_ROWS rows, in the seeded
    order; `read(record, index)` makes a row's conversation (job/formats.py).

    A row that cannot be read ends its chunk there and travels as `error`, raised only if the walk gets that far
    (a bad row past the last one needed stops nothing, as when rows were read one at a time)."""
    for start in range(0, len(order), ARROW_ROWS):
        idx = order[start : start + ARROW_ROWS].tolist()
        batch = ds[idx]
        for first in range(0, len(idx), parallel.CHUNK_ROWS):
            part, raws = idx[first : first + parallel.CHUNK_ROWS], []
            for j, i in enumerate(part, first):
                try:
                    raws.append(read({c: values[j] for c, values in batch.items()}, i))
                except ConfigError as e:
                    yield part[: len(raws)], raws, e
                    return
            yield part, raws, None


def clean_row(raw: dict, decontaminate: bool) -> tuple[dict, tuple[str, ...], str, array | None]:
    """A row's pure work: its cleaned conversation, the rules that fired ("field.rule", each once), its duplicate
    key and, when decontaminating and the row could be kept, its n-gram hashes (job/benchmark.py). The hashes travel
    as an array of 64-bit integers: a set of them took more time to pickle and unpickle than the row's checks.

    Each user turn gets the patient's rules, each assistant turn the doctor's (job/clean.py), the description its
    own; a system message is kept as the data wrote it."""
    fired: Counter = Counter()
    row = {"description": clean_text(raw["description"], "description", fired)} if "description" in raw else {}
    row["messages"] = [_clean_turn(m, fired) for m in raw["messages"]]
    usable = _unusable(row) is None
    key = dedup_key("".join(m["content"] for m in row["messages"] if m["role"] == "user")) if usable else ""
    grams = array("q", benchmark.row_ngrams(row)) if decontaminate and usable else None
    return row, tuple(fired), key, grams


def _clean_turn(message: dict, fired: Counter) -> dict:
    field = formats.CLEANED_AS.get(message["role"])
    return {**message, "content": clean_text(message["content"], field, fired)} if field else message


def _clean_chunk(decontaminate: bool, chunk: tuple[list[int], list[dict], ConfigError | None]) -> list[tuple]:
    return [clean_row(raw, decontaminate) for raw in chunk[1]]


def _keep_examples(examples: list[dict], held: Counter, index: int, raw: dict, row: dict, fired: tuple) -> None:
    """Keep the first few rows each doctor-reply rule changed, so a reader can audit the rule in a minute: the
    assistant turns before and after, a blank line between two. `held` counts the examples per rule (counting the
    list on every row cost more than the row's other checks)."""
    before, after = ("\n\n".join(formats.replies(r)) for r in (raw, row))
    for key in fired:
        field, rule = key.split(".", 1)
        if field != "doctor" or rule == "whitespace":
            continue
        if held[rule] < EXAMPLES_PER_RULE:
            held[rule] += 1
            examples.append({"rule": rule, "source_index": int(index), "before": before, "after": after})


def run(cfg: Settings, paths: RunPaths) -> list[Path]:
    ds = load_sources(cfg)
    examples: list[dict] = []
    # The benchmark's questions (BENCHMARK_TASKS), fetched here for the benchmark stage and decontamination.
    guard = benchmark.fetch(cfg, paths.benchmark_data)
    train_rows, eval_rows, stats = sample(cfg, ds, examples, guard)
    stats["decontamination"] = guard.summary()
    paths.data.mkdir(parents=True, exist_ok=True)
    write_jsonl(paths.train_rows, train_rows)
    write_jsonl(paths.eval_rows, eval_rows)
    order = {name: k for k, name in enumerate(RULE_NAMES)}
    write_jsonl(paths.cleaning_examples, sorted(examples, key=lambda e: order.get(e["rule"], len(order))))
    atomic_write_text(paths.sample_stats, json.dumps(stats, indent=2))
    counts = len(train_rows), len(eval_rows), stats["rows_read"], stats["dropped"] or "none"
    log.info("sampled %d train + %d eval rows from %d read (dropped %s)", *counts)
    fetched = [paths.benchmark_data] if cfg.benchmark_tasks else []
    return [paths.train_rows, paths.eval_rows, paths.cleaning_examples, paths.sample_stats, *fetched]
