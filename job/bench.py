"""`make bench` / `python -m job.bench`: training and generation throughput, side by side, on one GPU.

Runs the job's own data, training and generation code on the Llama-3.2-3B shape (random weights
built locally: the compute per token equals the real model's) on the first `--rows` conversations of
the data file at MAX_SEQ_LENGTH=512, and compares these training recipes:
  seed         the seed recipe as published: batch 1 x accumulation 2, paged AdamW 32-bit,
               gradient checkpointing, no packing, bitsandbytes' 4-bit layers
  trl          plain TRL: packing + Liger kernels, batch 8, TRL's defaults otherwise (which include
               gradient checkpointing), 4-bit layers
  trl-nogc     trl without gradient checkpointing
  job          this job's defaults (job/config.py) at the peers' batch of 8 (BATCH_SIZE=8; the default is 4)
  job-nf4      the memory-lean path: DEQUANTIZE_BASE=false (4-bit layers kept, micro-batches split in two)
  job-nographs, job-nf4-nographs   job and job-nf4 without CUDA graphs
  job-noliger, job-sdpa, job-compile, job-compile-nf4, job-b16, job-compile-b16
               one lever of `job` changed each
  job-accum2, job-ddp2   one GPU (batch 8 x accumulation 2) and two GPUs under torchrun's DDP (batch 8
               each): the same data and optimizer steps, so their tokens/s ratio is DDP's speed-up;
               job-compile-accum2, job-compile-ddp2 the same, compiled
  unsloth      Unsloth's fastest path, when Unsloth imports in its process (it is not a dependency
               of this project): 4-bit base, LoRA r8 on q_proj,v_proj, padded batches of 8 with its
               per-block compilation, its own SFTTrainer patches; `unsloth-pf` (not in the default
               list) the same with its padding-free batches
Every measurement runs in a process of its own (Liger patches Transformers process-wide; compiled code,
autotuning and allocator state must not carry over), and the parent process never touches the GPU.

How a recipe is timed: all recipes count the same thing, the real (non-padding) tokens that go through
forward and backward in each optimizer step. Steps run until the step rate is stable: the median
tokens/s of the last `--stable-window` steps is within `--tolerance` of the median of the window before
(compilation, autotuning and allocator growth are then behind us), at most `--warmup-cap` steps; then
`--steps` steps are timed, each closed by torch.cuda.synchronize(). A recipe that never settles is timed
over its last `--steps` steps and flagged "not stable". Reported: the median per-step tokens/s, its
p10-p90 spread, seconds per step, peak GiB, MFU by DESIGN.md's formula against the bf16 matmul peak
measured on the card (median of several warmed runs), and the warm-up steps used.

Also: an equivalence check (loss and LoRA gradients of the job's path, packed rows on its base weights,
vs the plain path, padded rows through bitsandbytes' 4-bit layers, same rows and adapter), the CUDA-graphed
layers against the eager ones (one micro-batch), and the evaluate stage's generation speed (base and tuned
rows in shared batches), one untimed pass then a timed one, then three decoders on the same rows.

`--help` lists the options; `--out` gets bench.json (every per-step figure) and bench.md (the README section).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from job import decode, evaluate, formatting, safety, sample
from job.config import load_settings, replace_section, with_overrides
from job.files import atomic_write_text, read_jsonl
from job.model import build_messages, load_model, model_code_restored, resolve_precision, torch_dtype
from job.paths import RunPaths
from job.random_llama import build_random_llama
from job.speedups import cuda_graphs
from job.train import base_weights, build_trainer

log = logging.getLogger("job.bench")

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
_BASELINE = {
    "PACKING": "true",
    "OPTIMIZER": "adamw_torch",
    "LIGER_KERNEL": "true",
    "ATTN_IMPLEMENTATION": "sdpa",
    "TORCH_COMPILE": "false",
    "DEQUANTIZE_BASE": "false",
}
# Settings each recipe changes. The bench runs at MAX_SEQ_LENGTH=512, so the job's recipes use batch 8:
# the same tokens per micro-batch as the default 4 packed rows of 1024.
RECIPES: dict[str, dict[str, str]] = {
    "seed": {
        **_BASELINE,
        "BATCH_SIZE": "1",
        "GRAD_ACCUM": "2",
        "PACKING": "false",
        "GRADIENT_CHECKPOINTING": "true",
        "OPTIMIZER": "paged_adamw_32bit",
        "LIGER_KERNEL": "false",
    },
    "trl": {**_BASELINE, "BATCH_SIZE": "8", "GRAD_ACCUM": "1", "GRADIENT_CHECKPOINTING": "true"},
    "trl-nogc": {**_BASELINE, "BATCH_SIZE": "8", "GRAD_ACCUM": "1", "GRADIENT_CHECKPOINTING": "false"},
    "job": {"BATCH_SIZE": "8"},
    "job-nf4": {"BATCH_SIZE": "8", "DEQUANTIZE_BASE": "false"},
    "job-nographs": {"BATCH_SIZE": "8", "CUDA_GRAPHS": "false"},
    "job-nf4-nographs": {"BATCH_SIZE": "8", "DEQUANTIZE_BASE": "false", "CUDA_GRAPHS": "false"},
    "job-noliger": {"BATCH_SIZE": "8", "LIGER_KERNEL": "false"},
    # Transformers' stock sdpa: packed rows attend through a dense block-diagonal mask instead of
    # job/attention.py's varlen kernel.
    "job-sdpa": {"BATCH_SIZE": "8", "ATTN_IMPLEMENTATION": "sdpa"},
    "job-compile": {"BATCH_SIZE": "8", "TORCH_COMPILE": "true"},
    "job-compile-nf4": {"BATCH_SIZE": "8", "TORCH_COMPILE": "true", "DEQUANTIZE_BASE": "false"},
    "job-b16": {"BATCH_SIZE": "16"},
    "job-compile-b16": {"BATCH_SIZE": "16", "TORCH_COMPILE": "true"},
    # Two GPUs against one on the same data and optimizer steps: 2 x batch 8 (DDP) vs 1 x batch 8 x accum 2.
    "job-accum2": {"BATCH_SIZE": "8", "GRAD_ACCUM": "2"},
    "job-ddp2": {"BATCH_SIZE": "8"},
    "job-compile-accum2": {"BATCH_SIZE": "8", "GRAD_ACCUM": "2", "TORCH_COMPILE": "true"},
    "job-compile-ddp2": {"BATCH_SIZE": "8", "TORCH_COMPILE": "true"},
}
# Recipes launched by torchrun on this many GPUs (one process each); every other recipe uses one GPU.
GPUS = {"job-ddp2": 2, "job-compile-ddp2": 2}
UNSLOTH = "unsloth"
# Unsloth's padding, by recipe name. Its automatic choice keeps padding-free batches on cards it has no
# measurement for (H100/H200 among them); padded batches with per-block compilation were its fastest
# path on an H200 (issue 18), so `unsloth` forces them and `unsloth-pf` measures the other.
UNSLOTH_PADDING = {UNSLOTH: "padded", "unsloth-pf": "padding_free"}
# One process checks equivalence and then times generation, as the job's own process evaluates after training.
CHECKS = ("checks",)
# The order of a default run: the figures the issue's targets compare first, so a run cut short keeps them.
DEFAULT_PARTS = [
    *("job", UNSLOTH, "job-nf4", "trl", "trl-nogc", "seed", "job-nographs", "job-nf4-nographs"),
    *CHECKS,
    *("job-noliger", "job-sdpa", "job-compile"),
    *("job-accum2", "job-ddp2"),
]
FULL_DATASET_ROWS = 256_916  # ruslanmv/ai-medical-chatbot, train split


# --- what the figures are (pure functions, tested on CPU) --------------------------------------
def flops_per_token(config, mean_seq_len: float, lora_params: int) -> float:
    """DESIGN.md: 4*N_matmul (frozen base: forward + input gradients) + 6*N_lora + attention."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    n_matmul = layers * per_layer + h * config.vocab_size  # + lm_head
    # causal attention: QK^T and AV over on average L/2 keys, 2 FLOPs each, x3 for fwd+bwd
    attention = 3 * layers * 2 * 2 * q * mean_seq_len / 2
    return 4 * n_matmul + 6 * lora_params + attention


