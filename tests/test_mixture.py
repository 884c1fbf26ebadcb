"""DATASET as a mixture (job/mixture.py): sources with weights through the sample stage, provenance and the card.

The sources are small files written here: conversations in OpenAI messages (.jsonl) and in Alpaca (.csv). Bad
mixture settings are in tests/test_bad_inputs.py's catalog.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from job import mixture, provenance, report
from job.config import load_settings
from job.errors import ConfigError
from job.files import atomic_write_text
from job.paths import RunPaths
from job.sample import load_sources, sample

SMALL = {"NUM_SAMPLES": "10", "EVAL_SAMPLES": "5", "EVAL_PROMPTS": "2", "WORKERS": "1", "BENCHMARK_TASKS": ""}
SHARED = ("Is it safe to take ibuprofen with paracetamol?", "Yes, the two can be taken together at normal doses.")


def _messages(path: Path, n: int) -> Path:
    rows = [
        (f"My knee {i} hurts after running {i} km.", f"Rest the knee {i} days, then run {i} km slowly.")
        for i in range(n)
    ]
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in [*rows, SHARED]
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _alpaca(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerows(
            [f"Name the capital of country number {i}.", "", f"The capital of country {i} is city {i}."]
            for i in range(n)
        )
        w.writerow([SHARED[0], "", SHARED[1]])
    return path


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    return _messages(tmp_path / "medical.jsonl", 30), _alpaca(tmp_path / "general.csv", 30)


def settings(dataset: str, **env) -> object:
    return load_settings(environ={**SMALL, "DATASET": dataset, **env}, env_file=None)


def _pairs(value: str) -> list[tuple[str, float]]:
    return [(s.name, s.share) for s in mixture.entries(value)]


def test_the_syntax_weights_are_shares_and_a_single_dataset_is_itself():
    assert _pairs("a/b:0.8,c:d.jsonl:0.2") == [("a/b", 0.8), ("c:d.jsonl", pytest.approx(0.2))]
    assert _pairs("x.jsonl:4, y.jsonl") == [("x.jsonl", 0.8), ("y.jsonl", 0.2)]  # no weight weighs 1
    assert _pairs("ruslanmv/ai-medical-chatbot") == [("ruslanmv/ai-medical-chatbot", 1.0)]
    assert _pairs("c:d.jsonl") == [("c:d.jsonl", 1.0)]  # a ":" not followed by a number is the path's
    assert mixture.input_names("a/b") == [("DATASET", "a/b")]
    assert mixture.input_names("a/b:1,c.csv:1") == [("DATASET[a/b]", "a/b"), ("DATASET[c.csv]", "c.csv")]
    assert mixture.quotas(5, [0.8, 0.2]) == [4, 1]
    assert mixture.quotas(4, [0.8, 0.2]) == [3, 1]  # 3.2 and 0.8: the larger remainder gets the row left over
    assert sum(mixture.quotas(7, [1 / 3] * 3)) == 7


@pytest.mark.parametrize(
    "value, expect",
    [
        ("a.jsonl:0,b.jsonl", "above 0"),
        ("a.jsonl:nan,b.jsonl", "above 0"),
        ("a.jsonl,,b.jsonl", "empty source"),
        ("a.jsonl:1,a.jsonl:2", "listed twice"),
        ("a.jsonl:3", "one source"),
    ],
)
def test_a_bad_mixture_is_refused_naming_dataset(value, expect):
    with pytest.raises(ConfigError, match=f"DATASET={value!r}: .*{expect}"):
        settings(value)


def test_two_sources_are_drawn_to_their_weights_each_in_its_own_format(sources):
    medical, general = sources
    cfg = settings(f"{medical}:0.8,{general}:0.2")
    train, held_out, stats = sample(cfg, load_sources(cfg))
    by_source = lambda rows, s: sum(r["source"] == str(s) for r in rows)  # noqa: E731
    assert [by_source(train, medical), by_source(train, general)] == [8, 2]
    assert [by_source(held_out, medical), by_source(held_out, general)] == [4, 1]
    assert held_out[0]["source"] == str(medical) and [r["source"] for r in train[:5]].count(str(general)) == 1  # mixed
    assert [s["data_format"] for s in stats["sources"]] == ["messages", "alpaca"]
    assert [s["weight"] for s in stats["sources"]] == [0.8, 0.2]
    assert stats["data_format"] == "messages,alpaca" and stats["rows_kept"] == 15
    assert stats["rows_in_dataset"] == 62 and stats["sources"][0]["rows_in_dataset"] == 31
    alpaca_user = next(r for r in train if r["source"] == str(general))["messages"][0]
    assert alpaca_user["role"] == "user" and alpaca_user["content"].startswith("Name the capital")


def test_the_draw_is_seeded_and_duplicates_are_found_across_sources(sources):
    medical, general = sources
    cfg = settings(f"{medical}:0.5,{general}:0.5", NUM_SAMPLES="50", EVAL_SAMPLES="10")
    first = sample(cfg, load_sources(cfg))
    assert first == sample(cfg, load_sources(cfg))  # the same rows, in the same order
    other = settings(cfg.DATASET, NUM_SAMPLES="50", EVAL_SAMPLES="10", SEED="7")
    assert first[:2] != sample(other, load_sources(other))[:2]
    train, held_out, stats = first
    # Both files end with the same question: all 60 others are kept, that one once, the other copy dropped.
    assert sum(r["messages"][0]["content"] == SHARED[0] for r in train + held_out) == 1
    assert stats["dropped"] == {"near_duplicate": 1} or stats["dropped"] == {"exact_duplicate": 1}


def test_a_source_with_too_few_rows_for_its_share_is_named(sources):
    medical, general = sources
    cfg = settings(f"{medical}:0.1,{general}:0.9", NUM_SAMPLES="40", EVAL_SAMPLES="5")
    with pytest.raises(
        ConfigError, match=f"DATASET='{general}': its share .* needs 40 usable rows, but it has only 30 "
    ):
        sample(cfg, load_sources(cfg))


def test_provenance_hashes_each_source_and_sees_an_edited_one(sources, tmp_path):
    medical, general = sources
    cfg = settings(f"{medical}:0.8,{general}:0.2")
    paths = RunPaths(tmp_path / "run")

    def inputs() -> dict:
        return provenance.stage_inputs(cfg, paths, "sample", provenance.Hashes(None))

    before = inputs()
    assert set(before) == {f"DATASET[{medical}]", f"DATASET[{general}]"}
    assert all(len(v["sha256"]) == 64 for v in before.values())
    with general.open("a") as f:
        f.write("Give one more answer.,,Here is one more answer for the file.\n")
    changed, gone = provenance.changed_inputs(before, inputs())
    assert gone == [] and len(changed) == 1 and changed[0].startswith(f"input DATASET[{general}] {general} changed")


def test_hub_sources_are_pinned_each_and_loaded_at_their_pin(sources, monkeypatch):
    medical, _ = sources
    monkeypatch.setattr(provenance, "hub_revision", lambda name, repo, kind, token: f"sha-of-{repo}")
    cfg = settings(f"org/general-chat:0.3,{medical}:0.7")
    pins = provenance.resolve_pins(cfg, None)
    assert {k for k in pins if k.startswith("DATASET")} == {"DATASET[org/general-chat]"}
    assert pins["DATASET[org/general-chat]"]["revision"] == "sha-of-org/general-chat"
    loaded = {}

    def load_dataset(name, *args, revision=None, **kwargs):
        loaded[name] = revision
        return Dataset.from_list([{"instruction": "Say hello to the patient.", "output": "Hello, how can I help?"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    provenance.use_pins(pins)
    try:
        assert [share for _, _, share in load_sources(cfg)] == [pytest.approx(0.3), pytest.approx(0.7)]
        assert loaded["org/general-chat"] == "sha-of-org/general-chat"  # the pinned revision, not main
        assert report.card_data(cfg).datasets == ["org/general-chat"]  # the Hub takes Hub ids only
    finally:
        provenance.use_pins(None)


def _card(run, dataset: str) -> tuple[str, dict]:
    """The card of `run` (a demo_run_copy) with a small sample of `dataset` as its data; and the sample's inputs."""
    cfg = load_settings({**run.env, "DATASET": dataset}, env_file=None)
    small = settings(cfg.DATASET)
    _, _, stats = sample(small, load_sources(small))
    atomic_write_text(run.paths.sample_stats, json.dumps(stats))
    inputs = provenance.stage_inputs(cfg, run.paths, "sample", provenance.Hashes(None))
    return report.model_card(cfg, run.paths, {"stages": {"sample": {"inputs": inputs}}}), inputs


