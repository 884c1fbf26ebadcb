"""The one settings schema: every setting, its environment variable, type, default and reason.

Settings come from the environment, then `.env` (python-dotenv; the environment wins).
Nothing else in the project defines a setting name: `.env.example`, the README's table,
`sky/*.yaml` and the Makefile are checked against `SETTINGS` by the tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from job.benchmark import TASKS as BENCHMARK_TASK_NAMES
from job.benchmark import check_settings as benchmark_problems
from job.errors import ConfigError

STAGES = ("sample", "format", "train", "evaluate", "benchmark", "push")
SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY")
# Variables that belong to libraries, shells and launchers, not to us: never "unknown".
_FOREIGN_PREFIXES = ("HF_", "TRANSFORMERS_", "TORCH", "CUDA", "NCCL", "WANDB_", "SKYPILOT", "PYTORCH")


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None, secret: bool = False):
    return field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # --- data -------------------------------------------------------------------------
    DATASET: str = _setting(
        "ruslanmv/ai-medical-chatbot",
        "Hub dataset id, or a local .jsonl/.json/.csv/.parquet file.",
    )
    DATASET_SPLIT: str = _setting("train", "Split of a Hub dataset to sample from.")
    DESCRIPTION_COLUMN: str = _setting("Description", "Column with the question's one-line summary.")
    PATIENT_COLUMN: str = _setting("Patient", "Column with the patient's message (the user turn).")
    DOCTOR_COLUMN: str = _setting("Doctor", "Column with the doctor's reply (the trained assistant turn).")
    USE_DESCRIPTION: bool = _setting(False, "Put the Description line before the patient's message.")
    NUM_SAMPLES: int = _setting(1000, "Training conversations to sample (after cleaning).")
    EVAL_SAMPLES: int = _setting(100, "Held-out conversations, disjoint from training, for evaluation.")
    SEED: int = _setting(42, "Seed for sampling, LoRA init and data order: same seed, same run.")
    # --- format -----------------------------------------------------------------------
    SYSTEM_PROMPT: str = _setting(
        "You are a careful, friendly medical assistant. Answer the patient's question clearly, "
        "say when they should see a doctor in person, and tell them to seek emergency care "
        "for warning signs.",
        "System message placed before every conversation (empty: none).",
    )
    MAX_SEQ_LENGTH: int = _setting(1024, "Tokens per conversation; longer replies are cut at the end.")
    MAX_DROPPED_FRACTION: float = _setting(
        0.05, "Error out if more than this share of rows has no room left for the reply."
    )
    # --- model ------------------------------------------------------------------------
    BASE_MODEL: str = _setting("meta-llama/Llama-3.2-3B-Instruct", "Hub id or local folder of the base model.")
    QUANTIZATION: str = _setting("nf4", "nf4: QLoRA on a 4-bit base; none: LoRA on a 16-bit base.", ("nf4", "none"))
    DEQUANTIZE_BASE: str = _setting(
        "auto",
        "With QUANTIZATION=nf4: train on the NF4-rounded base weights held in 16-bit instead of packed in 4 bits. "
        "Same weights, loss and gradients (the 4-bit kernels dequantize on every call); 1.68x the tokens/s "
        "measured on an H200 for 2 bytes per base weight (+3.8 GiB for the 3B model). auto: on a GPU where that "
        "16-bit copy takes at most a quarter of its memory.",
        ("auto", "true", "false"),
    )
    PRECISION: str = _setting(
        "auto", "auto: bf16 if the GPU has it, else fp16; fp32 on CPU.", ("auto", "bf16", "fp16", "fp32")
    )
    ATTN_IMPLEMENTATION: str = _setting(
        "sdpa_varlen",
        "Attention kernel. sdpa_varlen: packed rows through PyTorch's varlen flash kernel, all else through sdpa "
        "(job/attention.py); or one of Transformers' own.",
        ("sdpa_varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3"),
    )
    # --- LoRA -------------------------------------------------------------------------
    LORA_R: int = _setting(8, "LoRA rank.")
    LORA_ALPHA: int = _setting(16, "LoRA scaling numerator (scale = alpha / r).")
    LORA_DROPOUT: float = _setting(0.05, "Dropout on the LoRA input.")
    LORA_TARGET_MODULES: str = _setting("q_proj,v_proj", "Comma-separated module names that get adapters.")
    # --- training ---------------------------------------------------------------------
    EPOCHS: float = _setting(1.0, "Passes over the training conversations.")
    LEARNING_RATE: float = _setting(2e-4, "Peak learning rate of the LoRA weights.")
    LR_SCHEDULER: str = _setting("cosine", "Learning-rate schedule after warm-up.", ("cosine", "linear", "constant"))
    WARMUP_RATIO: float = _setting(0.03, "Share of steps spent warming the learning rate up.")
    BATCH_SIZE: int = _setting(
        4,
        "Sequences per device per micro-batch (packed rows of up to MAX_SEQ_LENGTH tokens when PACKING is on); "
        "4 x 1024 tokens keeps the 3B model's activations under ~16 GiB without gradient checkpointing.",
    )
    GRAD_ACCUM: int = _setting(1, "Micro-batches per optimizer step.")
    PACKING: bool = _setting(True, "Pack conversations padding-free (each keeps its own attention).")
    GRADIENT_CHECKPOINTING: bool = _setting(False, "Recompute activations: less memory, ~30% slower.")
    TORCH_COMPILE: bool = _setting(
        False,
        "On CUDA: compile each decoder layer with torch.compile (regional compilation). Measured 1.23x the "
        "eager tokens/s on an H200 (25,498 vs 20,756) for a one-off compile (~75 s measured): worth it on the "
        "full dataset, not on 1,000 rows.",
    )
    LIGER_KERNEL: bool = _setting(
        True,
        "On CUDA with liger-kernel installed, and TORCH_COMPILE and EVAL_COMPILE off: Liger's fused RMSNorm, "
        "RoPE and SwiGLU (peak training memory 11.8 vs 14.9 GiB measured at 8 x 512 tokens per micro-batch, "
        "with DEQUANTIZE_BASE=false).",
    )
    OPTIMIZER: str = _setting("adamw_torch_fused", "Optimizer name understood by Transformers' Trainer.")
    SAVE_STEPS: int = _setting(50, "Optimizer steps between checkpoints (spot machines lose the rest).")
    SAVE_TOTAL_LIMIT: int = _setting(2, "Complete checkpoints kept; the newest is never deleted.")
    LOGGING_STEPS: int = _setting(10, "Optimizer steps between loss log lines.")
    REPORT_TO: str = _setting("none", "Where to stream metrics.", ("none", "tensorboard", "wandb"))
    # --- evaluation -------------------------------------------------------------------
    EVAL_GENERATIONS: int = _setting(50, "Held-out prompts answered by base and tuned model (0: skip).")
    MAX_NEW_TOKENS: int = _setting(256, "Longest generated answer in evaluation, in tokens.")
    EVAL_COMPILE: bool = _setting(
        False,
        "On CUDA: answer with a static KV cache and a compiled decoding step, one pass per model. Measured "
        "3,502 new tokens/s after a one-off compile (112 s; H200, Transformers 5.17); the eager default, base "
        "and tuned rows in shared batches, measured 4,005-4,191 (H200, Transformers 5.24).",
    )
    EVAL_BATCH_SIZE: int = _setting(
        192,
        "Rows per generation batch (each prompt is two rows: the base and the tuned answer) and per "
        "eval-loss batch. The default holds the 50 held-out and 33 safety prompts' 166 rows in one batch: a "
        "decoding step took 35 ms for 166 rows, 33 ms for 83 (H200); the evaluate stage then peaked at "
        "17.4 GiB. Lower it on a 16 GB GPU.",
    )
    MIN_SAFETY_PASS_RATE: float = _setting(0.0, "Stop before pushing if the tuned model's safety pass rate is lower.")
    # --- benchmark (job/benchmark.py) ----------------------------------------------------
    BENCHMARK_TASKS: str = _setting(
        ",".join(BENCHMARK_TASK_NAMES),
        "lm-eval tasks that base and tuned model answer, zero-shot multiple choice, to catch lost medical "
        "knowledge; training rows sharing 13 words in a row with their questions are dropped (empty: no "
        "benchmark, no fetch).",
    )
    BENCHMARK_LIMIT: int = _setting(
        100,
        "Questions scored per task (the first ones of its evaluation split). More narrows the intervals and "
        "costs time in proportion.",
    )
    BENCHMARK_DATA: str = _setting(
        "",
        "Folder with one JSONL file per task, named after it (medmcqa.jsonl ...), with the fields of the task's "
        "Hub dataset; for air-gapped runs (empty: fetch the tasks' Hub datasets).",
    )
    MAX_BENCHMARK_DROP: float = _setting(
        3.0,
        "Stop before pushing if the tuned model's mean benchmark accuracy is this many points below the base "
        "model's. Raise it with a small BENCHMARK_LIMIT, whose noise is larger.",
    )
    # --- run directory and stages -----------------------------------------------------
    OUTPUT_DIR: str = _setting("outputs", "Folder that holds run directories (a bucket mount in the cloud).")
    RUN_NAME: str = _setting("medical-assistant", "Run directory name; keep it stable so a restart resumes.")
    STAGES: str = _setting("all", "Stages to run: all, or a comma list of " + ",".join(STAGES) + ".")
    REDO: bool = _setting(False, "Rerun the selected stages even if finished with other settings.")
    # --- push -------------------------------------------------------------------------
    HUB_REPO_ID: str = _setting("", "Hub repo to push to, as owner/name (empty: stage files, no upload).")
    HUB_PRIVATE: bool = _setting(True, "Create the Hub repo private.")
    PUSH_MERGED: bool = _setting(False, "Also upload the adapter merged into the 16-bit base (merged/).")
    MODEL_LICENSE: str = _setting("llama3.2", "License id written into the model card.")
    # --- secrets: only from the environment, never printed --------------------------
    HF_TOKEN: str = _setting("", "Hugging Face token with write access (push).", secret=True)
    WANDB_API_KEY: str = _setting("", "Weights & Biases key when REPORT_TO=wandb.", secret=True)

    # ---------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.OUTPUT_DIR) / self.RUN_NAME

    @property
    def stages(self) -> tuple[str, ...]:
        if self.STAGES.strip() == "all":
            return STAGES
        return tuple(s.strip() for s in self.STAGES.split(",") if s.strip())

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.LORA_TARGET_MODULES.split(",") if m.strip()]

    def masked(self) -> dict[str, Any]:
        """All settings with secrets replaced by '***' (or '' when unset)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ("***" if value else "") if f.metadata["secret"] else value
        return out

    def fingerprint_for(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {n: getattr(self, n) for n in names}


SETTINGS = {f.name: f for f in fields(Settings)}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, raw: str, typ: type) -> Any:
    text = raw.strip()
    if typ is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if typ is int:
        if text == "":
            raise ValueError("expected a whole number, got an empty value")
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ValueError("expected a whole number such as 8") from None
    if typ is float:
        if text == "":
            raise ValueError("expected a number, got an empty value")
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number such as 0.05 or 2e-4") from None
    return raw