def stable_start(rates: list[float], window: int, tolerance: float) -> int | None:
    """Index of the first step after warm-up, or None if the rate never settles.

    Warm-up is over at step i when the median rate of steps [i-w, i) is within `tolerance` (a fraction)
    of the median of [i-2w, i-w). Medians, so one slow step (a log line, a garbage collection) neither
    ends nor prolongs warm-up; the timed window then starts at i, after everything compared.
    """
    for i in range(2 * window, len(rates) + 1):
        before = statistics.median(rates[i - 2 * window : i - window])
        last = statistics.median(rates[i - window : i])
        if abs(last - before) <= tolerance * max(last, before):
            return i
    return None


def spread(values: list[float]) -> dict[str, float]:
    """Median, p10, p90, min and max of per-step figures (p10/p90 by linear interpolation)."""
    # quantiles() needs two values or more; a single value is every decile
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values
    return {
        "median": statistics.median(values),
        "p10": deciles[0],
        "p90": deciles[-1],
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def timed_window(seconds: list[float], tokens: list[int], steps: int, window: int, tolerance: float) -> dict:
    """Choose the timed steps from all steps run, and summarize them."""
    rates = [t / s for t, s in zip(tokens, seconds)]
    # Stable in time to leave `steps` steps after warm-up (the same first index the online check finds).
    start = stable_start(rates[: max(len(rates) - steps, 0)], window, tolerance)
    stable = start is not None
    if not stable:  # never settled within the cap: the last `steps` steps, flagged
        start = max(len(rates) - steps, 0)
    picked = slice(start, start + steps)
    return {
        "stable": stable,
        "warmup_steps": start,
        "timed_steps": len(rates[picked]),
        "tokens_per_s": spread(rates[picked]),
        "seconds_per_step": spread(seconds[picked]),
        # what a user gets over the window: all tokens over all the time
        "tokens_per_s_overall": sum(tokens[picked]) / sum(seconds[picked]),
        "tokens_per_step": statistics.fmean(tokens[picked]),
    }


def replace_readme_section(text: str, body: str) -> str:
    """The README with the text between the bench markers replaced by `body` (markers kept): the same
    mechanism that regenerates the settings table (job/config.py)."""
    return replace_section(text, "bench", body.strip("\n") + "\n")


# --- measurements (each in a process of its own, on the GPU) --------------------------------------
def measure_peak_tflops(size: int = 8192, runs: int = 7, products: int = 50) -> dict:
    """The card's bf16 matmul rate: median of `runs` timed runs of `products` products, after a warm-up
    long enough (about a second) for the clocks to ramp up."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(500):
        a @ b
    torch.cuda.synchronize()
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(products):
            a @ b
        torch.cuda.synchronize()
        rates.append(2 * size**3 * products / (time.perf_counter() - t0) / 1e12)
    return spread(rates)


def _cuda(call: str, otherwise: Any = None) -> Any:
    """torch.cuda.<call>() on a GPU, `otherwise` without one (the CPU tests run the measuring code too)."""
    import torch

    return getattr(torch.cuda, call)() if torch.cuda.is_available() else otherwise


def _over_ranks(n: int, how: str) -> int:
    """Under DDP, `n` summed over the ranks (how="sum") or rank 0's `n` (how="rank0"); `n` itself without."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], device="cuda" if torch.cuda.is_available() else "cpu")
    if how == "sum":
        dist.all_reduce(t)
    else:
        dist.broadcast(t, src=0)
    return int(t.item())


class _CountingCollator:
    """Wraps a trainer's collator to count the real (non-padding) tokens of each micro-batch."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        # without an attention mask the batch is padding-free: one flat row of real tokens
        self.tokens.append(
            int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
        )
        return batch


def _timed_train(trainer, grad_accum: int, args, profile_to: Path | None = None) -> dict:
    """Train with a per-step clock until the rate is stable plus `args.steps` steps (or the cap).

    With BENCH_PROFILE=N (a diagnosis run, not for the table) rank 0 records steps N and N+1 with
    torch.profiler and writes its busiest operations to `profile_to`.
    """
    import torch
    from transformers import TrainerCallback

    rank0 = int(os.environ.get("RANK", "0")) == 0
    profile_at = int(os.environ.get("BENCH_PROFILE", "0")) if profile_to and rank0 else 0
    profiler = None  # the running torch.profiler, while steps N and N+1 are recorded

    # Count before job/speedups/cuda_graphs.py's fixed-shape padding, if any: its padding is not trained on.
    outer = trainer.data_collator
    counter = _CountingCollator(getattr(outer, "inner", outer))
    if hasattr(outer, "inner"):
        outer.inner = counter
    else:
        trainer.data_collator = counter
    ends: list[float] = []  # clock readings: training's start, then the end of each step
    seconds: list[float] = []
    tokens: list[int] = []
    start: int | None = None  # the first step after warm-up, once found

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            nonlocal profiler
            if not ends:
                _cuda("synchronize")
                ends.append(time.perf_counter())
            if profile_at and len(seconds) == profile_at:
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                profiler = torch.profiler.profile(activities=acts)
                profiler.start()

        def on_step_end(self, a, state, control, **kw):
            nonlocal profiler, start
            _cuda("synchronize")
            ends.append(time.perf_counter())
            seconds.append(ends[-1] - ends[-2])  # step to step: data, forward, backward, optimizer, callbacks
            # Micro-batches are consumed in order; the dataloader may fetch ahead, so count by index.
            j = len(seconds) - 1
            step_tokens = sum(counter.tokens[j * grad_accum : (j + 1) * grad_accum])
            tokens.append(_over_ranks(step_tokens, "sum"))  # under DDP: every GPU's tokens
            if profiler is not None and len(seconds) == profile_at + 2:
                profiler.stop()
                avg, profiler = profiler.key_averages(), None
                sorts = ("cuda_time_total", "self_cpu_time_total", "cpu_time_total")
                profile_to.write_text("\n\n".join(avg.table(sort_by=k, row_limit=30) for k in sorts))
            if start is None:
                start = stable_start([t / s for t, s in zip(tokens, seconds)], args.stable_window, args.tolerance)
            # Under DDP rank 0 decides, so every rank stops at the same step (or the collectives hang).
            if _over_ranks(start is not None and len(seconds) >= start + args.steps, "rank0"):
                control.should_training_stop = True
            return control

    trainer.add_callback(Clock())
    _cuda("reset_peak_memory_stats")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        **timed_window(seconds, tokens, args.steps, args.stable_window, args.tolerance),
        "step_seconds": seconds,
        "step_tokens": tokens,
        "train_wall_s": wall,
        "peak_gib": _cuda("max_memory_allocated", 0) / 2**30,
        "lora_params": trainer.model.get_nb_trainable_parameters()[0],
        "final_loss": losses[-1] if losses else None,
    }


def _recipe_settings(cfg, overrides: dict[str, str]):
    env = {k: str(v) for k, v in cfg.masked().items() if k not in ("HF_TOKEN", "WANDB_API_KEY")}
    return load_settings({**env, **overrides}, env_file=None)


def measure_training(name: str, cfg, args) -> dict:
    """One of the job's recipes, through the job's own build_trainer."""
    rcfg = _recipe_settings(cfg, RECIPES[name])
    precision, _ = resolve_precision(rcfg)
    trainer = build_trainer(
        rcfg,
        RunPaths(rcfg.run_dir),
        precision,
        lean=name.startswith("job"),  # the seed and TRL recipes keep their own micro-batches
        max_steps=args.warmup_cap + args.steps,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        report_to=[],
    )
    # the accumulation the trainer runs: the memory-lean path splits micro-batches (speedups/micro_batches.py)
    grad_accum = trainer.args.gradient_accumulation_steps
    return {
        **_timed_train(trainer, grad_accum, args, profile_to=Path(args.out) / f"profile-{name}.txt"),
        "settings": RECIPES[name],
        "gpus": GPUS.get(name, 1),
        "liger": bool(trainer.args.use_liger_kernel),
    }


def measure_unsloth(cfg, args, padding: str = "padded") -> dict:
    """Unsloth's fastest path on the same rows (the pre-tokenized conversations the job trains on).

    FastLanguageModel with a 4-bit base, LoRA r8/alpha 16 on q_proj,v_proj without dropout (its fast
    LoRA kernels need dropout 0) and without gradient checkpointing (memory is plentiful here), TRL's
    SFTTrainer with Unsloth's patches, batches of 8 without packing, and `padding` (UNSLOTH_PADDING).
    Same optimizer, learning rate and seed as the job.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model folder; no statistics pings
    os.environ["UNSLOTH_PADDING_CHOICE"] = padding  # read when the trainer is built
    try:
        import unsloth  # (first: it patches Transformers and TRL on import)
    except ImportError as e:
        return {"skipped": f"Unsloth does not import here ({type(e).__name__}: {e})"}

    trainer = unsloth_trainer(
        cfg,
        RunPaths(cfg.run_dir).train_tokens,
        output_dir=str(cfg.run_dir / "unsloth"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=args.warmup_cap + args.steps,
        logging_steps=10,
        disable_tqdm=True,
    )
    out = _timed_train(trainer, 1, args)
    return {**out, "settings": {"unsloth": unsloth.__version__, "padding_free": trainer.args.padding_free}}


def unsloth_trainer(cfg, train_tokens, **sft_args):
    """Unsloth's fastest path as its docs give it: its 4-bit loader and LoRA (the job's r, alpha and targets, no
    dropout, no gradient checkpointing), TRL's SFTTrainer on the job's token file, padded rows, loss on the reply.
    `sft_args`: what the caller's recipe sets besides (batch, steps or epochs, output folder). Call only after
    `import unsloth` succeeded: it patches Transformers and TRL on import."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.BASE_MODEL, max_seq_length=cfg.MAX_SEQ_LENGTH, load_in_4bit=True, dtype=torch.bfloat16
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.LORA_R,
        lora_alpha=cfg.LORA_ALPHA,
        lora_dropout=0,
        target_modules=cfg.target_modules,
        bias="none",
        use_gradient_checkpointing=False,
        random_state=cfg.SEED,
    )
    config = dict(
        max_length=cfg.MAX_SEQ_LENGTH,
        packing=False,
        completion_only_loss=True,
        learning_rate=cfg.LEARNING_RATE,
        lr_scheduler_type=cfg.LR_SCHEDULER,
        warmup_steps=cfg.WARMUP_RATIO,
        optim=cfg.OPTIMIZER,
        weight_decay=0.0,
        bf16=True,
        save_strategy="no",
        report_to="none",
        seed=cfg.SEED,
        dataset_num_proc=None,
    )
    return SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(read_jsonl(train_tokens)),
        args=SFTConfig(**(config | sft_args)),
    )


def _trained_adapter(cfg, precision: str):
    """A trainer whose adapter has taken a few steps (lora_B non-zero), saved where evaluation reads it."""
    trainer = build_trainer(
        cfg, RunPaths(cfg.run_dir), precision, max_steps=3, save_strategy="no", report_to=[], disable_tqdm=True
    )
    with model_code_restored(trainer.model):  # as the train stage does
        trainer.train()
    adapter = RunPaths(cfg.run_dir).adapter
    trainer.model.save_pretrained(adapter)
    trainer.processing_class.save_pretrained(adapter)
    return trainer


def liger_modules(model) -> int:
    """Modules of `model` whose forward is Liger's (its patch binds them per module)."""
    return sum("liger_kernel" in (getattr(m.forward, "__module__", None) or "") for m in model.modules())


def _loss_and_grads(model, batch: dict) -> tuple[float, Any]:
    """One forward and backward of `batch`: the loss and the LoRA gradients, flattened in fp32."""
    import torch

    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return loss.float().item(), grads


def _compared(reference: tuple[float, Any], other: tuple[float, Any]) -> dict:
    """How far `other`'s loss and gradients are from `reference`'s (each from _loss_and_grads)."""
    import torch

    (l1, g1), (l2, g2) = reference, other
    return {
        "loss_rel_diff": abs(l1 - l2) / abs(l1),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)),
        "grad_rel_l2": float((g1 - g2).norm() / g1.norm()),
    }