def test_the_card_lists_each_source_with_its_rows_and_hash(demo_run_copy, sources):
    medical, general = sources
    card, inputs = _card(demo_run_copy, f"{medical}:0.8,{general}:0.2")
    for source in (medical, general):
        digest = inputs[f"DATASET[{source}]"]["sha256"]
        assert f"| training data | `{source.name}`, sha256 `{digest}` |" in card
    assert f"| `{medical}` | 0.8 | messages | 31 | " in card and f"| `{general}` | 0.2 | alpaca | 31 | " in card


def _faq(path: Path, n: int) -> Path:
    """A clinic's export with its own column names: topic, question, answer."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["topic", "question", "answer"])
        w.writerows(
            [f"Topic {i}", f"How long does bruise {i} last?", f"Bruise {i} fades in about {i} days."] for i in range(n)
        )
    return path


def _mixture_file(folder: Path, text: str) -> Path:
    path = folder / "mix.yaml"
    path.write_text(text)
    return path


MIX = """\
sources:
  - dataset: medical.jsonl
    weight: 0.6
  - dataset: faq.csv
    weight: 0.4
    format: columns
    description_column: topic
    patient_column: question
    doctor_column: answer
"""


def test_a_mixture_file_gives_each_source_its_own_format_and_columns(sources, tmp_path, monkeypatch):
    """Relative paths are read from the file's folder, whatever the working directory; the columns source reads
    its own column names while the run's (Patient, Doctor) stay for any other."""
    medical, _ = sources
    faq = _faq(tmp_path / "faq.csv", 30)
    path = _mixture_file(tmp_path, MIX)
    monkeypatch.chdir(tmp_path.parent)
    cfg = settings(str(path))
    assert mixture.entries(cfg.DATASET) == [
        mixture.Source(str(medical), pytest.approx(0.6)),
        mixture.Source(
            str(faq),
            pytest.approx(0.4),
            {
                "DATA_FORMAT": "columns",
                "DESCRIPTION_COLUMN": "topic",
                "PATIENT_COLUMN": "question",
                "DOCTOR_COLUMN": "answer",
            },
        ),
    ]
    train, held_out, stats = sample(cfg, load_sources(cfg))
    assert [sum(r["source"] == str(faq) for r in rows) for rows in (train, held_out)] == [4, 2]
    faq_row = next(r for r in train if r["source"] == str(faq))["messages"]
    assert faq_row[0]["content"].startswith("How long does bruise") and faq_row[1]["content"].startswith("Bruise")
    assert [s["data_format"] for s in stats["sources"]] == ["messages", "columns"]
    assert mixture.input_names(cfg.DATASET) == [(f"DATASET[{medical}]", str(medical)), (f"DATASET[{faq}]", str(faq))]


