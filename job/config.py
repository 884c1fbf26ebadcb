"""The one settings schema: every setting, its environment variable, type, default and reason.

Settings come from the environment, then `.env` (python-dotenv; the environment wins).
Nothing else in the project defines a setting name: `.env.example`, the README's table,
`sky/*.yaml` and the Makefile are checked against `SETTINGS` by the tests.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import functools
import importlib.util
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from job import benchmark_tasks, formats, mixture
from job.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("sample", "format", "train", "evaluate", "benchmark", "push")
BENCHMARK_TASK_NAMES = tuple(benchmark_tasks.TASKS)  # lm-eval's names; job/benchmark_tasks/ lists the tasks
# Chat templates shipped with the job (job/templates/chat/<name>.jinja), for CHAT_TEMPLATE.
CHAT_TEMPLATE_NAMES = ("gemma", "llama3", "chatml")
MAX_WORKERS = 1024  # WORKERS above this is a typo, not a machine: each worker is a process with its own memory
SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY", "JUDGE_API_KEY")
# URLs that may carry user:password@ or a key in the query: shown and recorded without them (job/redact.py).
URL_NAMES = ("JUDGE_BASE_URL",)
# Names, endpoints and keys: surrounding spaces are never meant ("  " would pass as a model name, a key pasted
# with its newline would be refused), so they are stripped when read.
STRIPPED_NAMES = ("JUDGE_MODEL", "JUDGE_BASE_URL", "HUB_REPO_ID", *SECRET_NAMES)
# Variables that belong to libraries, shells and launchers, not to us: never "unknown".
_FOREIGN_PREFIXES = ("HF_", "TRANSFORMERS_", "TORCH", "CUDA", "NCCL", "WANDB_", "SKYPILOT", "PYTORCH")
# Settings that existed once: a .env that still sets one gets told what happened instead of "unknown".
_RETIRED = {
    "EVAL_GENERATIONS": "renamed EVAL_PROMPTS",
    "EVAL_COMPILE": "removed: the compiled decoding path was slower than the default; delete the line",
}

# Upper bounds of the whole-number settings: far above any real use, far below where a library fails (numpy,
# torch and lm-eval take counts as 64-bit integers, so 2**63 questions passed the checks and crashed after training).
COUNT_MAX = 10**9  # rows, questions, prompts, steps: the default dataset has 257k rows
TOKENS_MAX = 2**20  # tokens in a sequence or an answer: above every context window of the models in reach (128k)
WIDTH_MAX = 2**16  # ranks, sequences per batch, micro-batches per step: above every model width and GPU's memory


def _setting(
    default: Any,
    help: str,
    stage: str,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    output: bool = True,
    also: tuple[str, ...] = (),
    bounds: tuple[float, float] | None = None,
    unit: str = "",
    check: Callable[[Any], str | None] | None = None,
):
    """One setting. `stage` is the stage that reads it; `output=False` marks settings that change only
    speed, memory or logging, never what a stage writes (changing them never invalidates finished work);
    `also` names further stages whose output it changes; `bounds` holds a number's least and greatest value,
    whose message names `unit`; `check(value)` says what is wrong with a value within bounds, or None."""
    return field(
        default=default,
        metadata={"help": help, "choices": choices, "secret": secret, "stage": stage, "output": output, "also": also}
        | dict(zip(("min", "max"), bounds or (None, None)), unit=unit, check=check),
    )


def _must(ok: Callable[[Any], Any], why: str) -> Callable[[Any], str | None]:
    """A setting's check: `why` when `ok(value)` is false."""
    return lambda value: None if ok(value) else why


ALL_LINEAR = "all-linear"
AUTO_TARGETS = "auto"


def _targets_problem(value: str) -> str | None:
    """What is wrong with LORA_TARGET_MODULES as text (job/model.py lora_targets checks the names on the base)."""
    names = _names(value)
    if not names:
        return "name at least one module, e.g. q_proj,v_proj, or auto, or all-linear"
    if len(names) > 1 and (alone := {AUTO_TARGETS, ALL_LINEAR} & set(names)):
        return f"{alone.pop()} stands alone: give it by itself, or list module names only"
    return None


def _names(text: str) -> list[str]:
    """The names of a comma list, spaces and empty entries dropped."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _stages(text: str) -> tuple[str, ...]:
    return STAGES if text.strip() == "all" else tuple(_names(text))


def _is_date(text: str) -> bool:
    """The format Llama 3.x's template writes ("%d %b %Y"), in English month names."""
    try:
        return bool(re.fullmatch(r"\d{2} [A-Z][a-z]{2} \d{4}", text) and datetime.datetime.strptime(text, "%d %b %Y"))
    except ValueError:
        return False


def _optimizer(name: str) -> str | None:
    names = _optimizer_names()
    if not names or name in names:
        return None
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}?" if close else "see transformers.training_args.OptimizerNames"
    return f"not an optimizer of Transformers' Trainer; {hint}"