def equivalence(model, rows: list[dict], pad_id: int, plain_model=None) -> dict:
    """Loss and LoRA gradients of the job's path (packed, padding-free, on `model`) vs the plain padded
    path on the same rows, on `plain_model` when given (the 4-bit base with the same adapter), else on
    `model` itself."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    plain_model = model if plain_model is None else plain_model
    device = next(model.parameters()).device
    model.eval()  # no LoRA dropout: both passes must see the same function (gradients still flow)
    plain_model.eval()
    examples = [
        {
            "input_ids": r["input_ids"],
            "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])],
        }
        for r in rows
    ]

    def loss_and_grads(m, padding_free: bool) -> tuple[float, Any]:
        batch = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=padding_free)(examples)
        return _loss_and_grads(m, {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})

    padded, packed = loss_and_grads(plain_model, False), loss_and_grads(model, True)
    return {"loss_padded": padded[0], "loss_packed": packed[0], **_compared(padded, packed)}


def check_equivalence(cfg) -> dict:
    """The job's default path against the plain 4-bit padded path, same 8 rows and adapter, bf16."""
    from peft import PeftModel

    precision, _ = resolve_precision(cfg)
    trainer = _trained_adapter(cfg, precision)
    paths = RunPaths(cfg.run_dir)
    plain = PeftModel.from_pretrained(load_model(cfg, precision), str(paths.adapter), is_trainable=True)
    rows = read_jsonl(paths.train_tokens)[:8]
    out = equivalence(trainer.model, rows, trainer.processing_class.pad_token_id, plain_model=plain)
    return {**out, "job_base_weights": base_weights(cfg, trainer.model), "liger_modules": liger_modules(trainer.model)}


