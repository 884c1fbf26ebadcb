"""WORKERS (job/parallel.py): the sample and format stages write the same bytes on one process and on several.

Each stage runs twice on the same input, WORKERS=1 (the rows worked in the job's own process) and WORKERS=2
(forked workers, chunks of parallel.CHUNK_ROWS rows), and every file it writes is compared byte for byte. The
inputs make every sequential decision happen: duplicates, fragments, held-out and benchmark overlap, the walk
stopping before the end of the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from job import benchmark, formatting, parallel, sample
from job.__main__ import FIXTURE
from job.config import load_settings
from job.errors import ConfigError, LocalFailure
from job.files import read_jsonl
from job.formats import single_turn
from job.paths import RunPaths

# real rows, in the shared folder beside a checkout (skipped where there is none)
REAL_ROWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_dialogues_sample.jsonl"
QUESTION = (
    "A 45-year-old man presents with crushing chest pain radiating to his left arm for the past two hours "
    "while shovelling snow"
)


def settings(tmp_path: Path, workers: int, **env) -> object:
    base = {"NUM_SAMPLES": "40", "EVAL_SAMPLES": "16", "EVAL_PROMPTS": "8", "OUTPUT_DIR": str(tmp_path)}
    env = {**base, "RUN_NAME": f"w{workers}", "WORKERS": str(workers), **{k: str(v) for k, v in env.items()}}
    return load_settings(environ=env, env_file=None)


def files(paths: RunPaths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(paths.data.iterdir())}


def with_repeats(rows: list[dict], repeats: int) -> list[dict]:
    """`rows`, then the first `repeats` again, changed in turn three ways: a word added to the patient text (a new
    duplicate key, but 13 words in a row shared with the original: held-out overlap when that is in the eval
    split), upper-cased (a near duplicate), unchanged (an exact one); rows quoting a benchmark question, and two
    that cleaning leaves unusable."""
    changes = [lambda p: f"{p} (asked again)", str.upper, str]
    again = [{**r, "Patient": changes[i % 3](r.get("Patient") or "")} for i, r in enumerate(rows[:repeats])]
    quoting = [
        {"Patient": f"My exam, part {i}, asks: {QUESTION}. What is it?", "Doctor": "It sounds like a heart attack."}
        for i in range(6)
    ]
    fragments = [
        {"Patient": "Is a cough for two days normal?", "Doctor": "Hi. Yes."},
        {"Patient": " ", "Doctor": "Rest."},
    ]
    return rows + again + quoting + fragments


@pytest.fixture
def guard(monkeypatch):
    """The benchmark's questions without lm-eval: one question, which a row of with_repeats quotes."""
    monkeypatch.setattr(benchmark, "fetch", lambda cfg, out: benchmark.Decontaminator([QUESTION], ["fake"]))


def run_sample(tmp_path: Path, workers: int, **env) -> tuple[RunPaths, dict[str, bytes]]:
    cfg = settings(tmp_path, workers, **env)
    paths = RunPaths(cfg.run_dir)
    sample.run(cfg, paths)
    return paths, files(paths)


def dataset(tmp_path: Path, source: Path, rows: int, repeats: int) -> str:
    path = tmp_path / "rows.jsonl"
    data = with_repeats(read_jsonl(source)[:rows], repeats)
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return str(path)


CASES = {
    # the bundled fixture as it is: 140 rows, 3 chunks; 40 + 16 of its 127 usable rows
    "fixture": lambda tmp: {"DATASET": str(FIXTURE)},
    # 200 real rows plus 60 repeats (4 chunks and a part); the walk stops before the end
    "real": lambda tmp: {"DATASET": dataset(tmp, REAL_ROWS, 200, 60), "NUM_SAMPLES": 150, "EVAL_SAMPLES": 30},
}


@pytest.mark.parametrize("case", CASES)
def test_sample_and_format_write_the_same_bytes_on_one_and_two_workers(case, tmp_path, guard, tiny_model_dir):
    if case == "real" and not REAL_ROWS.is_file():
        pytest.skip(f"{REAL_ROWS} is not on this machine")
    env = CASES[case](tmp_path)
    env["BASE_MODEL"] = str(tiny_model_dir)
    one, one_files = run_sample(tmp_path, 1, **env)
    two, two_files = run_sample(tmp_path, 2, **env)
    assert one_files == two_files
    stats = json.loads(one_files["stats.json"])
    assert stats["rows_read"] < stats["rows_in_dataset"] or case == "fixture"
    if case == "real":  # every decision of the walk was taken
        decisions = {"overlap_held_out", "overlap_benchmark", "near_duplicate", "exact_duplicate", "reply_too_short"}
        decisions |= {"empty_patient"}
        assert decisions <= set(stats["dropped"]), stats
    assert parallel.resolve_workers("2", stats["rows_in_dataset"]) == 2

    for workers, paths in ((1, one), (2, two)):
        formatting.run(settings(tmp_path, workers, **env), paths)
    assert files(one) == files(two)
    assert {"train_tokens.jsonl", "eval_tokens.jsonl", "format_stats.json"} <= set(files(two))


