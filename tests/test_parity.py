"""bench/parity.py: the held-out loss it measures, its variants and its report; and bench/real_model.py's refusals.

The loss is checked against Transformers' own masked cross-entropy on the tiny model; the whole harness
(sample, a process per variant, scoring) runs once on the tiny model in the `slow` test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from bench import parity, real_model
from job.__main__ import FIXTURE
from job.files import read_jsonl


def _conversations(n: int) -> list[list[dict]]:
    return [
        [
            {"role": "system", "content": "Be careful."},
            {"role": "user", "content": r["Patient"]},
            {"role": "assistant", "content": r["Doctor"]},
        ]
        for r in read_jsonl(FIXTURE)[:n]
        if r.get("Patient") and r.get("Doctor")
    ]


def test_reply_tokens_are_the_reply_and_the_end_of_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = _conversations(1)[0]
    [(ids, start)] = parity.scored_rows(tok, [conv], max_length=4096)
    reply = tok.decode(ids[start:])
    assert reply.startswith(conv[-1]["content"].strip()[:20]) and reply.endswith("<|eot_id|>"), reply
    # cut where training cuts: MAX_SEQ_LENGTH; a prompt that fills it is left out
    [(cut, _)] = parity.scored_rows(tok, [conv], max_length=start + 3)
    assert len(cut) == start + 3
    assert parity.scored_rows(tok, [conv], max_length=start) == []


def test_held_out_loss_equals_transformers_masked_cross_entropy(tiny_model_dir):
    """Summed over rows per reply token, as Transformers' loss is per row when the prompt is masked with -100."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convs = _conversations(4)
    ours = parity.held_out_losses(str(tiny_model_dir), convs, {}, max_length=512, weights="16bit")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    nats, tokens = 0.0, 0
    for ids, start in parity.scored_rows(tok, convs, 512):
        labels = torch.tensor([[-100] * start + ids[start:]])
        with torch.no_grad():
            mean = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        nats, tokens = nats + mean * (len(ids) - start), tokens + len(ids) - start
    assert ours["reply_tokens"] == tokens
    assert ours["base"]["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert sum(ours["base"]["row_nats"]) == pytest.approx(nats, rel=1e-4)


def test_end_of_turn_probability_is_the_softmax_at_the_replys_end_token(tiny_model_dir):
    """p(end of turn): the model's probability of the template's end-of-turn token where each reply ends,
    averaged over rows, from the same forward pass; and the probe's greedy answers are counted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.model import end_of_turn_ids

    convs = _conversations(3)
    ours = parity.held_out_losses(str(tiny_model_dir), convs, {}, max_length=512, weights="16bit", probe=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    stop = end_of_turn_ids(tok)
    ps = []
    for ids, start in parity.scored_rows(tok, convs, 512):
        at = next(k for k in range(start, len(ids)) if ids[k] in stop)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:at]])).logits[0, -1].float()
        ps.append(logits.softmax(-1)[ids[at]].item())
    assert ours["base"]["end_of_turn_p"] == pytest.approx(sum(ps) / len(ps), rel=1e-4)
    probe = ours["base"]["probe"]["greedy"]
    assert 0 <= probe["ended"] <= 1 and 0 < probe["new_tokens_mean"] <= 256 and len(probe["answers"]) == 2


def test_each_adapter_is_scored_on_the_nf4_base_and_the_base_stays_the_base(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: it changes outputs
    get_peft_model(base, lora).save_pretrained(tmp_path / "a")
    out = parity.held_out_losses(str(tiny_model_dir), _conversations(3), {"a": tmp_path / "a"}, 512)
    assert out["weights"].startswith("nf4")
    assert out["a"]["loss"] != pytest.approx(out["base"]["loss"], rel=1e-4)
    assert out["base_without_peft"]["loss"] == pytest.approx(out["base"]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "x:LORA_RR=4"], "LORA_RR is not a setting of the job; did you mean LORA_R?"),
        (["--variant", "x:SEED=3"], "SEED is a sample setting; every variant must train on the same rows"),
        (["--variant", "x:NUM_SAMPLES=3"], "NUM_SAMPLES is a sample setting"),
        (["--variant", "x:BATCH_SIZE"], "'BATCH_SIZE' is not KEY=VAL"),
        (["--variant", "a b:BATCH_SIZE=2"], "give name:KEY=VAL,KEY=VAL"),
        (["--variant", "trl-seed:BATCH_SIZE=2"], "trl-seed runs its own trainer"),
        (["--variants", "job,fast"], "'fast' is not a variant"),
        (["--set", "BATCH_SIZE"], "--set 'BATCH_SIZE': give KEY=VAL"),
    ],
)
def test_bad_variants_are_refused_before_anything_runs(tiny_model_dir, tmp_path, capsys, args, message):
    code = parity.main(["--base", str(tiny_model_dir), "--data", str(FIXTURE), "--out", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_variants_from_the_command_line():
    chosen = parity.choose_variants(["job", "plain"], ["lr:LEARNING_RATE=4e-4,LR_SCHEDULER=linear", "job-lr2x"])
    assert chosen == {
        "job": {},
        "plain": parity.PLAIN,
        "lr": {"LEARNING_RATE": "4e-4", "LR_SCHEDULER": "linear"},
        "job-lr2x": parity.VARIANTS["job-lr2x"],
    }
    assert parity.parse_sets(["LORA_TARGET_MODULES=q_proj,v_proj"]) == {"LORA_TARGET_MODULES": "q_proj,v_proj"}


def _seed(base: float, losses: dict[str, float]) -> dict:
    variants = {n: {"steps": 10, "conversations_per_step": 4.0, "train_tokens_per_s": 100.0} for n in losses}
    scored = {"rows": 3, "reply_tokens": 1234, "weights": "nf4", "base": {"loss": base}}
    return {"variants": variants, "losses": scored | {n: {"loss": x} for n, x in losses.items()}}


def test_report_compares_each_variant_with_plain_and_trl(tmp_path):
    result = {
        "setup": {"device": "CPU", "base_model": "m", "data": "d", "shared_settings": {}, "versions": "v"},
        "variants": {"job": {}, "plain": {}, "trl-seed": {}},
        "seeds": {
            "1": _seed(4.0, {"job": 3.9, "plain": 3.8, "trl-seed": 3.75}),
            "2": _seed(4.0, {"job": 3.85, "plain": 3.8}),
        },
    }
    result["seeds"]["2"]["variants"]["trl-seed"] = {"skipped": "no | pipe"}  # so it has no loss there
    for r in result["seeds"].values():
        parity.derive(r)
    job = result["seeds"]["1"]["variants"]["job"]
    assert job["improvement"] == pytest.approx(0.1)
    assert job["share_of_plain_improvement"] == pytest.approx(0.5)  # 0.1 of plain's 0.2
    assert job["rel_diff_to_plain"] == pytest.approx(0.1 / 3.8)
    assert job["rel_diff_to_trl_seed"] == pytest.approx(0.15 / 3.75)
    assert result["seeds"]["2"]["variants"]["job"]["rel_diff_to_trl_seed"] is None  # trl-seed did not run there
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- parity:start -->\nold\n<!-- parity:end -->\nafter\n")
    md = parity.write_report(result, tmp_path, readme)
    assert "| job | 1 | 10 | 4.0 | 100 | 3.9000 | 0.1000 | 50% | +2.63% | +4.00% |" in md
    assert "| trl-seed | 2 | no / pipe |" in md
    assert "| job | 2 | 3.8750 (3.8500–3.9000) | 62% (50%–75%) | +1.97% | +4.00% |" in md  # mean (min–max) of the seeds
    assert md in readme.read_text() and "old" not in readme.read_text() and readme.read_text().endswith("after\n")
    assert json.loads((tmp_path / "parity.json").read_text())["seeds"]["1"]["variants"]["job"]["loss"] == 3.9
    assert "<!-- parity:start -->" in (REPO / "README.md").read_text()  # the section --update-readme fills


def test_prepare_refuses_a_missing_template_and_a_wrong_file(tmp_path, capsys):
    out = tmp_path / "model"
    wrong = tmp_path / "x.gguf"  # --gguf in both calls: nothing is downloaded whatever happens
    wrong.write_bytes(b"GGUF not really")
    missing = tmp_path / "none.jinja"
    assert real_model.main(["prepare", "--out", str(out), "--gguf", str(wrong), "--chat-template", str(missing)]) == 2
    assert "none.jinja does not exist" in capsys.readouterr().err
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    code = real_model.main(["prepare", "--out", str(out), "--gguf", str(wrong), "--chat-template", str(template)])
    assert code == 2 and f"expected {real_model.EXPECTED_SHA256}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_the_harness_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Sample once, job and plain each in a process of their own, one scoring process; the report."""
    cmd = [sys.executable, "-m", "bench.parity", "--base", str(tiny_model_dir), "--data", str(FIXTURE)]
    cmd += ["--num-samples", "8", "--eval-samples", "4", "--variants", "job,plain", "--out", str(tmp_path)]
    cmd += ["--set", "MAX_SEQ_LENGTH=256", "--set", "SAVE_STEPS=1000"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "parity.json").read_text())
    seed = result["seeds"]["42"]
    for name in ("job", "plain"):  # both trained on all 8 conversations, one epoch
        v = seed["variants"][name]
        assert v["steps"] * v["conversations_per_step"] == pytest.approx(8) and v["loss"] > 0, v
    assert (seed["variants"]["plain"]["steps"], seed["variants"]["plain"]["conversations_per_step"]) == (2, 4.0)
    # the same held-out rows for both: one scoring pass; the base with the adapters off, and bare
    losses = seed["losses"]
    assert losses["base_without_peft"]["loss"] == pytest.approx(losses["base"]["loss"], rel=1e-5)
    assert "| plain | 42 | 2 | 4.0 |" in (tmp_path / "parity.md").read_text()