def check_graphs(cfg) -> dict:
    """job/speedups/cuda_graphs.py's replayed layers against the eager ones: one padded micro-batch of the `job` recipe,
    dropout off, loss and LoRA gradients; two eager steps give the noise floor to compare with."""
    import torch

    rcfg = with_overrides(_recipe_settings(cfg, RECIPES["job"]), LORA_DROPOUT=0.0)
    precision, _ = resolve_precision(rcfg)
    dtype = torch_dtype(precision)
    trainer = build_trainer(rcfg, RunPaths(rcfg.run_dir), precision, max_steps=1, save_strategy="no", report_to=[])
    fixed, model = trainer.data_collator, trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()

    def step() -> tuple[float, Any]:
        with torch.autocast("cuda", dtype=dtype):  # as the Trainer's forward runs
            return _loss_and_grads(model, batch)

    # Flash attention's backward adds with atomics, so two eager steps differ too: their distance is the floor.
    eager, eager_again = step(), step()
    t0 = time.perf_counter()
    release = cuda_graphs.capture_layers(model, fixed.tokens, fixed.max_length, fixed.slots, dtype, autocast=True)
    capture_s = time.perf_counter() - t0
    graph = step()
    release()
    return {
        "tokens": fixed.tokens,
        "capture_s": round(capture_s, 2),
        "layer_calls": release.calls,
        "loss_eager": eager[0],
        "loss_graph": graph[0],
        **_compared(eager, graph),
        "grad_rel_l2_eager_twice": _compared(eager, eager_again)["grad_rel_l2"],
    }