def test_too_few_rows_is_the_same_error_on_two_workers(tmp_path, guard):
    messages = []
    for workers in (1, 2):
        with pytest.raises(ConfigError) as err:
            run_sample(tmp_path, workers, DATASET=str(FIXTURE), NUM_SAMPLES=200)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "NUM_SAMPLES=200" in messages[0] and "140 read" in messages[0]


def test_a_workers_error_is_raised_at_its_row(tmp_path, tiny_model_dir, monkeypatch):
    """A row the tokenizer refuses stops the format stage with the same message; the workers, forked after the
    patch, raise it, and the rows before it have all been counted."""
    real = formatting.tokenize_row

    def refuse_row_100(cfg, tok, row):
        if row["messages"][0]["content"].endswith("#100"):
            raise ConfigError("row 100 refused")
        return real(cfg, tok, row)

    monkeypatch.setattr(formatting, "tokenize_row", refuse_row_100)
    rows = [single_turn(f"My knee hurts after running #{i}", "Rest it and use ice for two days.") for i in range(300)]
    for workers in (1, 2):
        cfg = settings(tmp_path, workers, BASE_MODEL=str(tiny_model_dir))
        with pytest.raises(ConfigError, match="row 100 refused"):
            formatting.format_rows(cfg, formatting.load_tokenizer(cfg), rows, "train")


def _exit_in_worker(item: int) -> int:
    if item == 3:
        os._exit(9)
    return item


def test_a_worker_that_dies_is_a_local_failure_naming_workers():
    with pytest.raises(LocalFailure, match=r"worker process of the sample stage died.*WORKERS \(now 2\)"):
        list(parallel.ordered_map(_exit_in_worker, range(10), 2, "sample"))


def test_a_reader_that_stops_early_leaves_the_rest_unread():
    """The sample stage stops at NUM_SAMPLES + EVAL_SAMPLES: the chunks past the ahead window are never read."""
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    results = parallel.ordered_map(abs, items(), 2, "sample")
    assert next(results) == (0, 0)
    results.close()
    assert len(pulled) <= 2 * parallel.AHEAD_PER_WORKER + 1


def test_a_short_walk_cleans_little_more_than_it_keeps(tmp_path, monkeypatch):
    """60 rows wanted from 3,000 on 4 workers: about the two chunks needed go out, not the 8 of a full window."""
    from datasets import Dataset

    rows = [
        {"Description": "", "Patient": f"Question {i}: my knee hurts.", "Doctor": f"Rest it for {i} days."}
        for i in range(3000)
    ]
    handed_out = []

    def counted(*args):
        for chunk in sample_raw_chunks(*args):
            handed_out.append(len(chunk[1]))
            yield chunk

    sample_raw_chunks = sample._raw_chunks
    monkeypatch.setattr(sample, "_raw_chunks", counted)
    train, held_out, stats = sample.sample(
        settings(tmp_path, 4, NUM_SAMPLES=50, EVAL_SAMPLES=10), Dataset.from_list(rows)
    )
    assert len(train) + len(held_out) == stats["rows_read"] == 60
    assert sum(handed_out) <= 3 * parallel.CHUNK_ROWS < 4 * parallel.AHEAD_PER_WORKER * parallel.CHUNK_ROWS


def test_results_come_back_in_order():
    assert [r for _, r in parallel.ordered_map(str, range(200), 3, "format")] == [str(i) for i in range(200)]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "99999"])
def test_a_bad_workers_value_names_the_setting(value):
    with pytest.raises(ConfigError, match=rf"WORKERS='{value}': use auto or a whole number of processes from 1 to"):
        load_settings(environ={"WORKERS": value}, env_file=None)


def test_auto_takes_the_cpus_this_process_may_use_and_no_more_workers_than_chunks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert parallel.resolve_workers("auto", 100_000) == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)), raising=False)
    assert parallel.resolve_workers("auto", 100_000) == parallel.MAX_AUTO_WORKERS
    assert parallel.resolve_workers("auto", parallel.CHUNK_ROWS) == 1  # one chunk: no pool
    assert parallel.resolve_workers("4", 3 * parallel.CHUNK_ROWS) == 3
