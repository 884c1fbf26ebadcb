"""The benchmark stage: lm-eval's scoring on one loaded model, the paired interval, the gate, decontamination."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from job import benchmark, benchmark_tasks
from job.benchmark import Decontaminator, paired_difference
from job.config import Settings, load_settings, with_overrides
from job.errors import ConfigError, QualityGateError
from job.files import read_json, read_jsonl
from job.paths import RunPaths
from job.report import render_section

TASKS, FIXTURES = list(benchmark_tasks.TASKS), benchmark_tasks.FIXTURES


# --- statistics with a known answer ----------------------------------------------------------------------------
def test_paired_interval_matches_the_known_answer():
    # Every question flips from wrong to right: the difference is exactly +1 in every resample.
    assert paired_difference([([0] * 50, [1] * 50)]) == (1.0, (1.0, 1.0))
    # Same answers: no difference, and no interval around it.
    assert paired_difference([([1, 0, 1, 0], [1, 0, 1, 0])]) == (0.0, (0.0, 0.0))
    # 400 questions, 40 gained, none lost: the paired difference is a proportion p = 0.1, whose bootstrap
    # interval is close to the normal one, p +- 1.96 sqrt(p (1 - p) / n) = 0.1 +- 0.0294. Tolerance: one step
    # of the resampled mean (1/400) plus the Monte Carlo error of a 2.5% quantile at 10k draws (~0.001).
    base, tuned = [0] * 400, [1] * 40 + [0] * 360
    diff, (low, high) = paired_difference([(base, tuned)])
    half = 1.96 * math.sqrt(0.1 * 0.9 / 400)
    assert diff == pytest.approx(0.1)
    assert low == pytest.approx(0.1 - half, abs=1 / 400 + 0.002)
    assert high == pytest.approx(0.1 + half, abs=1 / 400 + 0.002)
    # Pairing matters: 40 gained and 40 lost questions give the same accuracies as no change, but an interval
    # as wide as 80 discordant questions make it, around 0.
    base, tuned = [1] * 40 + [0] * 40 + [0] * 320, [0] * 40 + [1] * 40 + [0] * 320
    diff, (low, high) = paired_difference([(base, tuned)])
    half = 1.96 * math.sqrt(0.2 / 400)  # variance of a -1/0/+1 difference with mean 0: P(discordant) / n
    assert diff == 0 and low == pytest.approx(-half, abs=0.005) and high == pytest.approx(half, abs=0.005)


def test_overall_is_the_mean_over_tasks_and_seeded():
    a = ([0, 1, 1, 0] * 25, [1, 1, 1, 0] * 25)  # +25 points
    b = ([1, 1, 0] * 30, [1, 0, 0] * 30)  # -33.3 points
    diff, ci = paired_difference([a, b])
    assert diff == pytest.approx((0.25 - 1 / 3) / 2)
    assert ci[0] < diff < ci[1]
    assert paired_difference([a, b]) == (diff, ci), "same seed, same interval"
    assert benchmark.verdict(*ci) == "not distinguishable"
    assert benchmark.verdict(0.01, 0.05) == "better" and benchmark.verdict(-0.05, -0.01) == "worse"


def _results(run_dir: Path, cfg: Settings, raw: dict) -> None:
    benchmark._write(RunPaths(run_dir), cfg, {"limit": cfg.BENCHMARK_LIMIT, "adapter_sha256": "x"}, raw)


def _task(base: list[int], tuned: list[int]) -> dict:
    return {"doc_ids": list(range(len(base))), "base_correct": base, "tuned_correct": tuned, "seconds": 0.0}


def test_gate_stops_a_known_drop_and_names_the_tasks_that_fell(tmp_path):
    cfg = with_overrides(Settings(), BENCHMARK_TASKS="medqa_4options,mmlu_anatomy", MAX_BENCHMARK_DROP=3.0)
    # medqa: 60% -> 40% (-20 points); anatomy unchanged: the mean over tasks falls by 10 points.
    _results(
        tmp_path,
        cfg,
        {
            "medqa_4options": _task([1] * 60 + [0] * 40, [1] * 40 + [0] * 60),
            "mmlu_anatomy": _task([1, 0] * 50, [1, 0] * 50),
        },
    )
    with pytest.raises(QualityGateError) as e:
        benchmark.check_gate(cfg, RunPaths(tmp_path))
    msg = str(e.value)
    assert e.value.exit_code == 5
    assert "MAX_BENCHMARK_DROP=3.0" in msg and "fell by 10.0 points" in msg
    assert (
        "medqa_4options 60.0% -> 40.0% (-20.0 points)" in msg and "mmlu_anatomy" not in msg.split("Tasks that fell")[1]
    )
    benchmark.check_gate(with_overrides(cfg, MAX_BENCHMARK_DROP=10.0), RunPaths(tmp_path))  # a 10-point drop is allowed
    benchmark.check_gate(with_overrides(cfg, BENCHMARK_TASKS=""), RunPaths(tmp_path))  # the stage is off: no gate
    card = render_section("benchmark", benchmark=read_json(RunPaths(tmp_path).benchmark)["tasks"], data={})
    assert "| medqa_4options | 100 | 60.0% | 40.0% | -20.0 [" in card
    assert "| **mean of 2 tasks** | 200 | 55.0% | 45.0% | -10.0 [" in card
    assert "**worse**" in card


# --- settings ---------------------------------------------------------------------------------------------------
def test_settings_name_the_valid_tasks():
    with pytest.raises(ConfigError) as e:
        load_settings(
            {"BENCHMARK_TASKS": "medqa_4options,usmle", "BENCHMARK_LIMIT": "0", "MAX_BENCHMARK_DROP": "-1"}, None
        )
    msg = str(e.value)
    assert "unknown task(s) usmle" in msg and all(t in msg for t in TASKS)
    assert "BENCHMARK_LIMIT=0" in msg and "MAX_BENCHMARK_DROP=-1.0" in msg
    assert load_settings({"BENCHMARK_TASKS": ""}, None).BENCHMARK_TASKS == ""
    assert Settings().BENCHMARK_TASKS.split(",") == list(TASKS)


# --- decontamination --------------------------------------------------------------------------------------------
QUESTION = read_jsonl(FIXTURES / "medmcqa.jsonl")[2][
    "question"
]  # "Which nerve is compressed in carpal tunnel syndrome?"


def test_decontaminator_drops_13_shared_words_not_12():
    text = "the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun"
    words = text.split()
    guard = Decontaminator([text], ["t"])
    assert guard.overlap({"patient": "so, " + " ".join(words[2:15]) + "!"}) == "benchmark"  # 13 words
    assert guard.overlap({"patient": " ".join(words[2:14])}) is None  # 12 words
    assert guard.overlap({"doctor": " ".join(words[:13]).upper()}) == "benchmark"  # case and punctuation ignored
    guard.hold_out({"patient": "one two three four five six seven eight nine ten eleven twelve thirteen"})
    assert (
        guard.overlap({"doctor": "zero one two three four five six seven eight nine ten eleven twelve thirteen"})
        == "held_out"
    )
    assert guard.summary()["dropped_benchmark_overlap"] == 2 and guard.summary()["dropped_held_out_overlap"] == 1


def test_sample_drops_training_rows_that_quote_a_benchmark_question_or_a_held_out_row(tmp_path):
    import datasets
    import numpy as np

    from job.sample import sample

    cfg = with_overrides(Settings(), BENCHMARK_DATA=str(FIXTURES), NUM_SAMPLES=4, EVAL_SAMPLES=2, SEED=0)
    guard = benchmark.fetch(cfg, tmp_path / "benchmark")
    assert sorted(p.stem for p in (tmp_path / "benchmark").iterdir()) == sorted(TASKS)
    assert guard.questions == sum(len(read_jsonl(FIXTURES / f"{t}.jsonl")) for t in TASKS)
    held = "My left knee has been swollen and stiff every morning for three weeks since I started running again."
    quoting = f"My exam asks: Question: {QUESTION} Choices: A. Median nerve B. Ulnar nerve. Which one is it?"
    rows = [
        {"Patient": held, "Doctor": "Rest it, use ice, and see a doctor if it stays swollen after a week."},
        {
            "Patient": "I get headaches after long days at the computer screen.",
            "Doctor": "Take breaks and check your eyes with an optician.",
        },
        {"Patient": quoting, "Doctor": "It is the median nerve, which runs through the carpal tunnel at the wrist."},
        {
            "Patient": "Hello doctor. " + held,
            "Doctor": "Knee swelling after running usually settles with rest and ice.",
        },
    ] + [
        {
            "Patient": f"Question number {i} about a rash on my arm that itches at night.",
            "Doctor": "Try a mild moisturiser and avoid scratching.",
        }
        for i in range(6)
    ]
    # Place the rows so that sample()'s seeded walk visits them in the order listed: the first EVAL_SAMPLES
    # kept are the held-out split.
    perm = np.random.default_rng(cfg.SEED).permutation(len(rows))
    placed = [None] * len(rows)
    for k, i in enumerate(perm):
        placed[i] = rows[k]
    ds = datasets.Dataset.from_list(placed)
    train, held_out, stats = sample(cfg, ds, guard=guard)
    assert [r["messages"][0]["content"] for r in held_out] == [rows[0]["Patient"], rows[1]["Patient"]]
    assert stats["dropped"]["overlap_benchmark"] == 1 and stats["dropped"]["overlap_held_out"] == 1
    assert not any(QUESTION in m["content"] or held in m["content"] for r in train for m in r["messages"])


def test_fetch_names_a_missing_local_file(tmp_path):
    (tmp_path / "medqa_4options.jsonl").write_text((FIXTURES / "medqa_4options.jsonl").read_text())
    cfg = with_overrides(Settings(), BENCHMARK_DATA=str(tmp_path), BENCHMARK_TASKS="medqa_4options,medmcqa")
    with pytest.raises(ConfigError, match=r"lacks medmcqa\.jsonl"):
        benchmark.fetch(cfg, tmp_path / "out")
    (tmp_path / "medmcqa.jsonl").write_text('{"question": "a row without its options"}\n')
    with pytest.raises(ConfigError, match=r"BENCHMARK_DATA file .*medmcqa\.jsonl could not be read as task medmcqa"):
        benchmark.fetch(cfg, tmp_path / "out")


# --- scoring through lm-eval on the tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_peft(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B weights are non-zero, so base and tuned answer differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Our own log P(continuation | context), split into tokens as lm-eval does for causal models."""
    import torch

    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    assert whole[: len(ctx)] == ctx, "the context's tokens are a prefix of the whole's"
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logits[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_lm_eval_scores_base_and_tuned_on_one_loaded_model(tiny_peft, tiny_model_dir, tmp_path):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    model, tok = tiny_peft
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    plain = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tokenizer=tok)
    differ = 0
    for task in ("medqa_4options", "pubmedqa", "mmlu_anatomy"):
        data = FIXTURES / f"{task}.jsonl"
        tuned = benchmark.evaluate_task(lm, task, data, None)
        with model.disable_adapter():
            base = benchmark.evaluate_task(lm, task, data, None)
        reference = benchmark.evaluate_task(plain, task, data, None)
        docs = read_jsonl(data)
        assert sorted(s["doc_id"] for s in tuned) == list(range(len(docs)))
        for t, b, r in zip(tuned, base, reference):
            lt = [x[0] for x in t["filtered_resps"]]
            lb = [x[0] for x in b["filtered_resps"]]
            lr = [x[0] for x in r["filtered_resps"]]
            # The adapter disabled is the base model: same log-likelihoods, to fp32 rounding of padded batches.
            assert lb == pytest.approx(lr, abs=1e-4)
            differ += lt != pytest.approx(lb, abs=1e-3)
            # lm-eval's numbers are the plain log-likelihood of each choice after the task's prompt.
            ours = [_loglikelihood(model, tok, ctx, cont) for ctx, cont in t["arguments"]]
            assert lt == pytest.approx(ours, abs=1e-4)
            choices = [c.strip() for _, c in t["arguments"]]
            target = choices.index(t["target"]) if isinstance(t["target"], str) else t["target"]
            assert t["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == target)
    assert differ > 0, "the adapter changed no log-likelihood: base and tuned were not told apart"


def test_prompts_are_lm_evals_own(tiny_peft):
    """Our local-file configs keep the stock prompt, choices and target; pubmedqa builds the stock prompt."""
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny_peft
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    s = benchmark.evaluate_task(lm, "mmlu_medical_genetics", FIXTURES / "mmlu_medical_genetics.jsonl", 1)[0]
    doc = read_jsonl(FIXTURES / "mmlu_medical_genetics.jsonl")[0]
    assert s["arguments"][0][0] == (
        "The following are multiple choice questions (with answers) about medical genetics.\n\n"
        f"{doc['question']}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\nC. {doc['choices'][2]}\n"
        f"D. {doc['choices'][3]}\nAnswer:"
    )
    assert [c for _, c in s["arguments"]] == [" A", " B", " C", " D"] and s["target"] == doc["answer"]
    p = benchmark.evaluate_task(lm, "pubmedqa", FIXTURES / "pubmedqa.jsonl", 1)[0]
    doc = read_jsonl(FIXTURES / "pubmedqa.jsonl")[0]
    ctx = "\n".join(doc["context"]["contexts"])
    assert p["arguments"][0][0] == f"Abstract: {ctx}\nQuestion: {doc['question']}\nAnswer:"
    assert [c for _, c in p["arguments"]] == [" yes", " no", " maybe"]


def test_every_registered_task_is_lm_evals_with_its_dataset_and_a_fixture():
    """Each row of job/benchmark_tasks is what lm-eval finds in the folders indexed: the Hub dataset, config and
    split the row names, from our folder exactly when the row says ours, and the answer field where the target is
    a function. The fixture folder holds one file per task and no other."""
    assert sorted(p.name for p in FIXTURES.iterdir()) == sorted(f"{t}.jsonl" for t in TASKS)
    for name, row in benchmark_tasks.TASKS.items():
        cfg = benchmark.task_config(name, None)
        assert (cfg["dataset_path"], cfg.get("dataset_name"), cfg["test_split"]) == row[1:4], name
        where = Path(benchmark.task_manager().task_index[name].yaml_path).parent
        assert (where == benchmark_tasks.OWN) == (row.folder is None), name
        if not isinstance(cfg["doc_to_target"], str):
            assert row.answer in read_jsonl(FIXTURES / f"{name}.jsonl")[0], name


# --- the stage in the pipeline ----------------------------------------------------------------------------------
def test_demo_run_benchmarks_every_task(demo_run):
    results = read_json(RunPaths(demo_run.run_dir).benchmark)["tasks"]
    assert list(results) == [*TASKS, "overall"]
    for task in TASKS:
        assert results[task]["n"] == len(read_jsonl(FIXTURES / f"{task}.jsonl"))
    stats = read_json(RunPaths(demo_run.run_dir).sample_stats)["decontamination"]
    assert stats["benchmark_questions"] == results["overall"]["n"]
    card = demo_run.paths.model_card.read_text()
    assert "| task | questions | base | tuned | difference [95% CI] |" in card and "Decontamination:" in card


def test_rerun_skips_finished_tasks(demo_run_copy, run_job):
    run = demo_run_copy
    path = RunPaths(run.run_dir).benchmark
    before = read_json(path)
    # As if killed after all but the last task: that one is scored again, the others are kept.
    partial = dict(before["raw"])
    del partial[TASKS[-1]]
    before_kept = json.dumps({t: partial[t] for t in partial})
    cfg = load_settings({**run.env}, None)
    benchmark._write(RunPaths(run.run_dir), cfg, before["key"], partial)
    manifest = read_json(run.paths.manifest)  # what a kill during the stage leaves: running, push not yet
    manifest["stages"]["benchmark"] = {"status": "running"}
    manifest["stages"].pop("push")
    run.paths.manifest.write_text(json.dumps(manifest))
    result = run_job(run.env)
    assert result.exit_code == 0, result.output[-3000:]
    for task in TASKS[:-1]:
        assert f"benchmark {task:<28} already scored; skipping" in result.output
    assert f"benchmark {TASKS[-1]:<28} n=" in result.output
    after = read_json(path)
    assert json.dumps({t: after["raw"][t] for t in partial}) == before_kept
    assert after["raw"][TASKS[-1]]["tuned_correct"] == before["raw"][TASKS[-1]]["tuned_correct"]


def test_benchmark_gate_stops_the_push(demo_run_copy, run_job):
    run = demo_run_copy
    cfg = load_settings({**run.env}, None)
    # every task: base 15 of 20 right, tuned 5 of 20: a 50-point drop
    _results(run.run_dir, cfg, {t: _task([1] * 15 + [0] * 5, [1] * 5 + [0] * 15) for t in TASKS})
    manifest = read_json(run.paths.manifest)  # push not reached yet
    manifest["stages"].pop("push")
    run.paths.manifest.write_text(json.dumps(manifest))
    env = {**run.env, "STAGES": "push", "MAX_BENCHMARK_DROP": "3"}  # the demo's own gate is open (job/__main__.py)
    result = run_job(env)
    assert result.exit_code == 5, result.output[-2000:]
    assert "MAX_BENCHMARK_DROP=3.0" in result.output and "fell by 50.0 points" in result.output
    assert all(f"{t} 75.0% -> 25.0%" in result.output for t in TASKS)
    assert "Nothing was pushed" in result.output and run.hub.uploads == []
    ok = run_job({**env, "MAX_BENCHMARK_DROP": "60"})
    assert ok.exit_code == 0, ok.output[-2000:]
    assert len(run.hub.uploads) == 1