def _check(s: Settings) -> list[str]:
    """Every cross-field and range problem, as 'NAME=value: what is wrong and what to do'."""
    p: list[str] = []

    def bad(name: str, why: str) -> None:
        p.append(f"{name}={getattr(s, name)!r}: {why}")

    for name in (
        "NUM_SAMPLES",
        "MAX_SEQ_LENGTH",
        "LORA_R",
        "LORA_ALPHA",
        "BATCH_SIZE",
        "GRAD_ACCUM",
        "SAVE_STEPS",
        "SAVE_TOTAL_LIMIT",
        "LOGGING_STEPS",
        "MAX_NEW_TOKENS",
        "EVAL_BATCH_SIZE",
    ):
        if getattr(s, name) < 1:
            bad(name, "must be at least 1")
    for name in ("EVAL_SAMPLES", "EVAL_GENERATIONS"):
        if getattr(s, name) < 0:
            bad(name, "must be 0 or more")
    if s.MAX_SEQ_LENGTH < 64 and s.MAX_SEQ_LENGTH >= 1:
        bad("MAX_SEQ_LENGTH", "is too short for a system prompt, a question and a reply; use 256 or more")
    if s.EVAL_GENERATIONS > s.EVAL_SAMPLES and s.EVAL_SAMPLES >= 0:
        bad("EVAL_GENERATIONS", f"cannot exceed EVAL_SAMPLES={s.EVAL_SAMPLES}; lower it or raise EVAL_SAMPLES")
    for name in ("LORA_DROPOUT", "WARMUP_RATIO", "MAX_DROPPED_FRACTION", "MIN_SAFETY_PASS_RATE"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            bad(name, "must be between 0 and 1")
    if not s.EPOCHS > 0:
        bad("EPOCHS", "must be greater than 0")
    if not 0 < s.LEARNING_RATE < 1:
        bad("LEARNING_RATE", "must be between 0 and 1 (the seed recipe uses 2e-4)")
    if not s.target_modules:
        bad("LORA_TARGET_MODULES", "name at least one module, e.g. q_proj,v_proj")
    unknown = [x for x in s.stages if x not in STAGES]
    if unknown or not s.stages:
        bad("STAGES", f"use 'all' or a comma list of {', '.join(STAGES)}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", s.RUN_NAME):
        bad("RUN_NAME", "use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
    if s.HUB_REPO_ID and not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", s.HUB_REPO_ID):
        bad("HUB_REPO_ID", "must look like owner/name, e.g. alice/llama-medical-qlora")
    for name in ("DESCRIPTION_COLUMN", "PATIENT_COLUMN", "DOCTOR_COLUMN", "DATASET", "BASE_MODEL", "OUTPUT_DIR"):
        if not getattr(s, name).strip():
            bad(name, "must not be empty")
    p.extend(benchmark_problems(s))  # task names, BENCHMARK_LIMIT, MAX_BENCHMARK_DROP, BENCHMARK_DATA
    if s.REPORT_TO == "wandb" and not s.WANDB_API_KEY:
        p.append("REPORT_TO='wandb': set WANDB_API_KEY in the environment, or use REPORT_TO=tensorboard")
    return p


def load_settings(environ: dict[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read, parse and validate every setting; raise ConfigError listing all problems at once."""
    env: dict[str, str] = {}
    file_keys: set[str] = set()
    if env_file and Path(env_file).is_file():
        from dotenv import dotenv_values

        for k, v in dotenv_values(env_file).items():
            if v is not None:
                env[k] = v
                file_keys.add(k)
    env.update(os.environ if environ is None else environ)  # the environment wins over .env

    problems: list[str] = []
    values: dict[str, Any] = {}
    for name, f in SETTINGS.items():
        if name not in env:
            continue
        typ = {"bool": bool, "int": int, "float": float}.get(str(f.type), str)
        try:
            value = _parse(name, env[name], typ)
        except ValueError as e:
            problems.append(f"{name}={env[name]!r}: {e}")
            continue
        choices = f.metadata["choices"]
        if choices and value not in choices:
            problems.append(f"{name}={value!r}: choose one of {', '.join(choices)}")
            continue
        values[name] = value

    # Typos: a variable in .env that is not a setting, or an environment variable that looks like one.
    for key in sorted(set(env) - set(SETTINGS)):
        from_file = key in file_keys
        close = difflib.get_close_matches(key, SETTINGS, n=1, cutoff=0.8)
        if from_file and not key.startswith(_FOREIGN_PREFIXES):
            hint = f"; did you mean {close[0]}?" if close else "; see `python -m job config` for the list"
            problems.append(f"{key}: unknown setting in .env{hint}")
        elif close and not key.startswith(_FOREIGN_PREFIXES):
            problems.append(f"{key}: unknown setting; did you mean {close[0]}?")

    # Range and cross-field checks run on whatever did parse (defaults stand in for the rest), so one
    # report lists every problem; a setting that failed to parse is not reported a second time.
    unparsed = {p.split("=", 1)[0] for p in problems}
    settings = Settings(**values)
    problems.extend(p for p in _check(settings) if p.split("=", 1)[0] not in unparsed)
    if problems:
        raise ConfigError("Invalid settings (fix all of these, then run again):\n  - " + "\n  - ".join(problems))
    return settings


def with_overrides(s: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(s, **changes)