def measure_generation(cfg) -> dict:
    """The evaluate stage's default generation (base and tuned rows in shared batches): one untimed pass,
    then a timed one, so decoding kernels' first-use costs are not in the figure. Then the same rows in one
    batch through three decoders, each warmed alike: job/decode.py with its CUDA graph (the default), the
    same loop eager, and Transformers' generate; with how many rows' answers agree."""
    precision, _ = resolve_precision(cfg)
    paths = RunPaths(cfg.run_dir)
    if not (paths.adapter / "adapter_config.json").exists():
        _trained_adapter(cfg, precision)  # the trainer is dropped here; its memory goes back below
        gc.collect()
        _cuda("empty_cache")
    tok = evaluate.load_tokenizer(cfg, str(paths.adapter))
    prompts = [build_messages(cfg, r["patient"]) for r in read_jsonl(paths.eval_rows)][: cfg.EVAL_PROMPTS]
    prompts += [build_messages(cfg, s["prompt"]) for s in safety.prompts()]
    n = len(prompts)
    tuned = [False] * n + [True] * n  # each prompt twice: a base row, then a tuned row
    model = evaluate.shared_model_for_generation(evaluate.load_tuned(cfg, paths.adapter, precision), paths.adapter)
    _cuda("reset_peak_memory_stats")
    passes = {}
    for name in ("first", "timed"):
        _, passes[name] = evaluate.generate(model, tok, prompts * 2, cfg, tuned)
        log.info("generation, %s pass: %s", name, passes[name])
    # the evaluate stage's own peak, before the comparison's extra decoders
    peak = _cuda("max_memory_allocated", 0) / 2**30
    return {
        "prompts": n,
        "rows": 2 * n,
        "batch": cfg.EVAL_BATCH_SIZE,
        "max_new_tokens": cfg.MAX_NEW_TOKENS,
        "passes": passes,
        "tokens_per_s": passes["timed"]["tokens_per_s"],
        "tokens_per_s_first": passes["first"]["tokens_per_s"],
        "peak_gib": peak,
        "liger_modules": liger_modules(model),  # 0: training's patch did not reach the evaluation model
        "decoders": compare_decoders(model, tok, prompts * 2, cfg.MAX_NEW_TOKENS, cfg.TEMPLATE_DATE, tuned),
    }