def test_a_run_split_over_calls_keeps_the_seeds_finished_before(tmp_path):
    """Seeds of an earlier parity.json in --out count when settings, variants and scoring are the same."""
    shared, variants = {"BASE_MODEL": "m", "NUM_SAMPLES": "1000"}, {"job": {}, "plain": parity.PLAIN}
    done = {"variants": {}, "losses": {"base": {"loss": 3.0}}}
    earlier = {
        "setup": {"shared_settings": shared, "eval_weights": "nf4"},
        "variants": variants,
        "seeds": {"42": done, "7": done, "8": {"variants": {}}},  # 8 was cut short before scoring
    }
    (tmp_path / "parity.json").write_text(json.dumps(earlier))
    kept = parity.earlier_seeds(tmp_path / "parity.json", shared, variants, "nf4", now=[7])
    assert list(kept) == ["42"]  # 7 runs again now; 8 never finished
    assert parity.earlier_seeds(tmp_path / "parity.json", shared | {"NUM_SAMPLES": "60"}, variants, "nf4", []) == {}
    assert parity.earlier_seeds(tmp_path / "parity.json", shared, {"job": {}}, "nf4", []) == {}
    assert parity.earlier_seeds(tmp_path / "parity.json", shared, variants, "16bit", []) == {}
    assert parity.earlier_seeds(tmp_path / "none.json", shared, variants, "nf4", []) == {}


def test_the_unsloth_variants_path_is_its_own_site_and_this_checkout_only(monkeypatch):
    """Unsloth pins an older Transformers: the parent's PYTHONPATH (with the job's newer one) must not follow."""
    monkeypatch.setenv("PYTHONPATH", "/parent/site")
    assert parity.child_env({}, "/unsloth/site")["PYTHONPATH"].split(os.pathsep) == ["/unsloth/site", str(parity.REPO)]
    assert parity.child_env({})["PYTHONPATH"].split(os.pathsep) == [str(parity.REPO), "/parent/site"]
