"""The run directory, declared once: every file a run reads or writes, and which stage writes it.

`RUN_DIR = OUTPUT_DIR/RUN_NAME`. Stages, the pipeline, the report and the tests all take their
paths from `RunPaths`; no other module spells a file name inside the run directory. Each file
has exactly one writer (the comment beside it), so a stage's outputs are never overwritten by
another stage and a rerun of one stage cannot corrupt another's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _at(relative: str) -> property:
    """A path inside the run directory, read as `paths.<name>`."""
    return property(lambda self: self.root / relative)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    # --- the pipeline ------------------------------------------------------------------------------
    manifest = _at("manifest.json")  # stage -> status, fingerprint (settings, inputs), code, finished_at; pins
    lock = _at("run.lock")  # which process owns the run directory now (job/lock.py)
    # file -> (size, mtime, ctime, sha256) of each input file hashed (job/provenance.py, written by the pipeline):
    # a cache, so a rerun does not read a large dataset again
    input_hashes = _at("input_hashes.json")
    # --- sample --------------------------------------------------------------------------------------
    data = _at("data")
    train_rows = _at("data/train.jsonl")  # cleaned conversations {description, patient, doctor, source_index}
    eval_rows = _at("data/eval.jsonl")  # the held-out split, same fields
    sample_stats = _at("data/stats.json")  # rows read, dropped by reason, changed by rule, decontamination
    cleaning_examples = _at("data/cleaning_examples.jsonl")  # before/after of a few rows per cleaning rule
    benchmark_data = _at("data/benchmark")  # the benchmark's questions, fetched when that stage is on
    # --- format --------------------------------------------------------------------------------------
    train_tokens = _at("data/train_tokens.jsonl")  # {input_ids, completion_mask} per conversation
    eval_tokens = _at("data/eval_tokens.jsonl")
    format_stats = _at("data/format_stats.json")  # token counts, truncated and dropped replies
    base_model = _at("data/base_model.json")  # a GGUF base: its file, sha256, source model, end-of-turn tokens
    # --- train ---------------------------------------------------------------------------------------
    checkpoints = _at("checkpoints")  # checkpoint-N/ with fingerprint.json, each complete once its marker exists
    adapter = _at("adapter")  # the final LoRA adapter and tokenizer
    train_log = _at("train/log.json")  # derived numbers, metrics, loss history, peak memory
    tensorboard = _at("train/tensorboard")
    # --- evaluate ------------------------------------------------------------------------------------
    eval = _at("eval")
    metrics = _at("eval/metrics.json")  # base vs tuned: loss, ROUGE-L, lengths, safety, judge summary, speed
    samples = _at("eval/samples.jsonl")  # prompt, reference, base, tuned
    safety = _at("eval/safety.jsonl")  # one row per safety prompt and model
    judge = _at("eval/judge.jsonl")  # one verdict per pair and order, appended as it arrives
    # --- benchmark -----------------------------------------------------------------------------------
    benchmark = _at("eval/benchmark.json")  # per task: base/tuned accuracy, paired difference and its 95% interval
    # --- report (rendered once by the pipeline, after the last of evaluate/benchmark that ran) ---------
    report = _at("report")
    model_card = _at("report/README.md")
    loss_plot = _at("report/loss.png")
    # --- push ----------------------------------------------------------------------------------------
    push = _at("push")  # exactly the files uploaded to the Hub

    def stale_checkpoints(self, stamp: str) -> Path:
        """checkpoints-stale-<stamp>/: checkpoints trained under another fingerprint (settings or data), moved
        out of checkpoints/ by the train stage (job/checkpoints.py) starting afresh; never resumed, never deleted."""
        return self.root / f"checkpoints-stale-{stamp}"
