"""The whole job on the tiny model: what it learns, the files it promises, what reaches the Hub, and resume rules.

Most tests read the one shared run (`demo_run`, conftest.py); tests that run the job again work on a copy.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from conftest import CANARY_TOKEN, HUB_REPO_ID

from job.config import STAGES, load_settings
from job.errors import BAD_CONFIG
from job.files import read_json, read_jsonl
from job.paths import RunPaths

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What the Hub repo must hold: the adapter, the tokenizer the job trained with, and the report.
PUSHED = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
    "loss.png",
    "metrics.json",
    "data_stats.json",
    "token_stats.json",
    "train_log.json",
    "benchmark.json",
}
PUSHED_OPTIONAL = {"special_tokens_map.json"}  # written by some Transformers versions, harmless


def _losses(run_dir):
    log = read_json(RunPaths(run_dir).train_log)
    return [e["loss"] for e in log["log_history"] if "loss" in e]


def _stage_times(run_dir):
    return {s: r.get("finished_at") for s, r in read_json(RunPaths(run_dir).manifest)["stages"].items()}


# --- it learns ------------------------------------------------------------------------------------------
def test_training_loss_is_finite_and_falls(demo_run):
    losses = _losses(demo_run.run_dir)
    assert len(losses) >= 6, losses  # LOGGING_STEPS=1: one entry per optimizer step
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"training loss did not fall: first three {losses[:3]}, last three {losses[-3:]}"


def test_every_trainable_parameter_changed(demo_run, tmp_path):
    """Rebuild the initial PEFT model the way training did (same seed) and compare with the saved adapter."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from job.train import build_trainer

    paths = RunPaths(tmp_path / "run")
    paths.data.mkdir(parents=True)
    paths.train_tokens.write_bytes(demo_run.paths.train_tokens.read_bytes())
    cfg = load_settings(environ=demo_run.env, env_file=None)
    model = build_trainer(cfg, paths, "fp32").model
    initial = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    trained = load_file(str(RunPaths(demo_run.run_dir).adapter / "adapter_model.safetensors"))

    n_trainable = sum(1 for _, p in model.named_parameters() if p.requires_grad)
    # TRL casts a quantized model's LoRA weights to bf16 inside SFTTrainer; build_trainer casts them back to
    # fp32 (fp16's gradient scaler needs it, and a resumed run loads fp32). Fails if an upgrade moves TRL's
    # cast past our re-cast, or drops the re-cast.
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert set(trained) == set(initial) and len(trained) == n_trainable > 0
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trained}
    # LoRA on the targets, and the turn tokens' rows: the tiny random model gives its end of turn no
    # probability, so TRAIN_TURN_TOKENS=auto trains them (job/turn_tokens.py)
    # LORA_TARGET_MODULES=auto on a Llama: the seed recipe's q_proj and v_proj
    assert modules == {"q_proj", "v_proj", "trainable_tokens_delta"}
    for key, start in initial.items():
        end = trained[key].float()
        assert end.shape == start.shape, key
        if "lora_B" in key:
            assert not start.any(), f"{key} should start at zero (LoRA starts as the identity)"
        assert not end.equal(start), f"{key} did not change in training"
        assert end.isfinite().all(), key


# --- the files it promises ------------------------------------------------------------------------------
def test_manifest_records_every_stage_done(demo_run):
    manifest = read_json(RunPaths(demo_run.run_dir).manifest)
    assert list(manifest["stages"]) == list(STAGES)
    for stage, rec in manifest["stages"].items():
        assert rec["status"] == "done", stage
        assert rec["finished_at"] and rec["seconds"] >= 0, stage
        for artifact in rec["artifacts"]:
            assert (demo_run.run_dir / artifact).exists(), f"{stage}: {artifact} listed but missing"
    assert manifest["stages"]["train"]["fingerprint"]["LORA_R"] == 8
    # The report has one writer, the pipeline: recorded once, under its own key, never as a stage's file.
    report = [str(p.relative_to(demo_run.run_dir)) for p in (demo_run.paths.model_card, demo_run.paths.loss_plot)]
    assert manifest["report"]["artifacts"] == report
    assert not set(report) & {a for rec in manifest["stages"].values() for a in rec["artifacts"]}
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["versions"])


def test_data_files(demo_run):
    p = demo_run.paths
    written = {
        p.train_rows,
        p.eval_rows,
        p.sample_stats,
        p.cleaning_examples,
        p.train_tokens,
        p.eval_tokens,
        p.format_stats,
        p.benchmark_data,
    }
    assert set(p.data.iterdir()) == written
    train, held_out = read_jsonl(p.train_rows), read_jsonl(p.eval_rows)
    assert len(train) == int(demo_run.env["NUM_SAMPLES"]) and len(held_out) == int(demo_run.env["EVAL_SAMPLES"])
    stats = read_json(p.sample_stats)
    assert stats["train_rows"] == len(train) and stats["eval_rows"] == len(held_out)
    token_stats = read_json(p.format_stats)
    assert set(token_stats) == {"train", "eval"}
    tokens = read_jsonl(p.train_tokens)
    assert len(tokens) == token_stats["train"]["kept"]
    assert all(set(r) == {"input_ids", "completion_mask"} for r in tokens)


