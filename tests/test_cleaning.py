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
from job.clean import EVERY_FIELD, RULE_FIELD, RULE_NAMES, clean_text
from job.config import load_settings
from job.errors import ConfigError
from job.files import read_jsonl
from job.paths import RunPaths
from job.sample import MIN_REPLY_CHARS, as_text, load_rows, run, sample

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
    doctor_rules = {n for n in RULE_NAMES[1:] if RULE_FIELD.get(n, "doctor") in ("doctor", EVERY_FIELD)}
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


# --- tricky cases ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        pytest.param(
            "If the pain persists, see your Dr. soon.", "If the pain persists, see your Dr. soon.", id="dr-in-advice"
        ),
        pytest.param(
            "Hello,Thanks for the query.I would suggest an X-ray.It may be a hairline fracture.",
            "I would suggest an X-ray.It may be a hairline fracture.",
            id="greeting-run-into-advice",
        ),
        pytest.param(
            "Apply the gel twice daily.Hope this helps.If it is so, stop it.",
            "Apply the gel twice daily. If it is so, stop it.",
            id="run-on-hope-this-helps",
        ),
        pytest.param(
            "Use a mild soap.Best wishes,Dr Sudhir Kumar Md DM (Neurology)Senior Consultant Neurologist",
            "Use a mild soap.",
            id="signoff-with-credentials-no-spaces",
        ),
        pytest.param(
            "Avoid scratching.Thanks.Dr.Harshit Bhachech.MBBS, DDVL.", "Avoid scratching.", id="thanks-dr-mbbs"
        ),
        pytest.param("Rest well. Regards, Dr. X, General Surgeon", "Rest well.", id="regards-dr-specialty"),
        pytest.param(
            "Drink fluids. Hope this will take care of your query.Thank youDr Y",
            "Drink fluids.",
            id="thank-you-dr-glued",
        ),
        pytest.param(
            "Read about it (https://example.org/acne?id=3). Then rest, at www.x.org, daily.",
            "Read about it. Then rest, daily.",
            id="url-trailing-punctuation",
        ),
        pytest.param(
            "Send the photos to me at dr.someone@example.com and rest.", "Send the photos to me and rest.", id="email"
        ),
        pytest.param("Rest and fluids. Dr. M R Puhan Mob: 9437873112", "Rest and fluids.", id="phone"),
        pytest.param("Take 400-600 mg ibuprofen every 8 hours.", "Take 400-600 mg ibuprofen every 8 hours.", id="dose"),
        pytest.param(
            "Fever of 100 - 101 for 2 days. Take Susten 200-0-0-1 on 8-10-2014.",
            "Fever of 100 - 101 for 2 days. Take Susten 200-0-0-1 on 8-10-2014.",
            id="ranges-schedules-dates-are-not-phones",
        ),
        pytest.param(
            "Hi, welcome to HCM. HCM is hypertrophic cardiomyopathy? No: rest.",
            "Is hypertrophic cardiomyopathy? No: rest.",
            id="platform-name-alone-goes",
        ),
        pytest.param(
            "I hope the antibiotics help with the pain. Rest.",
            "I hope the antibiotics help with the pain. Rest.",
            id="hope-with-advice-kept",
        ),
        pytest.param(
            "Wash it. For further information consult a dermatologist online -->", "Wash it.", id="icliniq-advert"
        ),
        pytest.param(
            "Revert after three weeks to a dermatologist online -->",
            "Revert after three weeks to a dermatologist.",
            id="arrow-keeps-advice",
        ),
        pytest.param(
            "Thank you. Use Betadine and Ice.",
            "Thank you. Use Betadine and Ice.",
            id="capitalised-advice-is-not-a-name",
        ),
    ],
)
def test_tricky_case(raw, clean):
    assert clean_text(raw) == clean


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
    assert as_text(["Rest.", "See a doctor if it lasts."], "Doctor", 3) == "Rest.\nSee a doctor if it lasts."
    lines = [
        json.dumps({"Patient": f"Question {i} about my cough?", "Doctor": ["Rest and drink fluids.", "See a GP."]})
        for i in range(5)
    ]
    cfg = settings(DATASET=rows_file(tmp_path, "lists.jsonl", "\n".join(lines)))
    train, held_out, _ = sample(cfg, load_rows(cfg))
    assert {r["doctor"] for r in train + held_out} == {"Rest and drink fluids.\nSee a GP."}


def test_a_reply_given_as_an_object_names_the_row_and_the_fix():
    with pytest.raises(ConfigError, match=r"row 7, column 'Doctor': holds a dict") as err:
        as_text({"text": "Rest."}, "Doctor", 7)
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
