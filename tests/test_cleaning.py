"""Cleaning (job/clean.py) against a gold set of real replies, tricky cases, and the bad rows an outside tester found.

The gold set, tests/data/cleaning_gold.jsonl, holds 352 Doctor replies from the shared sample of
ruslanmv/ai-medical-chatbot (`line` is the line number in medical_dialogues_sample.jsonl), chosen to
cover every rule (sign-offs with and without spaces, platform greetings, run-on sentences, links,
e-mail addresses, phone numbers, iCliniq's link arrows) plus rows with nothing to remove. `expected`
is the cleaned reply, read and checked row by row; rows marked `corrected_by_hand` hold boilerplate
the rules still miss, so the figures below are not 100% by construction. Rows with a `case` (and no
`line`) are written for this project: sentences an outside tester found cut or kept wrongly (advice
that opens like a sign-off, readings that look like phone numbers, a link holding the platform's
name), each a must-keep or must-cut example that has to come out exactly as `expected`.

Words are compared in order (difflib on lowercase word lists), so a kept word must sit where it was.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from difflib import SequenceMatcher
from pathlib import Path

import pytest
from cleaning_audit import ENDS_IN_SIGNATURE

from job.__main__ import FIXTURE
from job.clean import RULES, clean_text
from job.config import load_settings
from job.errors import ConfigError
from job.files import read_jsonl
from job.formats import as_text
from job.paths import RunPaths
from job.sample import MIN_REPLY_CHARS, load_rows, run, sample

GOLD = Path(__file__).parent / "data" / "cleaning_gold.jsonl"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def deleted(a: list[str], b: list[str]) -> set[int]:
    """Indices of `a` that are not in `b` (in order)."""
    out: set[int] = set()
    for op, i1, i2, _, _ in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            out.update(range(i1, i2))
    return out


def runs(indices: set[int]) -> list[range]:
    """Consecutive runs of indices: each run is one boilerplate phrase."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None or i != prev + 1:
            if start is not None:
                out.append(range(start, prev + 1))
            start = i
        prev = i
    if start is not None:
        out.append(range(start, prev + 1))
    return out