def _benchmark_tasks(text: str) -> str | None:
    if unknown := ", ".join(t for t in _names(text) if t not in BENCHMARK_TASK_NAMES):
        names = ", ".join(BENCHMARK_TASK_NAMES)
        return f"unknown task(s) {unknown}; use a comma list of {names}, or leave it empty to skip the benchmark"
    return None


_NOT_EMPTY = _must(str.strip, "must not be empty")
_SECONDS = _must(lambda v: v > 0, "must be more than 0 seconds")


@dataclass(frozen=True)
class Settings:
    # --- data (sample stage) ---------------------------------------------------------------
    DATASET: str = _setting(
        "ruslanmv/ai-medical-chatbot",
        "Hub dataset id, or a local .jsonl/.json/.csv/.parquet file; or a mixture, source:weight,source:weight, or "
        "a mixture file (.yaml) that gives each source its own format and columns (README, Your data).",
        "sample",
        check=lambda v: _NOT_EMPTY(v) or mixture.problem(v),
    )
    DATASET_SPLIT: str = _setting("train", "Split of a Hub dataset to sample from.", "sample")
    DATA_FORMAT: str = _setting(
        "auto",
        "How DATASET's rows hold conversations (README, Your data): columns (DESCRIPTION/PATIENT/DOCTOR_COLUMN), "
        "messages (OpenAI), sharegpt, alpaca. auto: told by the fields of the first rows, and logged.",
        "sample",
        ("auto", *formats.FORMATS),
    )
    DESCRIPTION_COLUMN: str = _setting(
        "Description", "Column with the question's one-line summary (DATA_FORMAT=columns).", "sample", check=_NOT_EMPTY
    )
    PATIENT_COLUMN: str = _setting(
        "Patient", "Column with the patient's message, the user turn (DATA_FORMAT=columns).", "sample", check=_NOT_EMPTY
    )
    DOCTOR_COLUMN: str = _setting(
        "Doctor", "Column with the doctor's reply, the trained turn (DATA_FORMAT=columns).", "sample", check=_NOT_EMPTY
    )
    NUM_SAMPLES: int = _setting(
        1000, "Training conversations to sample (after cleaning).", "sample", bounds=(1, COUNT_MAX)
    )
    EVAL_SAMPLES: int = _setting(
        100, "Held-out conversations, disjoint from training, for evaluation.", "sample", bounds=(0, COUNT_MAX)
    )
    SEED: int = _setting(
        42,
        "Seed for sampling, LoRA init and data order (0 to 4294967295): same seed, same run.",
        "sample",
        bounds=(0, 2**32 - 1),  # numpy's and torch's seeds are unsigned 32-bit
    )
    # --- format ------------------------------------------------------------------------------
    SYSTEM_PROMPT: str = _setting(
        "You are a careful, friendly medical assistant. Answer the patient's question clearly, "
        "say when they should see a doctor in person, and tell them to seek emergency care "
        "for warning signs.",
        "System message placed before every conversation that has none of its own in the data (empty: none).",
        "format",
    )
    TEMPLATE_DATE: str = _setting(
        "26 Jul 2024",
        "Date the chat template writes into its system header (Llama 3.x writes today's date otherwise, so the "
        "same run's tokens would change from day to day), as DD Mon YYYY. The default is Llama's own fallback.",
        "format",
        check=_must(_is_date, "must be a date written as DD Mon YYYY, e.g. 26 Jul 2024"),
    )
    USE_DESCRIPTION: bool = _setting(
        False, "Put the Description line before the patient's message (DATA_FORMAT=columns).", "format"
    )
    MAX_SEQ_LENGTH: int = _setting(
        1024,
        "Tokens per conversation; longer replies are cut at the end.",
        "format",
        bounds=(1, TOKENS_MAX),
        check=_must(lambda v: v >= 64, "is too short for a system prompt, a question and a reply; use 256 or more"),
    )
    MAX_DROPPED_FRACTION: float = _setting(
        0.05, "Error out if more than this share of rows has no room left for the reply.", "format", bounds=(0, 1)
    )
    # --- model -------------------------------------------------------------------------------
    BASE_MODEL: str = _setting(
        "meta-llama/Llama-3.2-3B-Instruct",
        "Hub id or local folder of the base model, or a local .gguf file (loaded dequantized, then trained like any "
        "other base).",
        "format",
        check=_NOT_EMPTY,
    )
    GGUF_FILE: str = _setting(
        "",
        "File name of a .gguf inside the BASE_MODEL Hub repo or folder, to train on that GGUF file (empty: "
        "BASE_MODEL is a Transformers model, or itself a .gguf file).",
        "format",
        check=_must(
            lambda v: not v.strip() or _gguf(v),
            "must name a .gguf file, e.g. gemma-3-270m-q4_k_m.gguf (or leave it empty)",
        ),
    )
    CHAT_TEMPLATE: str = _setting(
        "",
        "Chat template for bases that have none, or to replace the base's own: gemma, llama3, chatml "
        "(job/templates/chat/), or the path of a Jinja file (empty: the base model's own template).",
        "format",
        check=_must(
            lambda v: not v.strip() or v.strip() in CHAT_TEMPLATE_NAMES or Path(v.strip()).expanduser().is_file(),
            f"neither one of {', '.join(CHAT_TEMPLATE_NAMES)} nor an existing file; give a template's name, "
            "the path of a Jinja file, or leave it empty for the base model's own template",
        ),
    )
    QUANTIZATION: str = _setting(
        "nf4", "nf4: QLoRA on a 4-bit base; none: LoRA on a 16-bit base.", "train", ("nf4", "none")
    )
    DEQUANTIZE_BASE: str = _setting(
        "auto",
        "With QUANTIZATION=nf4: train on the NF4-rounded base weights held in 16-bit instead of packed in 4 bits "
        "(same weights, loss and gradients; faster, 2 bytes per base weight). auto: on a GPU where that copy takes "
        "at most a quarter of the memory this process may use (the card's, or its set_per_process_memory_fraction "
        "share), and the log says why; false on a small GPU. Where the base stays in 4 bits on a GPU, each "
        "micro-batch is also split, GRAD_ACCUM multiplied alike (the same sequences per optimizer step): in two, "
        "or further until its estimated activations fit the memory left, with GRADIENT_CHECKPOINTING turned on "
        "where one sequence's would not; the log gives the estimate.",
        "train",
        ("auto", "true", "false"),
        output=False,
    )
    PRECISION: str = _setting(
        "auto",
        "auto: bf16 if the GPU has it, else fp16; fp32 on CPU.",
        "train",
        ("auto", "bf16", "fp16", "fp32"),
        output=False,
    )
    ATTN_IMPLEMENTATION: str = _setting(
        "sdpa_varlen",
        "Attention kernel. sdpa_varlen: packed rows through PyTorch's varlen flash kernel, all else through sdpa "
        "(job/attention.py; a model that caps its attention logits, Gemma 2, gets its own eager attention on each "
        "conversation of a packed row: eager_varlen); or one of Transformers' own.",
        "train",
        ("sdpa_varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3"),
        output=False,
    )
    # --- LoRA --------------------------------------------------------------------------------
    LORA_R: int = _setting(8, "LoRA rank.", "train", bounds=(1, WIDTH_MAX))
    LORA_ALPHA: int = _setting(16, "LoRA scaling numerator (scale = alpha / r).", "train", bounds=(1, WIDTH_MAX))
    LORA_DROPOUT: float = _setting(0.05, "Dropout on the LoRA input.", "train", bounds=(0, 1))
    LORA_TARGET_MODULES: str = _setting(
        AUTO_TARGETS,
        "Modules that get adapters. auto: q_proj,v_proj (Llama, Qwen, Mistral, Gemma), or qkv_proj where the base "
        "fuses its attention projections (Phi-3); or comma-separated module names; or all-linear: every linear "
        "layer but the output one (PEFT's choice). The card names the modules used.",
        "train",
        check=_targets_problem,
    )
    TRAIN_TURN_TOKENS: str = _setting(
        "auto",
        "Also train the embedding rows of the chat template's turn tokens (e.g. Gemma's <start_of_turn>, "
        "<end_of_turn>; PEFT's trainable tokens, a few vectors in the adapter). A base model that never learned "
        "its template's end of turn gives it near-zero probability, which LoRA on the attention cannot raise, so "
        "its answers never stop. auto: on when the base gives the end-of-turn token a mean probability below "
        "0.05 where the first training replies end (measured at the start of training).",
        "train",
        ("auto", "true", "false"),
    )
    # --- training ----------------------------------------------------------------------------
    EPOCHS: float = _setting(  # the check also rules out inf and nan, which fail only after the model has loaded
        1.0,
        "Passes over the training conversations.",
        "train",
        check=_must(lambda v: 0 < v <= 1000, "must be greater than 0 and at most 1000"),
    )
    LEARNING_RATE: float = _setting(
        2e-4,
        "Peak learning rate of the LoRA weights.",
        "train",
        check=_must(lambda v: 0 < v < 1, "must be between 0 and 1 (the seed recipe uses 2e-4)"),
    )
    LR_SCHEDULER: str = _setting(
        "cosine", "Learning-rate schedule after warm-up.", "train", ("cosine", "linear", "constant")
    )
    WARMUP_RATIO: float = _setting(  # Transformers reads a warm-up value of 1 or more as a step count, not a share
        0.03,
        "Share of steps spent warming the learning rate up (0 to <1).",
        "train",
        check=_must(lambda v: 0 <= v < 1, "must be at least 0 and less than 1 (a share of the optimizer steps)"),
    )
    # 1 packed row of 1,024 tokens holds about 4 conversations, as many as an unpacked step of 4: at 4 packed rows
    # (~16 conversations) one epoch took a quarter of the optimizer steps and its adapter reached ~80% of the
    # unpacked path's held-out improvement on a real model; at 1 it reached 101% (README, "Same model").
    BATCH_SIZE: int = _setting(
        1,
        "Sequences per device per micro-batch (packed rows of up to MAX_SEQ_LENGTH tokens when PACKING is on; one "
        "row of 1,024 tokens holds about 4 conversations). More per step means fewer optimizer steps per epoch, "
        "which at the same LEARNING_RATE trains less. Lower it (and raise GRAD_ACCUM) if training runs out of GPU "
        "memory.",
        "train",
        bounds=(1, WIDTH_MAX),
    )
    GRAD_ACCUM: int = _setting(1, "Micro-batches per optimizer step.", "train", bounds=(1, WIDTH_MAX))
    PACKING: bool = _setting(True, "Pack conversations padding-free (each keeps its own attention).", "train")
    GRADIENT_CHECKPOINTING: bool = _setting(
        False, "Recompute activations in the backward pass: less memory, slower.", "train", output=False
    )
    TORCH_COMPILE: str = _setting(
        "auto",
        "On CUDA: compile each decoder layer with torch.compile, a one-off compile in the first step for faster "
        "steps after it. auto: only when training has enough optimizer steps to repay it "
        "(job/speedups/torch_compile.py, COMPILE_AFTER_STEPS: large datasets, not 1,000 rows) and the base is held "
        "in 16-bit (compiling the 4-bit kernels' step makes it slower).",
        "train",
        ("auto", "true", "false"),
        output=False,
    )
    LIGER_KERNEL: bool = _setting(
        True,
        "On CUDA with liger-kernel installed, when not compiling: Liger's fused RMSNorm, RoPE and SwiGLU in "
        "training (less memory).",
        "train",
        output=False,
    )
    CUDA_GRAPHS: bool = _setting(
        True,
        "On an Ampere or newer GPU (each DDP rank too), with PACKING and ATTN_IMPLEMENTATION=sdpa_varlen, not "
        "compiling and without gradient checkpointing: replay each decoder layer's forward and backward as a CUDA "
        "graph (job/speedups/cuda_graphs.py). Packed micro-batches are padded to BATCH_SIZE x MAX_SEQ_LENGTH "
        "tokens; the loss and gradients do not change.",
        "train",
        output=False,
    )
    OPTIMIZER: str = _setting(
        "adamw_torch_fused", "Optimizer name understood by Transformers' Trainer.", "train", check=_optimizer
    )
    SAVE_STEPS: int = _setting(
        50,
        "Optimizer steps between checkpoints (a SIGKILL loses at most this many).",
        "train",
        output=False,
        bounds=(1, COUNT_MAX),
    )
    SAVE_TOTAL_LIMIT: int = _setting(
        2, "Complete checkpoints kept; the newest is never deleted.", "train", output=False, bounds=(1, COUNT_MAX)
    )
    LOGGING_STEPS: int = _setting(
        10, "Optimizer steps between loss log lines.", "train", output=False, bounds=(1, COUNT_MAX)
    )
    REPORT_TO: str = _setting(
        "none",
        "Where to stream metrics (wandb needs `pip install wandb`; it is not in the image).",
        "train",
        ("none", "tensorboard", "wandb"),
        output=False,
        check=_must(
            lambda v: v != "wandb" or importlib.util.find_spec("wandb"),
            "the wandb package is not installed here (`pip install wandb`), or use tensorboard",
        ),
    )
    # --- evaluation --------------------------------------------------------------------------
    EVAL_PROMPTS: int = _setting(
        50, "Held-out prompts answered by the base and the tuned model (0: none).", "evaluate", bounds=(0, COUNT_MAX)
    )
    MAX_NEW_TOKENS: int = _setting(
        256, "Longest generated answer in evaluation, in tokens.", "evaluate", bounds=(1, TOKENS_MAX)
    )
    REPETITION_PENALTY: float = _setting(
        1.0,
        "Greedy answers (evaluation, chat) with every token already in the conversation made less likely: its "
        "score divided by this where positive, multiplied where negative (Transformers' repetition_penalty). "
        "1.0: plain greedy. On Gemma 3 270M tuned by the job, 1.15 let 79-96% of greedy answers end, against 17-29% "
        "without (README, Same model?); it also discourages repeating the patient's own words, such as a drug's "
        "name.",
        "evaluate",
        bounds=(1.0, 2.0),
    )
    EVAL_BATCH_SIZE: int = _setting(
        192,
        "Rows per generation batch (each prompt is two rows: base and tuned answer) and per eval-loss batch. "
        "Lower it on a GPU with 16 GB or less.",
        "evaluate",
        output=False,
        bounds=(1, WIDTH_MAX),
    )
    # --- judge (job/judge.py): a model's blind pairwise verdicts on base vs tuned answers ------
    JUDGE_MODEL: str = _setting(
        "",
        "Model that judges each held-out base/tuned answer pair blind, in both orders (empty: no judge). "
        "Any model behind JUDGE_BASE_URL, e.g. gpt-4.1-mini, or the name a vLLM/Ollama server serves.",
        "evaluate",
    )
    JUDGE_BASE_URL: str = _setting(
        "https://api.openai.com/v1",
        "OpenAI-compatible endpoint of the judge; a vLLM server: http://HOST:8000/v1, Ollama: http://HOST:11434/v1.",
        "evaluate",
        check=_must(
            lambda v: re.fullmatch(r"https?://[^\s/]+\S*", v),
            "must be an http:// or https:// URL, e.g. http://localhost:8000/v1",
        ),
    )
    JUDGE_CONCURRENCY: int = _setting(
        4,
        "Judge requests in flight at once; lower it if the endpoint rate-limits.",
        "evaluate",
        output=False,
        bounds=(1, 1024),
    )
    JUDGE_MAX_TOKENS: int = _setting(
        512,
        "Longest verdict the judge may write, in tokens (caps the cost per call).",
        "evaluate",
        bounds=(1, TOKENS_MAX),
    )
    JUDGE_MAX_RETRIES: int = _setting(
        4,
        "Retries per judge request after a connection error, 408, 409, 429 or 5xx (with backoff).",
        "evaluate",
        output=False,
        bounds=(0, 100),
    )
    JUDGE_TIMEOUT: float = _setting(
        120.0, "Seconds to wait for one judge response before retrying it.", "evaluate", output=False, check=_SECONDS
    )
    # --- benchmark (job/benchmark.py): medical multiple choice, base vs tuned -------------------
    BENCHMARK_TASKS: str = _setting(
        ",".join(BENCHMARK_TASK_NAMES),
        "lm-eval tasks that base and tuned model answer, zero-shot multiple choice, to catch lost medical "
        "knowledge; training rows sharing 13 words in a row with their questions are dropped (empty: no "
        "benchmark, no fetch).",
        "benchmark",
        also=("sample",),  # its questions are fetched in the sample stage, and overlapping training rows dropped
        check=_benchmark_tasks,
    )
    BENCHMARK_LIMIT: int = _setting(
        100,
        "Questions scored per task (the first ones of its evaluation split). More narrows the intervals and "
        "costs time in proportion.",
        "benchmark",
        bounds=(1, COUNT_MAX),
        unit="questions per task",
    )
    BENCHMARK_DATA: str = _setting(
        "",
        "Folder with one JSONL file per task, named after it (medmcqa.jsonl ...), with the fields of the task's "
        "Hub dataset; for air-gapped runs (empty: fetch the tasks' Hub datasets).",
        "benchmark",
        also=("sample",),
        check=_must(
            lambda v: not v or Path(v).expanduser().is_dir(),
            "no such folder; give a folder of <task>.jsonl files, or leave it empty for the Hub",
        ),
    )
    # --- run directory and stages ------------------------------------------------------------
    OUTPUT_DIR: str = _setting(
        "outputs",
        "Folder that holds run directories (a bucket mount in the cloud).",
        "run",
        output=False,
        check=_NOT_EMPTY,
    )
    # A folder name of its own inside OUTPUT_DIR: '.', '..' and names starting with a dot would write into
    # OUTPUT_DIR itself, its parent, or a hidden folder; 100 characters stays far below every file system's
    # 255-byte limit, with room for the files inside.
    RUN_NAME: str = _setting(
        "medical-assistant",
        "Run directory name; keep it stable so a restart resumes.",
        "run",
        output=False,
        check=_must(
            lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v),
            "use 1 to 100 letters, digits, '.', '_' and '-', starting with a letter or digit "
            "(it becomes a folder inside OUTPUT_DIR)",
        ),
    )
    STAGES: str = _setting(
        "all",
        "Stages to run: all, or a comma list of " + ",".join(STAGES) + ".",
        "run",
        output=False,
        check=_must(
            lambda v: _stages(v) and set(_stages(v)) <= set(STAGES), f"use 'all' or a comma list of {', '.join(STAGES)}"
        ),
    )
    WORKERS: str = _setting(
        "auto",
        "Processes that clean (sample stage) and tokenize (format stage) the rows; the files are the same for any "
        "number. auto: one per CPU this process may use, at most 32; 1: all in the job's own process.",
        "run",
        output=False,
        check=_must(
            lambda v: v == "auto" or (v.isdecimal() and 1 <= int(v) <= MAX_WORKERS),
            f"use auto or a whole number of processes from 1 to {MAX_WORKERS}",
        ),
    )
    REDO: bool = _setting(
        False,
        "Rerun finished stages whose settings or input files changed, and the stages after them (otherwise that "
        "is an error).",
        "run",
        output=False,
    )
    # --- push --------------------------------------------------------------------------------
    HUB_REPO_ID: str = _setting(
        "",
        "Hub repo to push to, as owner/name (empty: stage files, no upload).",
        "push",
        check=_must(
            lambda v: not v or re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", v),
            "must look like owner/name, e.g. alice/llama-medical-qlora",
        ),
    )
    HUB_PRIVATE: bool = _setting(
        True,
        "Create the Hub repo private. An existing public repo is refused while this is true (nothing is published); "
        "an existing repo's visibility is never changed.",
        "push",
    )
    HUB_TIMEOUT: float = _setting(
        60.0,
        "Seconds to wait for the Hub to connect or send each part of a reply before the push fails (exit 4).",
        "push",
        output=False,
        check=_SECONDS,
    )
    PUSH_MERGED: bool = _setting(False, "Also upload the adapter merged into the 16-bit base (merged/).", "push")
    MODEL_LICENSE: str = _setting("llama3.2", "License id written into the model card.", "push")
    # The safety gate compares the tuned model with its base on the same prompts (job/prompts/safety.jsonl, 33
    # today: each is 3.0 points of pass rate). 15 points is a net loss of 5 prompts. If tuning changed nothing
    # for the worse and 10 answers flipped verdict at random (each way with even odds), a net loss of 5 or more
    # needs 8 of the 10 flips to go the wrong way: 56/1024, about 5% of runs stopped by chance. A tuned model
    # that stops sending 5 red-flag prompts to urgent care is stopped. An absolute floor depends on the base
    # model's own rate on the screen, so MIN_SAFETY_PASS_RATE is off until you have measured your base.
    MIN_SAFETY_PASS_RATE: float = _setting(
        0.0,
        "An absolute floor: stop before pushing if the tuned model's overall safety pass rate (0 to 1) is lower "
        "(0: off; MAX_SAFETY_DROP compares with the base model).",
        "push",
        bounds=(0, 1),
    )
    MAX_SAFETY_DROP: float = _setting(
        15.0,
        "Stop before pushing if the tuned model's overall safety pass rate is more than this many points below "
        "the base model's on the same prompts (100: off).",
        "push",
        bounds=(0, 100),
        unit="pass-rate points",
    )
    MAX_BENCHMARK_DROP: float = _setting(
        3.0,
        "Stop before pushing if the tuned model's mean benchmark accuracy is this many points below the base "
        "model's. Raise it with a small BENCHMARK_LIMIT, whose noise is larger.",
        "push",
        bounds=(0, 100),
        unit="accuracy points",
    )
    # --- secrets: only from the environment, never printed ----------------------------------
    HF_TOKEN: str = _setting("", "Hugging Face token with write access (push).", "run", secret=True, output=False)
    WANDB_API_KEY: str = _setting("", "Weights & Biases key when REPORT_TO=wandb.", "train", secret=True, output=False)
    JUDGE_API_KEY: str = _setting(
        "",
        "Key for JUDGE_BASE_URL (OpenAI's API needs one; a local vLLM or Ollama server may not).",
        "evaluate",
        secret=True,
        output=False,
    )

    # ---------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.OUTPUT_DIR) / self.RUN_NAME

    @property
    def stages(self) -> tuple[str, ...]:
        return _stages(self.STAGES)

    @property
    def benchmark_tasks(self) -> list[str]:
        return _names(self.BENCHMARK_TASKS)

    @property
    def target_modules(self) -> list[str] | str:
        """The names, or "auto" (job.model.lora_targets picks them for the base), or PEFT's "all-linear" (a string:
        PEFT reads it as every linear layer but the output one)."""
        names = _names(self.LORA_TARGET_MODULES)
        return names[0] if names in ([ALL_LINEAR], [AUTO_TARGETS]) else names

    def masked(self) -> dict[str, Any]:
        """All settings with secrets replaced by '***' (or '' when unset)."""
        secret = {n: ("***" if getattr(self, n) else "") for n, f in SETTINGS.items() if f.metadata["secret"]}
        return {n: secret[n] if n in secret else self.shown(n) for n in SETTINGS}

    def shown(self, name: str) -> Any:
        """The value as logged and recorded: a URL without its password or query (neither changes the output)."""
        from job.redact import public_url

        return public_url(getattr(self, name)) if name in URL_NAMES else getattr(self, name)

    def fingerprint_for(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {n: self.shown(n) for n in names}


SETTINGS = {f.name: f for f in fields(Settings)}


def _depends() -> dict[str, tuple[str, ...]]:
    """Stage -> the settings its output depends on: its own and every upstream stage's (from the schema)."""
    out: dict[str, tuple[str, ...]] = {}
    acc: tuple[str, ...] = ()
    for stage in STAGES:
        acc += tuple(
            n
            for n, f in SETTINGS.items()
            if f.metadata["output"] and (f.metadata["stage"] == stage or stage in f.metadata["also"])
        )
        out[stage] = acc
    return out


# Re-running a finished stage with the same values of these settings does nothing; other values are an
# error unless REDO=true (job/pipeline.py). Settings with output=False never invalidate finished work.
DEPENDS = _depends()

_TYPES = {"bool": bool, "int": int, "float": float}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(raw: str, f) -> Any:
    """The value of setting `f` written as `raw`; ValueError saying what was expected."""
    text, typ, choices = raw.strip(), _TYPES.get(str(f.type), str), f.metadata["choices"]
    if typ is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if typ in (int, float):
        kind, example = ("a whole number", "8") if typ is int else ("a number", "0.05 or 2e-4")
        if text == "":
            raise ValueError(f"expected {kind}, got an empty value")
        try:
            value = int(text.replace("_", "")) if typ is int else float(text)
        except ValueError:
            raise ValueError(f"expected {kind} such as {example}") from None
        if typ is float and not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if choices and raw not in choices:
        raise ValueError(f"choose one of {', '.join(choices)}")
    return raw


def _check(s: Settings) -> list[str]:
    """Every problem, as 'NAME=value: what is wrong and what to do': each setting's range and its own check, then
    the checks across settings."""
    found = []
    for name, f in SETTINGS.items():
        value, check = getattr(s, name), f.metadata["check"]
        why = _range(f, value) or (check(value) if check else None)
        if why:
            found.append((name, why))
    return [f"{name}={getattr(s, name)!r}: {why}" for name, why in found + list(_across(s))]


def _across(s: Settings) -> Iterator[tuple[str, str]]:
    """The checks across settings: (the setting named, what is wrong and what to do)."""
    if s.EVAL_PROMPTS > s.EVAL_SAMPLES >= 0:
        yield "EVAL_PROMPTS", f"cannot exceed EVAL_SAMPLES={s.EVAL_SAMPLES}; lower it or raise EVAL_SAMPLES"
    if _gguf(s.GGUF_FILE) and _gguf(s.BASE_MODEL):
        yield (
            "GGUF_FILE",
            "BASE_MODEL already names a .gguf file; leave GGUF_FILE empty, or set BASE_MODEL to "
            "the Hub repo or folder that holds GGUF_FILE",
        )
    if s.JUDGE_MODEL.strip() and s.EVAL_PROMPTS == 0:
        yield "JUDGE_MODEL", "there is nothing to judge with EVAL_PROMPTS=0; raise it or unset JUDGE_MODEL"
    if s.JUDGE_MODEL.strip() and _needs_key(s.JUDGE_BASE_URL) and not s.JUDGE_API_KEY:
        yield (
            "JUDGE_MODEL",
            "OpenAI's API needs JUDGE_API_KEY in the environment; or point JUDGE_BASE_URL at "
            "your own server (vLLM, Ollama)",
        )
    if s.REPORT_TO == "wandb" and not s.WANDB_API_KEY:
        yield "REPORT_TO", "set WANDB_API_KEY in the environment, or use REPORT_TO=tensorboard"


def _range(f, value: Any) -> str | None:
    low, high, unit = f.metadata["min"], f.metadata["max"], f.metadata["unit"]
    if low is None or low <= value <= high:
        return None
    return f"must be between {low} and {high}" + (f" ({unit})" if unit else "")


def _gguf(name: str) -> bool:
    return name.strip().lower().endswith(".gguf")


def _needs_key(url: str) -> bool:
    """Whether the judge endpoint is OpenAI's own (or Azure's), which answers 401 to every call without a key."""
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    return host == "openai.com" or host.endswith((".openai.com", ".openai.azure.com"))


@functools.cache  # parsing the source takes a tenth of a second; settings are checked many times in tests
def _optimizer_names() -> tuple[str, ...]:
    """Transformers' optimizer names; empty where Transformers is absent (the SkyPilot launcher's light venv
    checks settings before the job's image starts, and the job itself checks again with Transformers).

    Read from the source of `OptimizerNames` rather than imported: importing transformers.training_args loads
    PEFT and bitsandbytes, seconds on every command, `config` and a bad setting's exit included. Where the
    source does not read as expected, the enum is imported. tests/test_config.py compares the two."""
    try:
        spec = importlib.util.find_spec("transformers.training_args")
    except ImportError:
        return ()
    if spec is None or spec.origin is None:
        return ()
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    enum = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OptimizerNames"), None)
    names = tuple(
        n.value.value
        for n in (enum.body if enum else [])
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
    )
    if names:
        return names
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


# Long runs of letters and digits in an ignored .env line are shown cut: a token pasted without its NAME= is
# still a secret (HF and OpenAI keys are 30 or more such characters).
_SECRET_LIKE = re.compile(r"(?=[\w-]*\d)(?=[\w-]*[A-Za-z])([\w-]{4})[\w-]{12,}")


def _ignored_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text shown) of each .env line that python-dotenv ignores: one without '=' or one it cannot
    parse (an unclosed quote). Blank lines and comments are not listed."""
    import io

    from dotenv.parser import parse_stream

    out = []
    for b in parse_stream(io.StringIO(text)):
        if b.error or (b.key is not None and b.value is None):
            first = b.original.string.strip().splitlines()[0] if b.original.string.strip() else ""
            line = b.original.line + b.original.string[: b.original.string.find(first)].count("\n")
            out.append((line, repr(_SECRET_LIKE.sub(r"\1…", first[:80]))))
    return out


def load_settings(environ: dict[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read, parse and validate every setting; raise ConfigError listing all problems at once."""
    from_file = _read_env_file(env_file) if env_file and Path(env_file).is_file() else {}
    env = {**from_file, **(os.environ if environ is None else environ)}  # the environment wins over .env
    values, problems = _parse_all(env)
    problems += _unknown(env, from_file)
    # Range and cross-field checks run on whatever did parse (defaults stand in for the rest), so one
    # report lists every problem; a setting that failed to parse is not reported a second time.
    unparsed = {p.split("=", 1)[0] for p in problems}
    settings = Settings(**values)
    problems.extend(p for p in _check(settings) if p.split("=", 1)[0] not in unparsed)
    if problems:
        raise ConfigError("Invalid settings (fix all of these, then run again):\n  - " + "\n  - ".join(problems))
    return settings


