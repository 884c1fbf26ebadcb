"""Provenance: the record never disagrees with what ran (issue 26).

A changed training setting retrains from step 0 under REDO (old checkpoints moved aside, never resumed), and the
card names what trained the adapter; a stage selection that would publish a card for an adapter these settings
did not train is refused; edited input files (DATASET, BENCHMARK_DATA) are inputs that changed, found by content;
`python -m job provenance` prints the record; manifests from before all this still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from job import provenance, report
from job.__main__ import DEMO, FIXTURE
from job.checkpoints import FINGERPRINT, MARKER, resume_point
from job.config import STAGES, load_settings, with_overrides
from job.errors import BAD_CONFIG
from job.files import read_json, read_jsonl
from job.paths import RunPaths


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _card_row(card: str, name: str) -> str:
    m = re.search(rf"^\| {re.escape(name)} \| (.*?) \|$", card, re.M)
    assert m, f"the card has no row {name!r}"
    return m.group(1)


def _stage_times(run_dir: Path) -> dict:
    return {s: r.get("finished_at") for s, r in read_json(RunPaths(run_dir).manifest)["stages"].items()}


# --- REDO with a changed training setting ----------------------------------------------------------------------
def test_redo_with_a_new_learning_rate_retrains_from_step_0_and_the_card_names_it(demo_run_copy, run_job):
    run = demo_run_copy
    paths = run.paths
    old_adapter = (paths.adapter / "adapter_model.safetensors").read_bytes()
    old_checkpoints = sorted(p.name for p in paths.checkpoints.glob("checkpoint-*"))
    old_rate = run.env["LEARNING_RATE"]
    # Fewer steps, prompts and questions than the shared run, to keep the test short: only the rate matters here.
    faster = {"EPOCHS": "0.5", "EVAL_PROMPTS": "2", "MAX_NEW_TOKENS": "4", "BENCHMARK_LIMIT": "1"}

    result = run_job({**run.env, **faster, "REDO": "true", "LEARNING_RATE": "0.004"}, "run")

    assert result.exit_code == 0, result.output[-3000:]
    assert f"LEARNING_RATE: {float(old_rate)!r} -> 0.004" in result.output
    assert "REDO: stage train reruns (" in result.output
    assert "resuming from" not in result.output and "training from step 0" in result.output
    # The old checkpoints are moved aside whole, not resumed and not deleted.
    (stale,) = list(paths.root.glob("checkpoints-stale-*"))
    assert sorted(p.name for p in stale.glob("checkpoint-*")) == old_checkpoints
    assert all((stale / name / MARKER).is_file() for name in old_checkpoints)
    assert (paths.adapter / "adapter_model.safetensors").read_bytes() != old_adapter
    # Every record names the new rate, and one fingerprint: manifest, checkpoints, train log, card.
    manifest = read_json(paths.manifest)
    train = manifest["stages"]["train"]
    assert train["fingerprint"]["LEARNING_RATE"] == 0.004
    for ckpt in paths.checkpoints.glob("checkpoint-*"):
        assert read_json(ckpt / FINGERPRINT)["digest"] == train["digest"]
    assert read_json(paths.train_log)["provenance"]["digest"] == train["digest"]
    card = paths.model_card.read_text()
    assert _card_row(card, "LEARNING_RATE") == "0.004"
    assert train["digest"] in _card_row(card, "training fingerprint (settings, data, base model)")
    assert (run.hub.uploads[0]["copy"] / "README.md").read_text() == card


def test_redo_with_a_new_lora_rank_trains_instead_of_crashing(demo_run_copy, run_job):
    run = demo_run_copy

    result = run_job({**run.env, "REDO": "true", "LORA_R": "16", "EPOCHS": "0.5", "STAGES": "train"}, "run")

    assert result.exit_code == 0, result.output[-3000:]
    assert read_json(run.paths.adapter / "adapter_config.json")["r"] == 16
    assert "resuming from" not in result.output


# --- a stage selection that would publish a card for an adapter these settings did not train -------------------
@pytest.mark.parametrize("redo", ["true", "false"])
def test_evaluate_and_push_after_a_changed_training_setting_is_refused(demo_run_copy, run_job, redo):
    run = demo_run_copy
    before = _stage_times(run.run_dir)
    card = run.paths.model_card.read_text()
    env = {**run.env, "REDO": redo, "LEARNING_RATE": "0.004", "STAGES": "evaluate,benchmark,push"}

    result = run_job(env, "run")

    assert result.exit_code == BAD_CONFIG
    assert "stage 'train' is not selected" in result.message
    assert "LEARNING_RATE" in result.message and "0.004" in result.message
    assert "Add 'train' to STAGES" in result.message and "Traceback" not in result.output
    assert _stage_times(run.run_dir) == before and run.hub.calls == []
    assert run.paths.model_card.read_text() == card


def test_the_card_shows_the_recorded_settings_not_the_current_ones(demo_run):
    cfg = load_settings(demo_run.env, env_file=None)
    manifest = read_json(demo_run.paths.manifest)
    now = with_overrides(cfg, LEARNING_RATE=0.5, LORA_R=64, SEED=7)

    card = report.model_card(now, demo_run.paths, manifest)

    assert _card_row(card, "LEARNING_RATE") == str(float(demo_run.env["LEARNING_RATE"]))
    assert _card_row(card, "LORA_R") == "8" and "Sampled with seed 42 " in card
    assert f"sha256 `{_sha256(FIXTURE)}`" in _card_row(card, "training data")


def test_the_card_leaves_out_a_benchmark_of_an_earlier_adapter(demo_run):
    """Retrained and evaluated, not benchmarked again (STAGES=train,evaluate): the pipeline dropped the benchmark
    record, and the card must not show the file the earlier adapter's benchmark left."""
    cfg = load_settings(demo_run.env, env_file=None)
    manifest = read_json(demo_run.paths.manifest)
    assert "### Medical knowledge benchmark" in report.model_card(cfg, demo_run.paths, manifest)
    manifest["stages"].pop("benchmark")

    assert "### Medical knowledge benchmark" not in report.model_card(cfg, demo_run.paths, manifest)


