"""The sample stage (job/sample.py): each cleaning rule on hand-written text, then sampling the bundled fixture.

The fixture's counts come from job/fixtures/README.md (140 rows; 6 with an empty or whitespace-only field,
4 exact and 3 near duplicates, 127 usable; URLs in 3 replies, "-->" in 3, boilerplate in 34 + 3 + 3).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from job.__main__ import FIXTURE
from job.clean import RULE_NAMES
from job.config import load_settings
from job.errors import ConfigError
from job.sample import clean_text, dedup_key, load_rows, sample

FIXTURE_ROWS = 140
FIXTURE_USABLE = 127  # after dropping 6 empty/whitespace-only rows and 4 + 3 duplicates
FIXTURE_EMPTY = {"Patient": 3, "Doctor": 3}  # "" twice each, whitespace-only once each
FIXTURE_DUPLICATES = 4 + 3  # exact + near
PLATFORM_TRACES = r"chat ?doctor|healthcare ?magic|icliniq|https?://|www\.|-->"


def settings(**env):
    base = {"DATASET": str(FIXTURE), "NUM_SAMPLES": "40", "EVAL_SAMPLES": "16", "EVAL_PROMPTS": "8"}
    return load_settings(environ={**base, **{k: str(v) for k, v in env.items()}}, env_file=None)


@pytest.fixture(scope="module")
def fixture_ds():
    return load_rows(settings())


def patient(row: dict) -> str:
    return row["messages"][0]["content"]


def tiny_ds(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"Description": "", **r} for r in rows])


# --- cleaning rules, one at a time --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "clean", "rules"),
    [
        pytest.param(
            "Read this first: https://example.org/acne?id=3 and also www.skin-help.example.com/page for pictures. "
            "Use a gentle cleanser.",
            "Read this first and also for pictures. Use a gentle cleanser.",
            {"urls"},
            id="urls",
        ),
        pytest.param(
            "Details are at http://example.com. Use a gentle cleanser.",
            "Details are. Use a gentle cleanser.",
            {"urls"},
            id="url-keeps-the-full-stop-and-drops-its-preposition",
        ),
        pytest.param(
            "Take it with food --> and avoid alcohol.", "Take it with food and avoid alcohol.", {"arrows"}, id="arrow"
        ),
        pytest.param(
            "Hello, welcome to Chat Doctor. Your fever is likely viral. Drink fluids.",
            "Your fever is likely viral. Drink fluids.",
            {"welcome"},
            id="welcome-to-chat-doctor",
        ),
        pytest.param(
            "Hi, thanks for the query. Rest well. Thanks for using HealthcareMagic.",
            "Rest well.",
            {"thanks_for_query"},
            id="thanks-for-using",
        ),
        pytest.param(
            "Rest and fluids help. Thank you for choosing iCliniq.",
            "Rest and fluids help.",
            {"thanks_for_query"},
            id="icliniq",
        ),
        pytest.param(
            "In my experience at ChatDoctor this heals well. Keep the wound clean.",
            # Phrase level: the platform goes, the sentence around it stays.
            "In my experience this heals well. Keep the wound clean.",
            {"platform_name"},
            id="chatdoctor-inside-the-reply",
        ),
        pytest.param(
            "Rest and fluids help. Regards, Dr. X Y", "Rest and fluids help.", {"signoff"}, id="regards-dr-x-y"
        ),
        pytest.param(
            "Rest and fluids help. Hope this helps. Take care. Dr. Anita Rao",
            "Rest and fluids help.",
            {"hope_this_helps", "signoff"},
            id="hope-this-helps-take-care-dr",
        ),
        pytest.param(
            "Keep the wound clean. Regards, Dr. Chat Doctor, Orthopaedic surgeon.",
            "Keep the wound clean.",
            {"platform_name", "signoff"},
            id="sign-off-whose-name-is-boilerplate",
        ),
        pytest.param(
            "Rest\u00a0well.\tDrink  water.\r\nSee a GP.\n\n\n\n\nSoon.\n",
            "Rest well. Drink water.\nSee a GP.\n\nSoon.",
            {"whitespace"},
            id="whitespace-nbsp-tabs-crlf",
        ),
        pytest.param(
            "Hello, welcome to Chat Doctor.\n\nRest well.\n\nSee a GP.",
            "Rest well.\n\nSee a GP.",
            {"welcome"},
            id="paragraphs-survive-boilerplate-removal",
        ),
        pytest.param(
            "If the pain persists, see your Dr. soon.",
            "If the pain persists, see your Dr. soon.",
            set(),
            id="advice-ending-in-dr-is-kept",
        ),
        pytest.param(
            "Please see Dr. Smith tomorrow for a check.",
            "Please see Dr. Smith tomorrow for a check.",
            set(),
            id="doctor-named-mid-sentence-is-kept",
        ),
        pytest.param("  \t\u00a0\n ", "", {"whitespace"}, id="whitespace-only"),
    ],
)
def test_doctor_cleaning_rule(raw, clean, rules):
    changed = Counter()
    assert clean_text(raw, "doctor", changed) == clean
    assert set(changed) == {f"doctor.{r}" for r in rules}
    assert all(n == 1 for n in changed.values())


def test_patient_text_keeps_dr_greetings_and_signatures():
    text = "Hello Dr. Rao,\tI have had a fever since Monday.  Thanks, Dr. Rao"
    changed = Counter()
    assert clean_text(text, "patient", changed) == "Hello Dr. Rao, I have had a fever since Monday. Thanks, Dr. Rao"
    assert changed == {"patient.whitespace": 1}
    # The same words as a doctor's reply end in a sign-off, which goes.
    assert clean_text(text, "doctor") == "Hello Dr. Rao, I have had a fever since Monday."


def test_patient_text_loses_links_and_arrows():
    changed = Counter()
    assert clean_text("My report --> is at www.example.com/r.pdf ok?", "patient", changed) == "My report is ok?"
    assert changed == {"patient.arrows": 1, "patient.urls": 1}


def test_clean_text_handles_missing_values():
    assert clean_text(None) == "" and clean_text(42) == "42"


def test_dedup_key_ignores_case_punctuation_and_spacing():
    assert dedup_key("I have  a HEADACHE, doctor!") == dedup_key("i have a headache doctor") == "ihaveaheadachedoctor"
    assert dedup_key("I have a headache") != dedup_key("I have a toothache")


# --- the fixture, sampled -----------------------------------------------------------------------------------
def test_all_usable_fixture_rows_match_its_readme(fixture_ds):
    assert len(fixture_ds) == FIXTURE_ROWS
    train, held_out, stats = sample(settings(NUM_SAMPLES=FIXTURE_USABLE - 16), fixture_ds)

    assert (stats["rows_read"], stats["rows_kept"], len(train), len(held_out)) == (140, 127, 111, 16)
    dropped = stats["dropped"]
    assert dropped.get("empty_patient", 0) == FIXTURE_EMPTY["Patient"]
    assert dropped.get("empty_doctor", 0) == FIXTURE_EMPTY["Doctor"]
    # A near duplicate that differs only in spacing is an exact one once whitespace is cleaned.
    assert dropped.get("exact_duplicate", 0) + dropped.get("near_duplicate", 0) == FIXTURE_DUPLICATES
    assert dropped.get("exact_duplicate", 0) >= 4
    assert "reply_too_short" not in dropped
    # Rows each rule changed, over every row read (duplicates included), as the fixture README counts them.
    raw = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    odd_space = sum(bool(re.search(r"[\t\u00a0\r]| {2}|\n{3}|^\s|\s$", r["Doctor"])) for r in raw)
    changed = stats["changed"]
    assert changed["doctor.urls"] == 3
    assert changed["doctor.arrows"] == 3
    # Every boilerplate row fires at least one phrase rule (a row may fire several).
    phrase_rules = set(RULE_NAMES) - {"whitespace", "urls", "arrows", "emails", "phones", "platform_prompt"}
    assert sum(changed.get(f"doctor.{r}", 0) for r in phrase_rules) >= 34 + 3 + 3
    assert changed["doctor.whitespace"] == odd_space

    kept = train + held_out
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in kept)
    patients, doctors = zip(*([m["content"] for m in r["messages"]] for r in kept))
    assert all(patients) and all(len(d) >= 20 for d in doctors)
    traces = [d[:80] for d in doctors if re.search(PLATFORM_TRACES, d, re.I)]
    assert traces == [], "platform text survived cleaning"
    assert not [d for d in doctors if re.search(r"\bdr\b\.?\s*\w*\W*$", d, re.I)], "a sign-off survived"
    assert len({r["source_index"] for r in kept}) == len(kept)


def test_asking_for_more_rows_than_usable_names_num_samples(fixture_ds):
    with pytest.raises(ConfigError) as err:
        sample(settings(NUM_SAMPLES=FIXTURE_USABLE - 16 + 1), fixture_ds)
    msg = str(err.value)
    assert "NUM_SAMPLES=112" in msg and "EVAL_SAMPLES=16" in msg and f"only {FIXTURE_USABLE}" in msg


def test_sampling_is_deterministic_for_a_seed_and_differs_for_another(fixture_ds):
    first = sample(settings(SEED=42), fixture_ds)
    again = sample(settings(SEED=42), fixture_ds)
    other = sample(settings(SEED=7), fixture_ds)
    assert first == again
    assert [r["source_index"] for r in first[0]] != [r["source_index"] for r in other[0]]
    assert [r["source_index"] for r in first[1]] != [r["source_index"] for r in other[1]]


def test_train_and_eval_are_disjoint_on_the_normalised_patient_text(fixture_ds):
    train, held_out, _ = sample(settings(NUM_SAMPLES=FIXTURE_USABLE - 16), fixture_ds)
    train_keys = [dedup_key(patient(r)) for r in train]
    eval_keys = [dedup_key(patient(r)) for r in held_out]
    assert len(set(train_keys)) == len(train_keys) and len(set(eval_keys)) == len(eval_keys)
    assert not set(train_keys) & set(eval_keys)


def test_duplicates_and_fragments_are_dropped_and_counted():
    reply = "Rest, drink fluids, and see your doctor if the fever lasts more than three days."
    rows = [
        {"Patient": "I have a fever, what to do?", "Doctor": reply},
        {"Patient": "i have a FEVER what to do", "Doctor": "A different reply that is long enough to keep."},
        {"Patient": "I have a fever, what to do?", "Doctor": reply},
        {"Patient": "My knee hurts after running.", "Doctor": "Ice it, rest for a week, and see a physio if not."},
        {"Patient": "My ear hurts.", "Doctor": "Hi. Welcome to Chat Doctor. Yes, rest."},  # "Yes, rest." is left
    ]
    # Sampling stops once it has enough rows; find a seed whose order reads all five before that.
    for seed in range(100):
        train, held_out, stats = sample(
            settings(NUM_SAMPLES=1, EVAL_SAMPLES=1, EVAL_PROMPTS=0, SEED=seed), tiny_ds(rows)
        )
        if stats["rows_read"] == len(rows):
            break
    else:
        pytest.fail("no seed in 100 read every row")
    kept = sorted(dedup_key(patient(r)) for r in train + held_out)
    assert kept == ["ihaveafeverwhattodo", "mykneehurtsafterrunning"]
    assert stats["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1, "reply_too_short": 1}


def test_eval_split_does_not_move_when_num_samples_changes(fixture_ds):
    small_train, small_eval, _ = sample(settings(NUM_SAMPLES=20), fixture_ds)
    big_train, big_eval, _ = sample(settings(NUM_SAMPLES=90), fixture_ds)
    assert small_eval == big_eval
    assert (len(small_train), len(big_train)) == (20, 90)
    assert big_train[:20] == small_train  # more samples extend the training set; they don't reshuffle it


def test_missing_column_names_the_setting_and_the_columns_there_are(fixture_ds):
    with pytest.raises(ConfigError) as err:
        sample(settings(PATIENT_COLUMN="Question"), fixture_ds)
    msg = str(err.value)
    assert "PATIENT_COLUMN='Question'" in msg
    assert all(c in msg for c in ("'Description'", "'Patient'", "'Doctor'"))
    assert "DOCTOR_COLUMN" not in msg  # only what is wrong


def test_description_column_is_needed_only_when_used():
    rows = [
        {"Patient": f"Question number {i} about my cough?", "Doctor": "A reply long enough to keep it."}
        for i in range(3)
    ]
    ds = tiny_ds(rows).remove_columns("Description")
    cfg = dict(NUM_SAMPLES=2, EVAL_SAMPLES=1, EVAL_PROMPTS=0)
    assert len(sample(settings(**cfg), ds)[0]) == 2
    with pytest.raises(ConfigError, match="DESCRIPTION_COLUMN='Description'"):
        sample(settings(USE_DESCRIPTION="true", **cfg), ds)


def test_dataset_file_problems_are_config_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"Patient": "caf\u00e9", "Doctor": "x"}\n'.encode("latin-1"))
    for path, words in ((tmp_path / "nope.jsonl", "no such file"), (empty, "empty"), (latin1, "line 1 is not UTF-8")):
        with pytest.raises(ConfigError, match=re.escape(words)) as err:
            load_rows(settings(DATASET=str(path)))
        assert f"DATASET={str(path)!r}" in str(err.value)