def compare_decoders(
    model, tok, conversations: list, new_tokens: int, date_string: str, tuned: list[bool] | None = None
) -> dict:
    """One batch of `conversations` through each decoder, twice (the second timed); tokens/s and agreement.
    With `tuned`, a PeftModel answers the flagged rows as the tuned model (evaluate.per_row_adapter)."""
    from contextlib import nullcontext

    import torch

    enc = evaluate.prompt_batch(tok, conversations, next(model.parameters()).device, date_string)
    ids, mask, eos, pad = enc["input_ids"], enc["attention_mask"], tok.eos_token_id, tok.pad_token_id
    decoders = {
        "graph": lambda: decode.greedy(model, ids, mask, new_tokens, eos, pad, graph=True),
        "eager_loop": lambda: decode.greedy(model, ids, mask, new_tokens, eos, pad, graph=False),
        "transformers_generate": lambda: model.generate(
            **enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
        )[:, ids.shape[1] :],
    }
    if not ids.is_cuda:
        del decoders["graph"]  # CUDA graphs need CUDA (the CPU tests run this function too)
    out, answers = {}, {}
    rows = nullcontext() if tuned is None else evaluate.per_row_adapter(model, tuned)
    with torch.no_grad(), evaluate.decoding_kernels(), rows:
        for name, run in decoders.items():
            run()
            _cuda("synchronize")
            t0 = time.perf_counter()
            tokens = run()
            _cuda("synchronize")
            seconds = time.perf_counter() - t0
            answers[name] = [[t for t in row if t != pad] for row in tokens.tolist()]
            count = sum(map(len, answers[name]))
            out[name] = {"seconds": round(seconds, 3), "new_tokens": count, "tokens_per_s": round(count / seconds, 1)}
    for name in decoders.keys() - {"eager_loop"}:  # rows whose whole answer equals the eager loop's
        same = sum(a == b for a, b in zip(answers[name], answers["eager_loop"]))
        out[name]["rows_equal_to_eager_loop"] = f"{same}/{len(conversations)}"
    return out


def prepare(cfg, args) -> dict:
    """The random-weight model (once), the rows, and the card's measured matmul peak."""
    import torch

    model_dir = Path(cfg.BASE_MODEL)
    if not (model_dir / "config.json").exists():
        texts = [v for r in read_jsonl(Path(args.data)) for v in r.values() if isinstance(v, str)]
        build_random_llama(model_dir, texts, shape="llama-3.2-3b")
    paths = RunPaths(cfg.run_dir)
    sample.run(cfg, paths)
    formatting.run(cfg, paths)
    rows = read_jsonl(paths.train_tokens)
    return {
        "device": torch.cuda.get_device_name(0),
        "precision": resolve_precision(cfg)[0],
        "rows": len(rows),
        "mean_tokens_per_row": statistics.fmean(len(r["input_ids"]) for r in rows),
        "peak_tflops": measure_peak_tflops(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel", "datasets", "unsloth"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def run_part(name: str, cfg, args) -> dict:
    """What a child process measures: `name` is a recipe, a check, or `prepare`."""
    if name == "prepare":
        out = prepare(cfg, args)
    elif name in UNSLOTH_PADDING:
        out = measure_unsloth(cfg, args, UNSLOTH_PADDING[name])
    elif name in CHECKS:
        out = {}
        parts = (("equivalence", check_equivalence), ("graphs", check_graphs), ("generation", measure_generation))
        for part, measure in parts:
            try:
                out[part] = measure(cfg)
            except Exception as e:  # one failed check must not cost the other
                log.exception("%s failed", part)
                out[part] = {"failed": f"{type(e).__name__}: {e}"}
            gc.collect()  # the first check's models go before the second loads its own
            _cuda("empty_cache")
    else:
        out = measure_training(name, cfg, args)
    return {**out, "versions": _versions()}


def in_own_process(name: str, args, argv: list[str]) -> dict:
    """Run one part in a fresh Python process and return what it measured (or why it failed)."""
    result = Path(args.out) / f"part-{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    if name in UNSLOTH_PADDING and args.unsloth_site:
        # Unsloth's own stack in place of this process's path (it pins an older Transformers than the job);
        # the repository root so that `-m job.bench` imports.
        env["PYTHONPATH"] = os.pathsep.join([args.unsloth_site, str(Path(__file__).resolve().parents[1])])
    launcher = [sys.executable]
    if name in GPUS:  # torchrun: one process per GPU; rank 0 writes the result
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={GPUS[name]}"]
    else:  # one GPU: Trainer would wrap the model in DataParallel over every visible GPU
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*launcher, "-m", "job.bench", *argv, "--recipe-only", name, "--result", str(result)], env=env
    )
    if proc.returncode != 0 or not result.exists():  # one broken part must not cost the others' figures
        log.error("%s failed (exit %d); its log is above", name, proc.returncode)
        return {"failed": f"exit {proc.returncode}", "process_wall_s": time.perf_counter() - t0}
    return {**json.loads(result.read_text()), "process_wall_s": time.perf_counter() - t0}


def add_derived(r: dict, setup: dict, model_config) -> None:
    """MFU and projected hours from a recipe's figures."""
    f = flops_per_token(model_config, setup["mean_tokens_per_row"], r["lora_params"])
    r["gflops_per_token"] = f / 1e9
    r["mfu"] = r["tokens_per_s"]["median"] * f / (setup["peak_tflops"]["median"] * 1e12 * r.get("gpus", 1))
    for label, n in (("1k", 1000), ("full", FULL_DATASET_ROWS)):
        r[f"hours_{label}"] = n * setup["mean_tokens_per_row"] / r["tokens_per_s"]["median"] / 3600