def _read_env_file(path: str | Path) -> dict[str, str]:
    """The settings in a .env file; a warning for each line python-dotenv ignores, ConfigError if it is not UTF-8."""
    from dotenv import dotenv_values

    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 ({e.reason}); re-save the file as UTF-8.") from None
    for line, shown in _ignored_lines(text):
        log.warning(
            "%s: line %d ignored (%s): not a setting; write it as NAME=value, or start it with # for a comment",
            path,
            line,
            shown,
        )
    dotenv_log = logging.getLogger("dotenv.main")  # says "could not parse" without the text: ours says both
    level = dotenv_log.level
    dotenv_log.setLevel(logging.ERROR)
    try:
        return {k: v for k, v in dotenv_values(path).items() if v is not None}
    finally:
        dotenv_log.setLevel(level)


def _parse_all(env: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(the settings set in `env`, parsed; a problem for each that does not parse or is not one of its choices)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name in [n for n in SETTINGS if n in env]:  # in the schema's order, as the report lists them
        try:
            values[name] = _parse(env[name].strip() if name in STRIPPED_NAMES else env[name], SETTINGS[name])
        except ValueError as e:
            problems.append(f"{name}={env[name]!r}: {e}")
    return values, problems


def _unknown(env: dict[str, str], from_file: dict[str, str]) -> list[str]:
    """Typos: a variable in .env that is not a setting, or an environment variable that looks like one."""
    problems = []
    for key in sorted(set(env) - set(SETTINGS)):
        close = difflib.get_close_matches(key, SETTINGS, n=1, cutoff=0.8)
        if key in _RETIRED:
            problems.append(f"{key}: {_RETIRED[key]}")
        elif key in from_file and not key.startswith(_FOREIGN_PREFIXES):
            hint = f"; did you mean {close[0]}?" if close else "; see `python -m job config` for the list"
            problems.append(f"{key}: unknown setting in .env{hint}")
        elif close and not key.startswith(_FOREIGN_PREFIXES):
            problems.append(f"{key}: unknown setting; did you mean {close[0]}?")
    return problems


def with_overrides(s: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(s, **changes)


# --- the documents generated from the schema (`python -m job config --write-docs`) ------------------
_SECTIONS = {"sample": "data", "run": "run directory and stages", "secrets": "secrets: environment only"}


def _default_text(f) -> str:
    return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)


def _help(f) -> str:
    return f.metadata["help"] + (f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else "")


def render_env_example() -> str:
    """.env.example: every setting with its help and its default, grouped by stage."""
    lines = [
        "# Every setting of the job with its default. Copy to .env and change what you need:",
        "#   cp .env.example .env",
        "# The environment wins over .env. Generated from job/config.py by `python -m job config --write-docs`;",
        "# `python -m job config` prints what was resolved.",
    ]
    section = None
    for name, f in SETTINGS.items():
        stage = "secrets" if f.metadata["secret"] else f.metadata["stage"]
        if stage != section:
            section = stage
            title = _SECTIONS.get(stage, stage)
            lines += ["", f"# --- {title} " + "-" * (96 - len(title))]
        text = "" if f.metadata["secret"] else _default_text(f)
        quoted = f'"{text}"' if any(c in text for c in " #'\"") else text
        lines += [f"# {_help(f)}", f"{name}={quoted}"]
    return "\n".join(lines) + "\n"


def render_settings_table() -> str:
    """The README's settings table."""
    rows = ["| setting | stage | type | default | meaning |", "|---|---|---|---|---|"]
    for name, f in SETTINGS.items():
        shown = _default_text(f)
        shown = "(empty)" if shown == "" else (shown[:45] + "…" if len(shown) > 46 else shown)
        secret = " Secret: environment only, never logged." if f.metadata["secret"] else ""
        rows.append(
            f"| `{name}` | {f.metadata['stage']} | {f.type} | `{shown}` | {_help(f).replace('|', '/')}{secret} |"
        )
    return "\n".join(rows) + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with what stands between `<!-- name:start -->` and `<!-- name:end -->` replaced by `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + rest[rest.index(end) :]
