"""The real-model tier: the whole job on a real pretrained model, checked for what random weights cannot show.

Runs only with HIPPO_REAL_MODEL=<model folder> (`make real-check` prepares Gemma 3 270M with
`python -m bench.real_model prepare` and sets it), and is selected with `pytest -m real`; skipped everywhere
else, CI included. Meant for the GPU machine: there the job runs with its defaults (1,000 conversations of
the shared sample, 100 held out, 50 prompts answered). Without a GPU it runs a small version (SMALL_ON_CPU) so
the tier can be tried on a laptop. HIPPO_REAL_DATA overrides the data file; HIPPO_REAL_OUT keeps the run
directory (else a temporary one); HIPPO_REAL_SETTINGS="KEY=VAL;KEY=VAL" sets any of the job's settings.

One job run (module fixture), then one test per property: held-out loss of the tuned model below the base's,
computed by bench/parity.py's code and not the evaluate stage's; answers that stop at the end-of-turn token,
hold no chat-template text and do not degenerate into repetition; the safety screen, the benchmark and the
judge (tests/judge_server.py) on real answers; a model card that names the base model and the settings that
trained it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import REPO, job_process
from judge_server import JudgeServer

from bench.parity import repeated_share
from job.files import read_json, read_jsonl
from job.paths import RunPaths

REAL_MODEL = os.environ.get("HIPPO_REAL_MODEL", "")
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not REAL_MODEL, reason="set HIPPO_REAL_MODEL to a model folder (make real-check does)"),
]
SHARED_DATA = REPO.parent / "shared" / "data" / "medical_dialogues_sample.jsonl"
# Without a GPU: enough rows for a real model to learn the reply format (the CPU hint trained 120),
# few answers to generate. Minutes on 2 cores instead of hours.
SMALL_ON_CPU = {
    "NUM_SAMPLES": "120",
    "EVAL_SAMPLES": "24",
    "EVAL_PROMPTS": "12",
    "MAX_NEW_TOKENS": "128",
    "BATCH_SIZE": "2",
    "BENCHMARK_LIMIT": "3",
}
# Shares of the answered prompts: a real tuned model may ramble on a few prompts, not on most.
MIN_STOPPED = 0.8  # answers that ended with the end-of-turn token before MAX_NEW_TOKENS
MIN_FLUENT = 0.9  # answers not dominated by one repeated phrase


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The whole job (all stages, no Hub upload) on the real model, with the scripted judge."""
    import torch

    data = Path(os.environ.get("HIPPO_REAL_DATA", SHARED_DATA))
    if not data.is_file():
        pytest.skip(f"no data file {data}; set HIPPO_REAL_DATA")
    out = Path(os.environ.get("HIPPO_REAL_OUT") or tmp_path_factory.mktemp("real"))
    out.mkdir(parents=True, exist_ok=True)
    judge = JudgeServer("overlap").start()
    env = {
        "BASE_MODEL": REAL_MODEL,
        "DATASET": str(data),
        "OUTPUT_DIR": str(out),
        "RUN_NAME": "real",
        "HUB_REPO_ID": "",
        "BENCHMARK_DATA": str(REPO / "job" / "fixtures" / "benchmark"),
        # The bundled benchmark has a few questions per task: too few to tell a drop from noise, so the gate
        # must not stop the push stage this tier also checks (tests/test_benchmark.py tests the gate).
        "MAX_BENCHMARK_DROP": "100",
        # The safety gate is a finding this tier reports (eval/metrics.json), not a failure of the pipeline: a
        # 270M base model tuned for one epoch may well lose the screen (it did, 2026-12-07, on an H100).
        "MAX_SAFETY_DROP": "100",
        # Gemma 3 270M is a base model: decoded plain greedy, one epoch on 1,000 replies still repeats itself and
        # 10 of 50 answers ended (H100, 2026-12-07); with this penalty 50 of 50 read as prose and the end-of-turn
        # check passed. The README advises it for small bases; HIPPO_REAL_SETTINGS="REPETITION_PENALTY=1.0"
        # shows plain greedy.
        "REPETITION_PENALTY": "1.15",
        "MODEL_LICENSE": "gemma" if "gemma" in _model_type(REAL_MODEL) else "other",
        "JUDGE_MODEL": "scripted",
        "JUDGE_BASE_URL": judge.base_url,
        "JUDGE_API_KEY": "x",
        **({} if torch.cuda.is_available() else SMALL_ON_CPU),
        **dict(kv.split("=", 1) for kv in os.environ.get("HIPPO_REAL_SETTINGS", "").split(";") if "=" in kv),
    }
    try:
        done = job_process(env, cwd=out, timeout=3600)
    finally:
        judge.stop()
    (out / "job.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"the job failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return RunPaths(out / "real"), env


def _model_type(folder: str) -> str:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return ""


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_MODEL)


def test_every_stage_ran(real_run):
    paths, _ = real_run
    stages = read_json(paths.manifest)["stages"]
    assert [s for s in ("sample", "format", "train", "evaluate", "benchmark", "push") if s not in stages] == []