# --- inputs by content -----------------------------------------------------------------------------------------
def _edit_keeping_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (same length) everywhere, then give the file back its size and modification time."""
    assert len(old) == len(new)
    st = path.stat()
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_an_edited_dataset_file_is_a_changed_input(demo_env, run_job, tmp_path):
    data = tmp_path / "dialogues.jsonl"
    shutil.copy(FIXTURE, data)
    env = demo_env(tmp_path / "outputs", DATASET=str(data), STAGES="sample", BENCHMARK_TASKS="", HUB_REPO_ID="")
    first = run_job(env, "run")
    assert first.exit_code == 0, first.output[-3000:]
    paths = RunPaths(Path(env["OUTPUT_DIR"]) / env["RUN_NAME"])
    rows = paths.train_rows.read_text()

    # A normal edit: same path, other bytes.
    data.write_bytes(data.read_bytes().replace(b" the ", b" thy "))
    refused = run_job(env, "run")
    assert refused.exit_code == BAD_CONFIG
    assert f"input DATASET {data} changed" in refused.message and "REDO=true" in refused.message
    assert paths.train_rows.read_text() == rows  # nothing ran

    redone = run_job({**env, "REDO": "true"}, "run")
    assert redone.exit_code == 0, redone.output[-3000:]
    assert f"REDO: stage sample reruns (input DATASET {data} changed: sha256 {_sha256(FIXTURE)[:12]}" in redone.output
    assert " thy " in paths.train_rows.read_text() and " the " not in paths.train_rows.read_text()
    assert read_json(paths.manifest)["stages"]["sample"]["inputs"]["DATASET"]["sha256"] == _sha256(data)

    # The same edit with the size and modification time put back is found too (the cache's key has the ctime).
    _edit_keeping_size_and_mtime(data, b" thy ", b" the ")
    again = run_job(env, "run")
    assert again.exit_code == BAD_CONFIG and "input DATASET" in again.message

    # An unchanged file is read from the cache, not hashed again (so 257k rows cost nothing on a rerun).
    assert run_job({**env, "REDO": "true"}, "run").exit_code == 0
    cache = read_json(paths.input_hashes)
    assert cache[str(data.absolute())]["sha256"] == _sha256(data)
    stamp = paths.input_hashes.stat().st_mtime_ns
    assert run_job(env, "run").exit_code == 0
    assert paths.input_hashes.stat().st_mtime_ns == stamp


def test_an_edited_benchmark_question_file_refreshes_the_fetched_copy(demo_env, run_job, tmp_path):
    questions = tmp_path / "benchmark"
    shutil.copytree(DEMO["BENCHMARK_DATA"], questions)
    env = demo_env(
        tmp_path / "outputs",
        STAGES="sample",
        BENCHMARK_TASKS="mmlu_anatomy",
        BENCHMARK_DATA=str(questions),
        HUB_REPO_ID="",
    )
    assert run_job(env, "run").exit_code == 0
    paths = RunPaths(Path(env["OUTPUT_DIR"]) / env["RUN_NAME"])
    fetched = paths.benchmark_data / "mmlu_anatomy.jsonl"
    assert "longest in the human body" in fetched.read_text()

    edited = questions / "mmlu_anatomy.jsonl"
    edited.write_text(edited.read_text().replace("longest in the human body", "shortest in the human body"))
    (paths.benchmark_data / "medmcqa.jsonl").write_text("{}\n")  # a stale task's copy from an earlier selection

    refused = run_job(env, "run")
    assert refused.exit_code == BAD_CONFIG
    assert "input BENCHMARK_DATA" in refused.message and "mmlu_anatomy.jsonl" in refused.message

    redone = run_job({**env, "REDO": "true"}, "run")
    assert redone.exit_code == 0, redone.output[-3000:]
    assert "REDO: stage sample reruns (input BENCHMARK_DATA" in redone.output
    assert fetched.read_text() == "".join(json.dumps(r) + "\n" for r in read_jsonl(edited))
    assert sorted(p.name for p in paths.benchmark_data.iterdir()) == ["mmlu_anatomy.jsonl"]


# --- checkpoints resume only under their own fingerprint ------------------------------------------------------
def _checkpoint(folder: Path, step: int, digest: str | None) -> Path:
    import torch
    from safetensors.torch import save_file

    p = folder / f"checkpoint-{step}"
    p.mkdir(parents=True)
    save_file({"lora_A": torch.full((2, 2), float(step))}, str(p / "adapter_model.safetensors"))
    (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"state": {}, "param_groups": []}, p / "optimizer.pt")
    torch.save({"last_epoch": step}, p / "scheduler.pt")
    if digest is not None:
        (p / FINGERPRINT).write_text(json.dumps({"digest": digest}))
    (p / MARKER).write_text(f"step {step}\n")
    return p


def test_a_checkpoint_of_another_fingerprint_is_moved_aside_not_resumed(tmp_path):
    ckpts, stale = tmp_path / "checkpoints", tmp_path / "checkpoints-stale-x"
    _checkpoint(ckpts, 2, "mine")
    _checkpoint(ckpts, 4, "other settings")
    _checkpoint(ckpts, 6, None)  # from a version that wrote no fingerprint
    files = {p.relative_to(ckpts): p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}

    assert resume_point(ckpts, "mine", stale) == ckpts / "checkpoint-2"

    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]
    assert sorted(p.name for p in stale.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    moved = {p.relative_to(stale): p.read_bytes() for p in stale.rglob("*") if p.is_file()}
    assert moved == {k: v for k, v in files.items() if k.parts[0] != "checkpoint-2"}  # whole, not deleted
    assert resume_point(ckpts, "yet another", tmp_path / "checkpoints-stale-y") is None


# --- Hub inputs: pinned once, loaded at that revision ----------------------------------------------------------
def test_hub_inputs_are_pinned_once_and_loaded_at_that_revision(monkeypatch, tiny_model_dir):
    asked = []

    class Hub:
        def __init__(self, token=None):
            pass

        def dataset_info(self, repo_id, **kw):
            asked.append(repo_id)
            return type("Info", (), {"sha": "d" * 40})()

        def model_info(self, repo_id, **kw):
            asked.append(repo_id)
            return type("Info", (), {"sha": "m" * 40})()

    monkeypatch.setattr("huggingface_hub.HfApi", Hub)
    cfg = load_settings({"DATASET": "alice/dialogues", "BASE_MODEL": "alice/base"}, env_file=None)
    pins = provenance.resolve_pins(cfg, None)
    assert {k: (v["id"], v["revision"]) for k, v in pins.items()} == {
        "DATASET": ("alice/dialogues", "d" * 40),
        "BASE_MODEL": ("alice/base", "m" * 40),
    }
    assert provenance.resolve_pins(cfg, pins) == pins and asked == ["alice/dialogues", "alice/base"]  # no new call
    moved = provenance.resolve_pins(with_overrides(cfg, BASE_MODEL="bob/base"), pins)
    assert moved["BASE_MODEL"]["id"] == "bob/base" and moved["DATASET"] == pins["DATASET"]

    import datasets

    from job import model, sample

    loaded = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: loaded.update(kw))
    try:
        provenance.use_pins(pins)
        sample.load_rows(cfg)
        assert loaded["revision"] == "d" * 40
        assert model._revision("alice/base") == {"revision": "m" * 40}
        assert model._revision(str(tiny_model_dir)) == {}  # a local folder has no revision
        fp = provenance.fingerprint(cfg, RunPaths(Path("unused")), "train", None, provenance.Hashes(None))
        assert fp["inputs"]["BASE_MODEL"] == {"id": "alice/base", "revision": "m" * 40}
    finally:
        provenance.use_pins(None)


# --- reading the record ----------------------------------------------------------------------------------------
def test_provenance_command_prints_what_made_each_artifact(demo_run, run_job):
    manifest = read_json(demo_run.paths.manifest)

    text = run_job(demo_run.env, "provenance")
    as_json = run_job({}, "provenance", str(demo_run.run_dir), "--json")

    assert text.exit_code == 0 and as_json.exit_code == 0, text.output[-2000:] + as_json.output[-2000:]
    info = json.loads(as_json.output)
    assert list(info["stages"]) == list(STAGES)
    for stage, rec in manifest["stages"].items():
        assert info["stages"][stage]["digest"] == rec["digest"]
        assert f"fingerprint   {rec['digest']}" in text.output
        assert info["stages"][stage]["code"]["package"] == "0.1.0"
    assert info["stages"]["sample"]["inputs"]["DATASET"]["sha256"] == _sha256(FIXTURE)
    assert f"input         DATASET: {FIXTURE}  sha256 {_sha256(FIXTURE)}" in text.output
    assert "input         BASE_MODEL: " in text.output and "hippocratically 0.1.0" in text.output
    assert all(c["matches_train"] for c in info["checkpoints"]) and info["checkpoints"]
    assert "pinned    nothing" in text.output

    missing = run_job({}, "provenance", str(demo_run.run_dir / "nowhere"))
    assert missing.exit_code == BAD_CONFIG and "nothing has run" in missing.message


def test_a_manifest_from_before_provenance_still_loads(demo_run_copy, run_job):
    run = demo_run_copy
    manifest = read_json(run.paths.manifest)
    for rec in manifest["stages"].values():
        for key in ("inputs", "upstream", "digest", "code", "started_at"):
            rec.pop(key, None)
    manifest.pop("pins", None)
    run.paths.manifest.write_text(json.dumps(manifest))
    run.paths.model_card.unlink()  # rendered again from the old records

    result = run_job(run.env, "run")

    assert result.exit_code == 0, result.output[-3000:]
    assert sum("already done" in line for line in result.output.splitlines()) == len(STAGES)
    assert "stage train was recorded by an older version of the job" in result.output
    assert "not recorded" in _card_row(run.paths.model_card.read_text(), "code that trained it")
    shown = run_job(run.env, "provenance")
    assert shown.exit_code == 0 and "inputs        not recorded" in shown.output
    # REDO treats the unrecorded inputs as changed: the way to bring an old run's records up to date.
    redo = run_job({**run.env, "REDO": "true", "STAGES": "sample"}, "run")
    assert redo.exit_code == 0, redo.output[-3000:]
    assert "REDO: stage sample reruns (its inputs were not recorded" in redo.output
    assert "digest" in read_json(run.paths.manifest)["stages"]["sample"]


def test_the_code_version_is_recorded_without_git_too(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")  # an image without git, or without the repository's .git

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    version = provenance.code_version.__wrapped__()  # the cached value is this process's real one
    assert version["package"] == "0.1.0" and version["commit"] is None
    assert provenance.describe_code(version) == "hippocratically 0.1.0"