def test_adapter_and_checkpoints(demo_run):
    from transformers import AutoTokenizer

    adapter = RunPaths(demo_run.run_dir).adapter
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = read_json(adapter / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.chat_template and tok.eos_token == "<|eot_id|>"

    # Checkpoints: only complete ones, at most SAVE_TOTAL_LIMIT, and the last one is the final step.
    ckpts = sorted(RunPaths(demo_run.run_dir).checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert 1 <= len(ckpts) <= 2
    assert all((c / "COMPLETE").is_file() for c in ckpts)
    final_step = read_json(ckpts[-1] / "trainer_state.json")["global_step"]
    assert ckpts[-1].name == f"checkpoint-{final_step}"
    assert final_step == max(e["step"] for e in read_json(RunPaths(demo_run.run_dir).train_log)["log_history"])


def test_eval_metrics_and_samples(demo_run):
    metrics = read_json(RunPaths(demo_run.run_dir).metrics)
    for name in ("base", "tuned"):
        m = metrics[name]
        assert {"eval_loss", "perplexity", "rougeL_f1", "answer_words_mean", "safety"} <= set(m), name
        assert math.isfinite(m["eval_loss"]) and m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-3)
        assert 0 <= m["rougeL_f1"] <= 1 and m["answer_words_mean"] >= 0
        assert 0 <= m["safety"]["overall"]["pass_rate"] <= 1
    # Same held-out replies, adapter off vs on: a trained adapter must change the loss.
    assert metrics["tuned"]["eval_loss"] != metrics["base"]["eval_loss"]

    samples = read_jsonl(RunPaths(demo_run.run_dir).samples)
    held_out = read_jsonl(RunPaths(demo_run.run_dir).eval_rows)
    assert len(samples) == int(demo_run.env["EVAL_PROMPTS"])
    for s, row in zip(samples, held_out):
        assert set(s) == {"prompt", "reference", "base", "tuned"}
        assert [s["prompt"], s["reference"]] == [m["content"] for m in row["messages"]]
        assert isinstance(s["base"], str) and isinstance(s["tuned"], str)


def test_model_card(demo_run):
    card = RunPaths(demo_run.run_dir).model_card.read_text()
    front = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert front, "the model card starts with YAML metadata between --- lines"
    meta = yaml.safe_load(front.group(1))
    assert "base_model" not in meta and "datasets" not in meta  # local folders are no Hub ids: the Hub rejects them
    assert meta["library_name"] == "peft"
    assert meta["license"] == "llama3.2"
    headings = re.findall(r"^#+ (.+)$", card, re.M)
    for section in (
        "Not medical advice",
        "How to use",
        "Evaluation",
        "Safety screen",
        "Training",
        "Data",
        "Limitations",
    ):
        assert section in headings, f"model card lacks a '{section}' section; it has {headings}"
    assert HUB_REPO_ID in card  # the usage snippet loads the pushed repo
    assert "github.com" not in card  # no invented links
    # the random tiny base cannot end a turn, so TRAIN_TURN_TOKENS=auto trained its template's turn tokens
    assert re.search(
        r"turn tokens trained with the adapter \| <\|start_header_id\|>, <\|end_header_id\|>, <\|eot_id\|>", card
    )
    assert "| LORA_TARGET_MODULES | auto |" in card and "| modules with adapters | q_proj, v_proj |" in card
    assert RunPaths(demo_run.run_dir).loss_plot.read_bytes()[:8] == PNG_MAGIC


# --- what reaches the Hub -------------------------------------------------------------------------------
def test_push_uploads_exactly_the_staged_files_once(demo_run):
    hub = demo_run.hub
    # repo_info: the repo's visibility is checked against HUB_PRIVATE before anything is uploaded.
    assert [m for m, _ in hub.calls] == ["create_repo", "repo_info", "upload_folder"]
    (repo,) = hub.methods("create_repo")
    assert repo["repo_id"] == HUB_REPO_ID and repo["private"] is True
    assert repo.get("repo_type", "model") == "model"
    (upload,) = hub.uploads
    assert upload["repo_id"] == HUB_REPO_ID and upload.get("repo_type", "model") == "model"
    assert upload["delete_patterns"] == "*"  # the repo holds exactly push/ after the commit
    assert hub.repos[HUB_REPO_ID]["files"] == {".gitattributes", *upload["files"]}
    assert set(upload["files"]) - PUSHED_OPTIONAL == PUSHED, upload["files"]
    assert hub.tokens == [CANARY_TOKEN]  # the token goes to the client, and only there
    # The staged folder is what was uploaded, byte for byte.
    for name in upload["files"]:
        assert (upload["copy"] / name).read_bytes() == (RunPaths(demo_run.run_dir).push / name).read_bytes(), name
    assert (upload["copy"] / "README.md").read_bytes() == RunPaths(demo_run.run_dir).model_card.read_bytes()


# --- resume rules ---------------------------------------------------------------------------------------
def test_rerun_with_same_settings_skips_every_stage(demo_run_copy, run_job):
    run = demo_run_copy
    manifest = RunPaths(run.run_dir).manifest.read_text()
    weights = RunPaths(run.run_dir).adapter / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    result = run_job(run.env, "run")

    assert result.exit_code == 0, result.output[-3000:]
    assert RunPaths(run.run_dir).manifest.read_text() == manifest  # finished_at unchanged
    assert weights.stat().st_mtime_ns == mtime
    assert run.hub.calls == [], "a finished push must not upload again"
    assert sum("already done" in line for line in result.output.splitlines()) == len(STAGES)


def test_changed_setting_on_a_finished_run_is_refused(demo_run_copy, run_job):
    run = demo_run_copy
    before = _stage_times(run.run_dir)

    result = run_job({**run.env, "LORA_R": "16"}, "run")

    assert result.exit_code == BAD_CONFIG == 2
    assert "LORA_R" in result.output and "REDO" in result.output and "8 -> 16" in result.output
    assert _stage_times(run.run_dir) == before and run.hub.calls == []


def test_redo_reruns_only_the_changed_stage_and_those_after_it(demo_run_copy, run_job):
    """REDO=true after changing only HUB_REPO_ID reruns push, not training (issue 16)."""
    run = demo_run_copy
    before = _stage_times(run.run_dir)

    redone = run_job({**run.env, "HUB_REPO_ID": "bob/med-other", "REDO": "true"}, "run")

    assert redone.exit_code == 0, redone.output[-3000:]
    after = _stage_times(run.run_dir)
    assert {s: after[s] for s in STAGES[:-1]} == {s: before[s] for s in STAGES[:-1]}, "upstream stages reran"
    assert "stage push      starting" in redone.output and "stage train     starting" not in redone.output
    assert [u["repo_id"] for u in run.hub.uploads] == ["bob/med-other"]
    push = read_json(RunPaths(run.run_dir).manifest)["stages"]["push"]
    assert push["status"] == "done" and push["fingerprint"]["HUB_REPO_ID"] == "bob/med-other"


def test_a_done_stage_whose_files_are_gone_runs_again(demo_run_copy, run_job):
    """Deleted token files: format runs again (and the stages after it), instead of a FileNotFoundError."""
    run = demo_run_copy
    run.paths.train_tokens.unlink()

    result = run_job(run.env, "run")

    assert result.exit_code == 0, result.output[-3000:]
    assert f"{run.paths.train_tokens.relative_to(run.run_dir)} is gone: running it again" in result.output
    assert run.paths.train_tokens.is_file()
    assert "stage sample    already done" in result.output and "stage format    starting" in result.output


def test_a_deleted_report_is_rendered_again_without_rerunning_a_stage(demo_run_copy, run_job):
    run = demo_run_copy
    card = run.paths.model_card.read_text()
    stages = read_json(run.paths.manifest)["stages"]
    run.paths.model_card.unlink()

    result = run_job(run.env, "run")

    assert result.exit_code == 0, result.output[-3000:]
    assert run.paths.model_card.read_text() == card
    assert read_json(run.paths.manifest)["stages"] == stages
    assert sum("already done" in line for line in result.output.splitlines()) == len(STAGES)


def test_stages_subset_runs_only_those_and_needs_upstream(demo_env, run_job, fake_hub, tmp_path):
    env = demo_env(tmp_path / "outputs", STAGES="sample,format")
    run_dir = tmp_path / "outputs" / env["RUN_NAME"]

    result = run_job(env, "run")

    assert result.exit_code == 0, result.output[-3000:]
    manifest = read_json(RunPaths(run_dir).manifest)
    assert {s: r["status"] for s, r in manifest["stages"].items()} == {"sample": "done", "format": "done"}
    assert RunPaths(run_dir).train_tokens.is_file()
    paths = RunPaths(run_dir)
    assert not any(d.exists() for d in (paths.checkpoints, paths.adapter, paths.eval, paths.report, paths.push))
    assert fake_hub.calls == []

    # A later stage whose upstream never ran is refused before any work, naming what is missing.
    result = run_job({**env, "STAGES": "evaluate,push"}, "run")
    assert result.exit_code == 2
    assert "'train'" in result.output and "STAGES" in result.output
    assert read_json(RunPaths(run_dir).manifest) == manifest and fake_hub.calls == []


def test_unknown_stage_is_a_config_error(demo_env, run_job, tmp_path):
    result = run_job(demo_env(tmp_path / "outputs", STAGES="sample,trian"), "run")
    assert result.exit_code == 2 and "STAGES" in result.output
    assert not (tmp_path / "outputs").exists()


def test_nothing_in_the_run_holds_the_token(demo_run):
    """The canary HF_TOKEN reached the Hub client only: no file of the run, no upload, no log line."""
    leaks = [
        str(p.relative_to(demo_run.run_dir))
        for p in demo_run.run_dir.rglob("*")
        if p.is_file() and CANARY_TOKEN.encode() in p.read_bytes()
    ]
    assert leaks == []
    assert CANARY_TOKEN not in demo_run.output