# --- the report -------------------------------------------------------------------------------
def _ratio(x: dict, ref: dict | None) -> str:
    ok = ref and "tokens_per_s" in ref
    return f"{x['tokens_per_s']['median'] / ref['tokens_per_s']['median']:.2f}x" if ok else "–"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _listed(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def markdown(r: dict) -> str:
    """The README's bench section: the setup, a table row per recipe and round, a paragraph per comparison."""
    setup, usd = r["setup"], r.get("args", {}).get("usd_per_hour")
    head = "recipe|tokens/s (median)|p10–p90|s/step|vs unsloth|vs trl|MFU|peak GiB|warm-up steps".split("|")
    head += [f"full dataset ({FULL_DATASET_ROWS / 1000:.0f}k rows)", *(["full dataset, USD"] if usd else [])]
    table = [_row(head), "|" + "---|" * len(head)]
    for i, rnd in enumerate(r["rounds"]):
        tag = f" (round {i + 1})" if len(r["rounds"]) > 1 else ""
        for name, x in rnd.items():
            if name in CHECKS:
                continue
            if "tokens_per_s" not in x:
                why = x.get("skipped") or f"failed: {x.get('failed')}"
                table.append(_row([name + tag, why]) + " |" * (len(head) - 2))
                continue
            t, ratios = x["tokens_per_s"], [_ratio(x, rnd.get(UNSLOTH)), _ratio(x, rnd.get("trl"))]
            if x.get("gpus", 1) > 1:  # the peers ran on one GPU: say so where the ratio is read
                ratios = [q if q == "–" else f"{q} on {x['gpus']} GPUs" for q in ratios]
            warm = f"{x['warmup_steps']}" + ("" if x["stable"] else " (not stable: cap reached)")
            s, gib, mfu, hours = x["seconds_per_step"]["median"], x["peak_gib"], x["mfu"], x["hours_full"]
            cells = [name + tag, f"{t['median']:,.0f}", f"{t['p10']:,.0f}–{t['p90']:,.0f}", f"{s:.3f}", *ratios]
            cells += [f"{100 * mfu:.1f}%", f"{gib:.1f}", warm, f"{hours:.1f} h"]
            table.append(_row(cells + ([f"{hours * usd:.0f}"] if usd else [])))
    paragraphs = [
        f"Device: {setup['device']}, bf16 matmul peak measured {setup['peak_tflops']['median']:.0f} TFLOP/s; "
        f"precision {setup['precision']}; {setup['rows']} conversations, mean {setup['mean_tokens_per_row']:.0f} "
        f"tokens, max length 512. {_listed(setup.get('versions', {}))}.",
        "\n".join(table),
    ]
    uv = next((rnd[UNSLOTH]["versions"] for rnd in r["rounds"] if "versions" in rnd.get(UNSLOTH, {})), None)
    if uv:
        paragraphs.append(f"The unsloth process: {_listed(uv)}.")
    for rnd in r["rounds"]:
        one, two = rnd.get("job-accum2", {}), rnd.get("job-ddp2", {})
        if "tokens_per_s" in one and "tokens_per_s" in two:
            paragraphs.append(
                f"Two GPUs (DDP, batch 8 each) vs one (batch 8 x accumulation 2), same data and optimizer steps: "
                f"{two['tokens_per_s']['median']:,.0f} vs {one['tokens_per_s']['median']:,.0f} tokens/s, "
                f"{_ratio(two, one)}."
            )
    checks = next((rnd[CHECKS[0]] for rnd in r["rounds"] if CHECKS[0] in rnd), {})
    e, c, g = (checks.get(part, {}) for part in ("equivalence", "graphs", "generation"))
    if "grad_cosine" in e:
        paragraphs.append(
            f"Equivalence: the job's path (packed rows, base weights {e['job_base_weights']}) vs the plain path "
            f"(padded rows, bitsandbytes' 4-bit layers), same 8 rows and adapter, bf16: loss {e['loss_packed']:.5f} "
            f"vs {e['loss_padded']:.5f} (rel. diff {e['loss_rel_diff']:.1e}), LoRA gradient cosine "
            f"{e['grad_cosine']:.5f}, rel. L2 {e['grad_rel_l2']:.1e}."
        )
    if "grad_cosine" in c:
        paragraphs.append(
            f"CUDA graphs (job/speedups/cuda_graphs.py): one padded micro-batch of {c['tokens']:,} tokens, dropout "
            f"off, replayed layers vs eager: loss {c['loss_graph']:.5f} vs {c['loss_eager']:.5f} (rel. diff "
            f"{c['loss_rel_diff']:.1e}), LoRA gradient cosine {c['grad_cosine']:.5f}, rel. L2 {c['grad_rel_l2']:.1e} "
            f"(two eager steps: {c['grad_rel_l2_eager_twice']:.1e}; flash attention's backward is not deterministic); "
            f"captured in {c['capture_s']:.1f} s; layer calls {c['layer_calls']}."
        )
    if "liger_modules" in e and "liger_modules" in g:
        paragraphs.append(
            f"Liger's forward ran in {e['liger_modules']} modules of the trained model and in {g['liger_modules']} "
            "of the evaluated one, loaded afterwards in the same process (0: training's patch was put back)."
        )
    if "tokens_per_s" in g:
        paragraphs.append(
            f"Generation (the evaluate stage's default: {g['prompts']} prompts answered by base and tuned model as "
            f"rows of shared batches, up to {g['max_new_tokens']} new tokens, EVAL_BATCH_SIZE={g['batch']}): "
            f"{g['tokens_per_s']:,.0f} new tokens/s in the timed pass ({g['tokens_per_s_first']:,.0f} in the "
            f"first, untimed one); peak {g['peak_gib']:.1f} GiB."
        )
    if g.get("decoders"):
        speeds = [
            f"{k} {x['tokens_per_s']:,.0f}"
            + (f" ({x['rows_equal_to_eager_loop']})" if "rows_equal_to_eager_loop" in x else "")
            for k, x in g["decoders"].items()
        ]
        paragraphs.append(
            "The same rows in one batch, each decoder warmed alike (new tokens/s; rows whose answer equals the "
            f"eager loop's): {'; '.join(speeds)}."
        )
    if "failed" in checks:
        paragraphs.append(f"The checks' process failed: {checks['failed']}")
    paragraphs += [
        f"{p} failed: {checks[p]['failed']}"
        for p in ("equivalence", "graphs", "generation")
        if "failed" in checks.get(p, {})
    ]
    return "\n\n".join(paragraphs) + "\n"


def write_report(results: dict, out: Path, readme: Path | None) -> str:
    md = markdown(results)
    atomic_write_text(out / "bench.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "bench.md", md)
    if readme:
        atomic_write_text(readme, replace_readme_section(readme.read_text(), md))
    return md


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_dialogues_sample.jsonl"
    fixture = Path(__file__).parent / "fixtures" / "dialogues.jsonl"
    p = argparse.ArgumentParser(description="Side-by-side GPU benchmark of the training recipes.")
    p.add_argument("--model-dir", default="/tmp/llama-3.2-3b-random")
    p.add_argument("--data", default=str(shared if shared.exists() else fixture))
    p.add_argument("--rows", type=int, default=1000, help="conversations of the data file to train on")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per recipe, after warm-up")
    p.add_argument("--warmup-cap", type=int, default=60, help="most warm-up steps before a recipe is 'not stable'")
    p.add_argument("--stable-window", type=int, default=5, help="steps per median compared for stability")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative change of that median")
    p.add_argument(
        "--recipes",
        default=",".join(DEFAULT_PARTS),
        help="what to measure, in this order: " + ", ".join([*RECIPES, *UNSLOTH_PADDING, *CHECKS]),
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds; every other one runs the list in reverse, so order effects show"
    )
    p.add_argument("--gen-prompts", type=int, default=50, help="held-out prompts (plus the safety suite)")
    p.add_argument("--usd-per-hour", type=float, default=None, help="price of this GPU: adds a cost column")
    p.add_argument(
        "--unsloth-site",
        default="",
        help="PYTHONPATH of the unsloth process (its own stack: it pins an older Transformers)",
    )
    p.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and the parts' results")
    p.add_argument("--update-readme", type=Path, default=None, help="rewrite this README's bench section")
    p.add_argument("--recipe-only", help=argparse.SUPPRESS)  # internal: measure one part in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def bench_settings(args):
    env = {
        "BASE_MODEL": args.model_dir,
        "DATASET": args.data,
        "NUM_SAMPLES": str(args.rows),
        "EVAL_SAMPLES": str(args.gen_prompts),
        "EVAL_PROMPTS": str(args.gen_prompts),
        "BENCHMARK_TASKS": "",  # the bench times training and generation; the benchmark stage has its own
        "MAX_SEQ_LENGTH": "512",
        "OUTPUT_DIR": str(Path(args.out).resolve() / "runs"),
        "RUN_NAME": "bench",
    }
    return load_settings({**os.environ, **env}, env_file=None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = bench_settings(args)
    if args.recipe_only:  # a child: one measurement
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        measured = run_part(args.recipe_only, cfg, args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(measured, default=str))
        return 0

    import torch

    if not torch.cuda.is_available():  # (no CUDA context is made here: only the children use the GPU)
        print("make bench needs a CUDA GPU")
        return 2
    parts = [p for p in args.recipes.split(",") if p]
    known = [*RECIPES, *UNSLOTH_PADDING, *CHECKS]
    unknown = sorted(set(parts) - set(known))
    if unknown:
        print(f"unknown --recipes {', '.join(unknown)}; choose from {', '.join(known)}")
        return 2
    for name in [p for p in parts if GPUS.get(p, 1) > torch.cuda.device_count()]:
        print(f"skipping {name}: it needs {GPUS[name]} GPUs, this machine has {torch.cuda.device_count()}")
        parts.remove(name)
    t0 = time.perf_counter()
    setup = in_own_process("prepare", args, argv)
    if "failed" in setup:
        return 1
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.BASE_MODEL)
    results: dict[str, Any] = {"setup": setup, "args": vars(args) | {"update_readme": str(args.update_readme)}}
    results["rounds"] = []
    md = ""
    for i in range(args.repeat):
        rnd: dict[str, Any] = {}
        results["rounds"].append(rnd)
        for name in parts if i % 2 == 0 else parts[::-1]:
            log.info("round %d: %s ...", i + 1, name)
            rnd[name] = r = in_own_process(name, args, argv)
            if name not in CHECKS and "tokens_per_s" in r:
                add_derived(r, setup, model_config)
                t, flag = r["tokens_per_s"], "" if r["stable"] else " (not stable)"
                log.info(
                    f"{name}: {t['median']:.0f} tok/s (p10-p90 {t['p10']:.0f}-{t['p90']:.0f}), "
                    f"MFU {100 * r['mfu']:.1f}%, peak {r['peak_gib']:.1f} GiB, warm-up {r['warmup_steps']}{flag}"
                )
            results["wall_s"] = time.perf_counter() - t0
            # after every part: a run cut short keeps what it measured
            md = write_report(results, out, args.update_readme)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