@pytest.fixture(scope="module")
def gold():
    rows = [json.loads(line) for line in GOLD.read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["cleaned"] = clean_text(r["raw"])
    return rows


WRITTEN = [r for r in map(json.loads, GOLD.read_text(encoding="utf-8").splitlines()) if r.get("case")]


@pytest.mark.parametrize("row", WRITTEN, ids=[f"{r['case']}: {r['raw'][:40]}" for r in WRITTEN])
def test_written_gold_case(row):
    assert clean_text(row["raw"]) == row["expected"]


def test_gold_set_covers_every_rule_and_plain_rows(gold):
    assert len(gold) >= 300
    fired: Counter = Counter()
    for r in gold:
        changed: Counter = Counter()
        clean_text(r["raw"], "doctor", changed)
        fired.update({k.split(".", 1)[1] for k in changed})
    doctor_rules = {rule.name for rule in RULES if "doctor" in rule.fields and rule.name != "whitespace"}
    assert doctor_rules <= set(fired), f"rules with no gold row: {doctor_rules - set(fired)}"
    assert sum(r["raw"].strip() == r["expected"] for r in gold) >= 25  # replies with nothing to remove
    assert sum(bool(re.search(r"[a-z][.!?][A-Z]", r["raw"])) for r in gold) >= 100  # run-on sentences
    print(f"\ngold rows per rule: {dict(sorted(fired.items()))}")


def test_gold_set_figures(gold):
    advice_total = advice_kept = 0
    boiler_words = boiler_words_removed = phrases = phrases_removed = 0
    advice_dropped = []
    signed = []
    for r in gold:
        raw, exp, out = words(r["raw"]), words(r["expected"]), words(r["cleaned"])
        advice_total += len(exp)
        advice_kept += sum(b.size for b in SequenceMatcher(None, exp, out, autojunk=False).get_matching_blocks())
        boiler = deleted(raw, exp)
        removed = deleted(raw, out)
        boiler_words += len(boiler)
        boiler_words_removed += len(boiler & removed)
        for phrase in runs(boiler):
            phrases += 1
            phrases_removed += set(phrase) <= removed
        if len(r["expected"]) >= MIN_REPLY_CHARS and len(r["cleaned"]) < MIN_REPLY_CHARS:
            advice_dropped.append(r["line"])
        if ENDS_IN_SIGNATURE.search(r["cleaned"]):
            signed.append((r["line"], r["cleaned"][-60:]))
    kept = advice_kept / advice_total
    phrase_share = phrases_removed / phrases
    word_share = boiler_words_removed / boiler_words
    print(
        f"\ngold set, {len(gold)} rows: words of advice kept {kept:.2%} ({advice_kept}/{advice_total}); "
        f"boilerplate phrases removed {phrase_share:.2%} ({phrases_removed}/{phrases}), "
        f"boilerplate words removed {word_share:.2%} ({boiler_words_removed}/{boiler_words}); "
        f"rows with advice dropped {len(advice_dropped)}; replies ending in a name or credentials {len(signed)}"
    )
    assert kept >= 0.995
    assert phrase_share >= 0.97
    assert advice_dropped == []
    assert signed == []


# --- each rule's own examples (job/clean.py RULES) ---------------------------------------------------------
EXAMPLES = [(rule, raw, out) for rule in RULES for raw, out in [*rule.cuts.items(), *((k, k) for k in rule.keeps)]]


@pytest.mark.parametrize(("rule", "raw", "expected"), EXAMPLES, ids=[f"{r.name}: {raw[:40]}" for r, raw, _ in EXAMPLES])
def test_rule_example(rule, raw, expected):
    """A must-cut example comes out as written and the rule is counted; a must-keep one comes out as it went in and
    the rule is not counted. Run on the doctor's reply when the rule cleans it, else on the rule's own field."""
    field = "doctor" if "doctor" in rule.fields else rule.fields[0]
    changed: Counter = Counter()
    assert clean_text(raw, field, changed) == expected
    assert changed[f"{field}.{rule.name}"] == (raw != expected)


def test_every_rule_has_examples_to_cut_and_to_keep():
    assert [rule.name for rule in RULES if not (rule.cuts and rule.keeps)] == []


def test_each_rule_is_counted_once_per_row():
    changed: Counter = Counter()
    clean_text("Hi, welcome to HCM. Rest. Hope this helps. Regards, Dr. X, MBBS", "doctor", changed)
    assert changed == {"doctor.welcome": 1, "doctor.hope_this_helps": 1, "doctor.signoff": 1}


# --- bad rows -------------------------------------------------------------------------------------------
def settings(**env):
    base = {
        "DATASET": str(FIXTURE),
        "NUM_SAMPLES": "4",
        "EVAL_SAMPLES": "1",
        "EVAL_PROMPTS": "0",
        "BENCHMARK_TASKS": "",
    }
    return load_settings(environ={**base, **{k: str(v) for k, v in env.items()}}, env_file=None)


def rows_file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_reply_given_as_a_list_of_strings_is_joined_by_newlines_not_its_repr(tmp_path):
    assert as_text(["Rest.", "See a doctor if it lasts."], "Doctor", 3, "x.csv") == "Rest.\nSee a doctor if it lasts."
    lines = [
        json.dumps({"Patient": f"Question {i} about my cough?", "Doctor": ["Rest and drink fluids.", "See a GP."]})
        for i in range(5)
    ]
    cfg = settings(DATASET=rows_file(tmp_path, "lists.jsonl", "\n".join(lines)))
    train, held_out, _ = sample(cfg, load_rows(cfg))
    assert {r["messages"][1]["content"] for r in train + held_out} == {"Rest and drink fluids.\nSee a GP."}


def test_a_reply_given_as_an_object_names_the_row_and_the_fix():
    with pytest.raises(ConfigError, match=r"row 7 \(counting from 0\), column 'Doctor': holds a dict") as err:
        as_text({"text": "Rest."}, "Doctor", 7, "x.csv")
    assert "string" in str(err.value)


@pytest.mark.parametrize(
    ("line", "kind"), [('["Rest.", "See a GP."]', "array"), ('"Rest and see a GP."', "string")], ids=["array", "string"]
)
def test_a_jsonl_line_that_is_not_an_object_names_its_line(tmp_path, line, kind):
    good = json.dumps({"Patient": "My knee hurts.", "Doctor": "Rest it for a week."})
    path = rows_file(tmp_path, "bad.jsonl", f"{good}\n{line}\n{good}\n")
    with pytest.raises(ConfigError, match=rf"line 2 is a JSON {kind}, not an object") as err:
        load_rows(settings(DATASET=path))
    assert '{"Patient": "...", "Doctor": "..."}' in str(err.value)


def test_a_json_file_holding_one_object_says_so(tmp_path):
    path = rows_file(tmp_path, "one.json", json.dumps({"Patient": "My knee hurts.", "Doctor": "Rest it."}))
    with pytest.raises(ConfigError, match="holds one JSON object") as err:
        load_rows(settings(DATASET=path))
    assert "JSON array" in str(err.value) and "NUM_SAMPLES" not in str(err.value)


def test_an_integer_doctor_column_names_the_column_and_its_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"Patient": [f"Question {i}?" for i in range(8)], "Doctor": list(range(8))}), path)
    cfg = settings(DATASET=str(path))
    with pytest.raises(ConfigError, match=r"DOCTOR_COLUMN='Doctor' holds int64 values") as err:
        sample(cfg, load_rows(cfg))
    assert "NUM_SAMPLES" not in str(err.value)


# --- the audit files ------------------------------------------------------------------------------------
def test_the_stage_writes_before_after_examples_per_rule(tmp_path):
    paths = RunPaths(tmp_path)
    run(settings(NUM_SAMPLES=100, EVAL_SAMPLES=16), paths)
    examples = read_jsonl(paths.cleaning_examples)
    stats = json.loads(paths.sample_stats.read_text())
    per_rule = Counter(e["rule"] for e in examples)
    assert per_rule and max(per_rule.values()) <= 3
    for e in examples:
        assert stats["changed"][f"doctor.{e['rule']}"] >= 1
        assert e["before"] != e["after"] and {"source_index", "before", "after"} <= set(e)


@pytest.mark.parametrize(
    "raw",
    [
        "Hi, may I answer your health queries right now ? Please type your query here. I have had a cough for 3 weeks.",
        "Hi,y y I answer your health queries right now ? Please type your query here.I have had a cough for 3 weeks.",
        "I have had a cough for 3 weeks. Hi, may I answer your health queries right now ? Please type your query here.",
    ],
)
def test_the_platform_prompt_leaves_the_patients_message(raw):
    """Shared sample: 35 patients' messages start with the platform's chat prompt; the patient's own words stay."""
    changed: Counter = Counter()
    assert clean_text(raw, "patient", changed) == "I have had a cough for 3 weeks."
    assert changed == Counter({"patient.platform_prompt": 1})