def test_tuned_held_out_loss_below_base_measured_independently(real_run):
    """bench/parity.py's forward passes (not the evaluate stage's code) on the run's held-out split; the
    evaluate stage's own figures must agree with them."""
    from bench.parity import eval_conversations, held_out_losses

    paths, env = real_run
    conversations, max_length = eval_conversations(paths.eval_rows, env)
    ours = held_out_losses(REAL_MODEL, conversations, {"tuned": paths.adapter}, max_length)
    assert ours["tuned"]["loss"] < ours["base"]["loss"], ours
    job = read_json(paths.metrics)
    for name in ("base", "tuned"):  # same rows, same NF4 base: only batching and kernels differ
        assert job[name]["eval_loss"] == pytest.approx(ours[name]["loss"], rel=0.02), (name, job[name], ours[name])


def _answers(paths):
    return [s["tuned"] for s in read_jsonl(paths.samples)]


def test_generation_stops_at_the_end_of_turn(real_run):
    """A tuned answer that ends before MAX_NEW_TOKENS stopped at a stop token; one that runs to the limit
    usually went past the end of its turn into another (the end-of-turn token is not the tokenizer's EOS)."""
    paths, env = real_run
    tok = _tokenizer()
    limit = int(env.get("MAX_NEW_TOKENS", 256))
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in _answers(paths)]
    stopped = [n < limit - 4 for n in lengths]  # decoding and re-encoding may shift a count by a token or two
    assert sum(stopped) >= MIN_STOPPED * len(lengths), f"answer lengths (tokens) {lengths}, limit {limit}"


def special_texts(tokenizer) -> list[str]:
    """The text of the tokenizer's control tokens (<start_of_turn>, <|eot_id|> ...); not the added tokens that
    are plain text (Gemma's tokenizer adds runs of newlines as tokens)."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(s for s in found if s.strip())


def template_words(tokenizer) -> set[str]:
    """The words a chat template writes around a message (role names such as user, model, assistant), as
    they would show in text decoded with the special tokens skipped."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}, {"role": "assistant", "content": marker}],
        tokenize=False,
        add_generation_prompt=False,
    )
    for special in special_texts(tokenizer):
        text = text.replace(special, "\n")
    return {w for piece in text.split(marker) for w in piece.split() if w.isalpha()}


def test_answers_hold_no_template_text(real_run):
    paths, _ = real_run
    tok = _tokenizer()
    specials = special_texts(tok)
    roles = template_words(tok)
    role_line = re.compile(r"(?m)^\s*(" + "|".join(map(re.escape, sorted(roles))) + r")\s*$") if roles else None
    bad = [
        a for a in _answers(paths) if any(s in a for s in specials) or (role_line is not None and role_line.search(a))
    ]
    assert bad == [], f"answers with template text ({sorted(roles)} or special tokens): {bad[:3]}"


def test_repeated_share_tells_a_loop_from_prose():
    """The degeneracy measure itself, on text written for it (runs with the tier)."""
    assert repeated_share("take this pill. " * 30) > 0.5
    assert repeated_share("Hello, I am a 27 year old male. " + "I have been having a beard for 10 years. " * 12) > 0.5
    prose = "A dry cough for three weeks after a cold is common, but see a doctor if you have fever or blood."
    assert repeated_share(prose) < 0.1


def test_answers_are_real_text_not_loops(real_run):
    paths, _ = real_run
    answers = _answers(paths)
    assert all(a.strip() for a in answers), "empty tuned answers"
    fluent = [a for a in answers if repeated_share(a) <= 0.5]
    assert len(fluent) >= MIN_FLUENT * len(answers), [a[:200] for a in answers if a not in fluent][:3]


def test_safety_benchmark_and_judge_ran_on_real_answers(real_run):
    paths, env = real_run
    metrics = read_json(paths.metrics)
    safety = read_jsonl(paths.safety)
    assert safety and all(r["tuned"]["answer"].strip() for r in safety), safety[:2]
    assert metrics["tuned"]["safety"]["overall"]["total"] == len(safety)
    tasks = read_json(paths.benchmark)["tasks"]
    assert tasks["overall"]["n"] > 0 and {"base", "tuned"} <= set(tasks["overall"])
    judge = metrics["judge"]
    assert judge["pairs"] == int(env.get("EVAL_PROMPTS", 50)) and judge["pairs_decided"] > 0, judge
    assert len(read_jsonl(paths.judge)) == 2 * judge["pairs"]  # both orders of every pair


def test_card_names_the_base_model_and_its_training(real_run):
    from job.config import load_settings

    paths, env = real_run
    card = paths.model_card.read_text()
    cfg = load_settings(env, env_file=None)
    assert f"A LoRA adapter for `{REAL_MODEL}`" in card
    assert f"license: {env['MODEL_LICENSE']}" in card
    for name in ("BASE_MODEL", "QUANTIZATION", "LORA_R", "LORA_ALPHA", "LEARNING_RATE", "EPOCHS", "BATCH_SIZE"):
        assert f"| {name} | {getattr(cfg, name)} |" in card, name
    first = read_jsonl(paths.samples)[0]
    assert " ".join(first["tuned"].split())[:80] in " ".join(card.split())  # the real answers are shown
    assert (paths.push / "README.md").read_text() == card
