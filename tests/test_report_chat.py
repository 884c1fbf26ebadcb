"""The report a clinician reads, the safety gate before pushing, and `python -m job chat`."""

from __future__ import annotations

import json

from job import safety
from job.config import load_settings
from job.model import build_messages
from job.paths import RunPaths


def test_report_has_the_safety_table_per_category(demo_run):
    metrics = json.loads(RunPaths(demo_run.run_dir).metrics.read_text())
    card = RunPaths(demo_run.run_dir).model_card.read_text()
    for model in ("base", "tuned"):
        cats = metrics[model]["safety"]["categories"]
        assert set(cats) == set(safety.CATEGORIES)
        assert sum(c["total"] for c in cats.values()) == len(safety.prompts())
    for cat in safety.CATEGORIES:
        t = metrics["tuned"]["safety"]["categories"][cat]
        b = metrics["base"]["safety"]["categories"][cat]
        assert f"| {cat} | {t['total']} | {b['pass_rate']:.0%} | {t['pass_rate']:.0%} |" in card
    rows = [json.loads(x) for x in RunPaths(demo_run.run_dir).safety.read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in safety.prompts()]
    assert all("answer" in r["base"] and "passed" in r["tuned"] for r in rows)
    # five side-by-side answers: patient, doctor, base, tuned
    assert card.count("- *Doctor (reference):*") == 5 and card.count("- *Tuned:*") == 5


def test_safety_gate_stops_the_push(demo_run_copy, run_job):
    run = demo_run_copy
    env = {**run.env, "MIN_SAFETY_PASS_RATE": "0.9", "STAGES": "push", "REDO": "true"}
    result = run_job(env)
    assert result.exit_code == 5, result.output[-2000:]
    assert "MIN_SAFETY_PASS_RATE=0.9" in result.output and "emergency" in result.output
    assert "Nothing was pushed" in result.output
    assert run.hub.uploads == [], "the gate must stop the upload"
    manifest = json.loads(RunPaths(run.run_dir).manifest.read_text())
    assert manifest["stages"]["push"]["status"] != "done"
    # and a threshold the model meets lets the push through
    ok = run_job({**env, "MIN_SAFETY_PASS_RATE": "0.0"})
    assert ok.exit_code == 0, ok.output[-2000:]
    assert len(run.hub.uploads) == 1


def test_chat_one_shot_uses_the_training_template(demo_run, run_job, monkeypatch):
    """`chat --prompt` answers through the same system prompt and chat template as training."""
    from peft import PeftModelForCausalLM

    seen = {}
    real_generate = PeftModelForCausalLM.generate

    def spy(self, *args, **kwargs):
        seen["input_ids"] = kwargs["input_ids"][0].tolist()
        out = real_generate(self, *args, **kwargs)
        seen["new"] = out[0, len(seen["input_ids"]) :].tolist()
        return out

    monkeypatch.setattr(PeftModelForCausalLM, "generate", spy)
    prompt = "I have had a dry cough for three weeks. Should I worry?"
    env = {**demo_run.env, "MAX_NEW_TOKENS": "8"}
    result = run_job(env, "chat", "--adapter", str(RunPaths(demo_run.run_dir).adapter), "--prompt", prompt)
    assert result.exit_code == 0, result.output[-2000:]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(RunPaths(demo_run.run_dir).adapter)
    cfg = load_settings(env, env_file=None)
    expected = tok.apply_chat_template(build_messages(cfg, prompt), add_generation_prompt=True, return_dict=True)
    assert seen["input_ids"] == list(expected["input_ids"])
    assert cfg.SYSTEM_PROMPT in tok.decode(seen["input_ids"])
    answer = tok.decode(seen["new"], skip_special_tokens=True).strip()
    assert 0 < len(seen["new"]) <= 8
    assert result.output.strip().splitlines()[-1].strip() == answer or answer == ""


def test_chat_rejects_a_folder_that_is_not_an_adapter(tmp_path, run_job, demo_env):
    result = run_job(demo_env(tmp_path / "out"), "chat", "--adapter", str(tmp_path), "--prompt", "hi")
    assert result.exit_code == 2
    assert "--adapter" in result.output and "not a PEFT adapter" in result.output


def test_html_from_the_data_is_text_in_the_card(demo_run_copy):
    """A row's raw HTML (and a model echoing it) is escaped in the side-by-side answers, not markup in the card."""
    from job import report
    from job.files import read_jsonl, write_jsonl

    paths = RunPaths(demo_run_copy.run_dir)
    hostile = {
        "prompt": "My rash <script>alert('x')</script> itches <!-- hidden",
        "reference": 'Use the cream. <img src=x onerror="alert(1)"> ![pixel](http://tracker.example/p.png)',
        "base": "</textarea><iframe src=//evil.example></iframe>",
        "tuned": "Rest & drink <b>water</b>.",
    }
    write_jsonl(paths.samples, [hostile] + read_jsonl(paths.samples)[1:])
    card = report.model_card(load_settings(demo_run_copy.env, env_file=None), paths)
    for raw in ("<script", "<img", "<!--", "<iframe", "</textarea", "<b>", "![pixel]"):
        assert raw not in card, raw
    assert "My rash &lt;script&gt;alert('x')&lt;/script&gt; itches &lt;!-- hidden" in card
    assert "Rest &amp; drink &lt;b&gt;water&lt;/b&gt;." in card
    assert card.count("- *Doctor (reference):*") == 5  # the layout around the answers is unchanged


def test_the_card_says_when_answers_were_decoded_with_a_repetition_penalty(demo_run):
    from job import report

    paths = RunPaths(demo_run.run_dir)
    plain = report.model_card(load_settings(demo_run.env, env_file=None), paths)
    penalised = report.model_card(load_settings({**demo_run.env, "REPETITION_PENALTY": "1.15"}, env_file=None), paths)
    assert "Answers are greedy, at most" in plain and "repetition penalty" not in plain.split("## Training")[0]
    assert "Answers are greedy\nwith a repetition penalty of 1.15 (Transformers' `repetition_penalty`" in penalised
