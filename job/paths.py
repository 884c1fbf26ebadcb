"""The run directory, declared once: every file a run reads or writes, and which stage writes it.

`RUN_DIR = OUTPUT_DIR/RUN_NAME`. Stages, the pipeline, the report and the tests all take their
paths from `RunPaths`; no other module spells a file name inside the run directory. Each file
has exactly one writer (the comment beside it), so a stage's outputs are never overwritten by
another stage and a rerun of one stage cannot corrupt another's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    # --- the pipeline ------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:  # stage -> status, settings fingerprint, finished_at, versions
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:  # which process owns the run directory now (job/lock.py)
        return self.root / "run.lock"

    # --- sample --------------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_rows(self) -> Path:  # cleaned conversations {description, patient, doctor, source_index}
        return self.data / "train.jsonl"

    @property
    def eval_rows(self) -> Path:  # the held-out split, same fields
        return self.data / "eval.jsonl"

    @property
    def sample_stats(self) -> Path:  # rows read, dropped by reason, changed by rule, decontamination
        return self.data / "stats.json"

    @property
    def cleaning_examples(self) -> Path:  # before/after of a few rows per cleaning rule
        return self.data / "cleaning_examples.jsonl"

    @property
    def benchmark_data(self) -> Path:  # the benchmark's questions, fetched when that stage is on
        return self.data / "benchmark"

    # --- format --------------------------------------------------------------------------------------
    @property
    def train_tokens(self) -> Path:  # {input_ids, completion_mask} per conversation
        return self.data / "train_tokens.jsonl"

    @property
    def eval_tokens(self) -> Path:
        return self.data / "eval_tokens.jsonl"

    @property
    def format_stats(self) -> Path:  # token counts, truncated and dropped replies
        return self.data / "format_stats.json"

    # --- train ---------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:  # checkpoint-N/, each complete once its marker exists
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:  # the final LoRA adapter and tokenizer
        return self.root / "adapter"

    @property
    def train_log(self) -> Path:  # derived numbers, metrics, loss history, peak memory
        return self.root / "train" / "log.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "train" / "tensorboard"

    # --- evaluate ------------------------------------------------------------------------------------
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:  # base vs tuned: loss, ROUGE-L, lengths, safety, judge summary, speed
        return self.eval / "metrics.json"

    @property
    def samples(self) -> Path:  # prompt, reference, base, tuned
        return self.eval / "samples.jsonl"

    @property
    def safety(self) -> Path:  # one row per safety prompt and model
        return self.eval / "safety.jsonl"

    @property
    def judge(self) -> Path:  # one verdict per pair and order, appended as it arrives
        return self.eval / "judge.jsonl"

    # --- benchmark -----------------------------------------------------------------------------------
    @property
    def benchmark(self) -> Path:  # per task: base/tuned accuracy, paired difference and its 95% interval
        return self.eval / "benchmark.json"

    # --- report (rendered by the pipeline before push) -----------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def model_card(self) -> Path:
        return self.report / "README.md"

    @property
    def loss_plot(self) -> Path:
        return self.report / "loss.png"

    # --- push ----------------------------------------------------------------------------------------
    @property
    def push(self) -> Path:  # exactly the files uploaded to the Hub
        return self.root / "push"