def test_an_edited_mixture_file_is_a_new_sample(sources, tmp_path):
    """The file decides which columns are read: an edit to it changes the sample stage's inputs, as an edit to a
    source does."""
    _faq(tmp_path / "faq.csv", 30)
    path = _mixture_file(tmp_path, MIX)
    cfg = settings(str(path))
    paths = RunPaths(tmp_path / "run")

    def inputs() -> dict:
        return provenance.stage_inputs(cfg, paths, "sample", provenance.Hashes(None))

    before = inputs()
    assert set(before) == {"DATASET", f"DATASET[{tmp_path / 'medical.jsonl'}]", f"DATASET[{tmp_path / 'faq.csv'}]"}
    path.write_text(MIX.replace("    description_column: topic\n", ""))
    changed, gone = provenance.changed_inputs(before, inputs())
    assert gone == [] and len(changed) == 1 and changed[0].startswith(f"input DATASET {path} changed")


@pytest.mark.parametrize(
    "text, expect",
    [
        ("sources: []\n", "one key, sources: a list of sources"),
        ("source:\n  - dataset: a.jsonl\n", "one key, sources"),
        ("sources:\n  - weight: 1\n", "source 1: give each source its dataset"),
        ("sources:\n  - dataset: a.jsonl\n  - dataset: b.jsonl\n    colums: x\n", "source 2: unknown key 'colums'"),
        ("sources:\n  - dataset: a.jsonl\n    weight: 0\n", "source 1: weight 0; a weight must be a number above 0"),
        ("sources:\n  - dataset: a.jsonl\n    weight: '1'\n", "weight '1'; a weight must be a number"),
        ("sources:\n  - dataset: a.jsonl\n    format: csv\n", "format 'csv'; use one of auto, columns"),
        ("sources:\n  - dataset: a.jsonl\n    patient_column: 3\n", "patient_column must be a non-empty text"),
        ("sources:\n  - dataset: a.jsonl\n  - dataset: ./a.jsonl\n", "is listed twice"),
        ("sources: [\n", "not a YAML file"),
    ],
)
def test_a_bad_mixture_file_is_refused_naming_the_file_the_source_and_the_key(tmp_path, text, expect):
    path = _mixture_file(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"DATASET={str(path)!r}") + ".*" + re.escape(expect)):
        mixture.entries(str(path))


def test_a_mixture_file_is_the_whole_dataset_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="'mix.yaml' is a mixture file: give it alone as DATASET"):
        settings("mix.yaml:0.5,a.jsonl:0.5")
    with pytest.raises(ConfigError, match="the mixture file cannot be read"):
        mixture.entries(str(tmp_path / "absent.yaml"))


def test_the_card_names_the_mixture_file_and_each_source(demo_run_copy, sources, tmp_path):
    faq = _faq(tmp_path / "faq.csv", 30)
    card, inputs = _card(demo_run_copy, str(_mixture_file(tmp_path, MIX)))
    assert f"| mixture file | `mix.yaml`, sha256 `{inputs['DATASET']['sha256']}` |" in card
    assert f"| training data | `faq.csv`, sha256 `{inputs[f'DATASET[{faq}]']['sha256']}` |" in card
    assert f"| `{faq}` | 0.4 | columns | 30 | " in card
