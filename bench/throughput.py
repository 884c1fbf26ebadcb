"""`make bench` / `python -m bench.throughput`: training and generation throughput, side by side, on one GPU.

Runs the job's own data, training and generation code on the Llama-3.2-3B shape, or another of
bench/shapes.py's (`--shape`; random weights built locally: the compute per token equals the real model's), on
the first `--rows` conversations of the data file at MAX_SEQ_LENGTH=512, and compares these training recipes:
  seed         the seed recipe as published: batch 1 x accumulation 2, paged AdamW 32-bit,
               gradient checkpointing, no packing, bitsandbytes' 4-bit layers
  trl          plain TRL: packing + Liger kernels, batch 8, TRL's defaults otherwise (which include
               gradient checkpointing), 4-bit layers
  trl-nogc     trl without gradient checkpointing
  job          this job's defaults (job/config.py) at the peers' batch of 8 (BATCH_SIZE=8; the default is 1)
  plain        the job with every lever off (padded rows, sdpa, 4-bit layers, no graphs, Liger or compile)
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
  axolotl      Axolotl's fastest QLoRA path, when Axolotl imports in its process (`--axolotl-site`; not in the
               default list): 4-bit base, the job's LoRA, multipack packing (8 rows of 512) with torch's varlen
               flash kernel, its LoRA kernels, the Liger plugin (bench/axolotl_recipe.py)
Every measurement runs in a process of its own (Liger patches Transformers process-wide; compiled code,
autotuning and allocator state must not carry over), and the parent process never touches the GPU.

How a recipe is timed: bench/timing.py (warm-up until the step rate is stable, then `--steps` timed steps).
Reported: the median per-step tokens/s, its p10-p90 spread, seconds per step, peak GiB, MFU by DESIGN.md's
formula against the bf16 matmul peak measured on the card, and the warm-up steps used.

Also, in one process (`checks`): the equivalence checks of bench/equivalence.py (loss and LoRA gradients of the
job's path vs the plain path; the CUDA-graphed layers vs the eager ones), and the evaluate stage's generation speed
(base and tuned rows in shared batches), one untimed pass then a timed one, then three decoders on the same rows.

`--help` lists the options; `--out` gets bench.json (every per-step figure) and bench.md (the README section,
bench/throughput_report.py).
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

from bench.axolotl_recipe import measure_axolotl
from bench.equivalence import check_equivalence, check_graphs, compare_decoders, liger_modules, trained_adapter
from bench.shapes import SHAPES, build_random
from bench.throughput_report import AXOLOTL, CHECK_PARTS, CHECKS, FULL_DATASET_ROWS, UNSLOTH, write_report
from bench.timing import cuda, measure_peak_tflops, timed_train
from job import evaluate, formatting, safety, sample
from job.config import load_settings
from job.files import read_jsonl
from job.formats import conversation
from job.model import build_messages, lora_targets, resolve_precision
from job.paths import RunPaths
from job.tiny_model import build_tokenizer
from job.train import build_trainer

log = logging.getLogger("bench.throughput")
REPO = Path(__file__).resolve().parents[1]

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
    # The job with every lever off (bench/parity.py's `plain` variant): padded rows, stock sdpa, bitsandbytes'
    # 4-bit layers, no CUDA graphs, no Liger, no compile; what `job` is measured against per model family. Its
    # micro-batches of 8 are not split (not a job-* recipe: no lean economies), the stronger baseline.
    "plain": {
        "BATCH_SIZE": "8",
        "PACKING": "false",
        "ATTN_IMPLEMENTATION": "sdpa",
        "DEQUANTIZE_BASE": "false",
        "CUDA_GRAPHS": "false",
        "LIGER_KERNEL": "false",
        "TORCH_COMPILE": "false",
    },
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
# Unsloth's padding, by recipe name. Its automatic choice keeps padding-free batches on cards it has no
# measurement for (H100/H200 among them); padded batches with per-block compilation were its fastest
# path on an H200 (issue 18), so `unsloth` forces them and `unsloth-pf` measures the other.
UNSLOTH_PADDING = {UNSLOTH: "padded", "unsloth-pf": "padding_free"}
# Everything --recipes can name.
PARTS = [*RECIPES, *UNSLOTH_PADDING, AXOLOTL, CHECKS]
# The order of a default run: the figures the targets compare first, so a run cut short keeps them.
DEFAULT_PARTS = [
    *("job", UNSLOTH, "job-nf4", "trl", "trl-nogc", "seed", "job-nographs", "job-nf4-nographs"),
    CHECKS,  # one process checks equivalence, then times generation, as the job evaluates after training
    *("job-noliger", "job-sdpa", "job-compile"),
    *("job-accum2", "job-ddp2"),
]


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


# --- measurements (each in a process of its own, on the GPU) --------------------------------------
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
    # the accumulation the trainer runs: the memory-lean path splits micro-batches (speedups/nf4_base.py)
    grad_accum = trainer.args.gradient_accumulation_steps
    return {
        **timed_train(trainer, grad_accum, args, profile_to=Path(args.out) / f"profile-{name}.txt"),
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
    out = timed_train(trainer, 1, args)
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
        target_modules=lora_targets(cfg, model),
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


def measure_generation(cfg) -> dict:
    """The evaluate stage's default generation (base and tuned rows in shared batches): one untimed pass,
    then a timed one, so decoding kernels' first-use costs are not in the figure. Then the same rows in one
    batch through three decoders, each warmed alike: job/decode.py with its CUDA graph (the default), the
    same loop eager, and Transformers' generate; with how many rows' answers agree."""
    precision, _ = resolve_precision(cfg)
    paths = RunPaths(cfg.run_dir)
    if not (paths.adapter / "adapter_config.json").exists():
        trained_adapter(cfg, precision)  # the trainer is dropped here; its memory goes back below
        gc.collect()
        cuda("empty_cache")
    tok = evaluate.load_tokenizer(cfg, str(paths.adapter))
    prompts = [conversation(cfg, r)[:-1] for r in read_jsonl(paths.eval_rows)][: cfg.EVAL_PROMPTS]
    prompts += [build_messages(cfg, s["prompt"]) for s in safety.prompts()]
    n = len(prompts)
    tuned = [False] * n + [True] * n  # each prompt twice: a base row, then a tuned row
    model = evaluate.shared_model_for_generation(evaluate.load_tuned(cfg, paths.adapter, precision), paths.adapter)
    cuda("reset_peak_memory_stats")
    passes = {}
    for name in ("first", "timed"):
        _, passes[name] = evaluate.generate(model, tok, prompts * 2, cfg, tuned)
        log.info("generation, %s pass: %s", name, passes[name])
    # the evaluate stage's own peak, before the comparison's extra decoders
    peak = cuda("max_memory_allocated", 0) / 2**30
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


def prepare(cfg, args) -> dict:
    """The random-weight model (once), the rows, and the card's measured matmul peak."""
    import torch

    model_dir = Path(cfg.BASE_MODEL)
    if not (model_dir / "config.json").exists():
        # a 32k-token BPE trained on the data (job/tiny_model.py's, with its chat template): tokens per conversation
        # close to Llama 3's
        texts = [v for r in read_jsonl(Path(args.data)) for v in r.values() if isinstance(v, str)]
        build_random(args.shape, model_dir, build_tokenizer(texts, vocab_size=32000))
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
    names = ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel", "datasets", "unsloth", "axolotl")
    for name in names:
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
    elif name == AXOLOTL:
        out = measure_axolotl(cfg, args)
    elif name == CHECKS:
        out = {}
        job_recipe = _recipe_settings(cfg, RECIPES["job"])  # the CUDA graphs are checked on it
        parts = (
            ("equivalence", check_equivalence, cfg),
            ("graphs", check_graphs, job_recipe),
            ("generation", measure_generation, cfg),
        )
        for part, measure, settings in [p for p in parts if p[0] in args.checks.split(",")]:
            try:
                out[part] = measure(settings)
            except Exception as e:  # one failed check must not cost the other
                log.exception("%s failed", part)
                out[part] = {"failed": f"{type(e).__name__}: {e}"}
            gc.collect()  # the first check's models go before the second loads its own
            cuda("empty_cache")
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
        # the repository root so that `-m bench.throughput` imports.
        env["PYTHONPATH"] = os.pathsep.join([args.unsloth_site, str(REPO)])
    if name == AXOLOTL and args.axolotl_site:  # the same for Axolotl's stack (it pins Transformers 5.16)
        env["PYTHONPATH"] = os.pathsep.join([args.axolotl_site, str(REPO)])
    launcher = [sys.executable]
    if name in GPUS:  # torchrun: one process per GPU; rank 0 writes the result
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={GPUS[name]}"]
    else:  # one GPU: Trainer would wrap the model in DataParallel over every visible GPU
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*launcher, "-m", "bench.throughput", *argv, "--recipe-only", name, "--result", str(result)], env=env
    )
    if proc.returncode != 0 or not result.exists():  # one broken part must not cost the others' figures
        log.error("%s failed (exit %d); its log is above", name, proc.returncode)
        return {"failed": f"exit {proc.returncode}", "process_wall_s": time.perf_counter() - t0}
    return {**json.loads(result.read_text()), "process_wall_s": time.perf_counter() - t0}


def cap_gpu_memory(gib: float | None) -> None:
    """Let this process use at most `gib` GiB of its GPU (all of it when None), before anything is allocated: the
    caching allocator then fails past the cap as a card of that size would, and the job's DEQUANTIZE_BASE=auto
    weighs the same budget (job/speedups/nf4_base.py usable_gpu_memory)."""
    import torch

    if gib is None or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    if gib * 2**30 > total:
        raise SystemExit(f"--gpu-memory {gib:g} GiB is more than this GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, 0)
    log.info("GPU memory capped to %.1f of %.1f GiB for this process", gib, total / 2**30)


def add_derived(r: dict, setup: dict, model_config) -> None:
    """MFU and projected hours from a recipe's figures."""
    f = flops_per_token(model_config, setup["mean_tokens_per_row"], r["lora_params"])
    r["gflops_per_token"] = f / 1e9
    r["mfu"] = r["tokens_per_s"]["median"] * f / (setup["peak_tflops"]["median"] * 1e12 * r.get("gpus", 1))
    for label, n in (("1k", 1000), ("full", FULL_DATASET_ROWS)):
        r[f"hours_{label}"] = n * setup["mean_tokens_per_row"] / r["tokens_per_s"]["median"] / 3600


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    shared = REPO.parent / "shared" / "data" / "medical_dialogues_sample.jsonl"
    fixture = REPO / "job" / "fixtures" / "dialogues.jsonl"
    p = argparse.ArgumentParser(description="Side-by-side GPU benchmark of the training recipes.")
    p.add_argument("--shape", default="llama-3.2-3b", choices=SHAPES, help="the model shape (bench/shapes.py)")
    p.add_argument("--model-dir", default=None, help="where its random weights are kept (default /tmp/SHAPE-random)")
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        help="GiB of the GPU each recipe's process may use (torch's per-process memory fraction): a 24 or 16 GB "
        "card's budget on a larger card; DEQUANTIZE_BASE=auto chooses by it",
    )
    p.add_argument("--data", default=str(shared if shared.exists() else fixture))
    p.add_argument("--rows", type=int, default=1000, help="conversations of the data file to train on")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per recipe, after warm-up")
    p.add_argument("--warmup-cap", type=int, default=60, help="most warm-up steps before a recipe is 'not stable'")
    p.add_argument("--stable-window", type=int, default=5, help="steps per median compared for stability")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest relative change of that median")
    p.add_argument(
        "--recipes",
        default=",".join(DEFAULT_PARTS),
        help="what to measure, in this order: " + ", ".join(PARTS) + f" (default: all but unsloth-pf, {AXOLOTL})",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds; every other one runs the list in reverse, so order effects show"
    )
    p.add_argument(
        "--checks",
        default=",".join(CHECK_PARTS),
        help="what the `checks` part runs, of " + ", ".join(CHECK_PARTS) + " (a family run needs no generation)",
    )
    p.add_argument("--gen-prompts", type=int, default=50, help="held-out prompts (plus the safety suite)")
    p.add_argument("--usd-per-hour", type=float, default=None, help="price of this GPU: adds a cost column")
    p.add_argument(
        "--unsloth-site",
        default="",
        help="PYTHONPATH of the unsloth process (its own stack: it pins an older Transformers)",
    )
    p.add_argument("--axolotl-site", default="", help="PYTHONPATH of the axolotl process (its own pinned stack)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md and the parts' results")
    p.add_argument("--update-readme", type=Path, default=None, help="rewrite this README's bench section")
    p.add_argument("--recipe-only", help=argparse.SUPPRESS)  # internal: measure one part in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.checks.split(",")) - set(CHECK_PARTS)
    if unknown:
        p.error(f"--checks {','.join(sorted(unknown))}: choose from {', '.join(CHECK_PARTS)}")
    args.model_dir = args.model_dir or f"/tmp/{args.shape}-random"
    return args


def bench_settings(args):
    env = {
        "BASE_MODEL": args.model_dir,
        "DATASET": args.data,
        "NUM_SAMPLES": str(args.rows),
        "EVAL_SAMPLES": str(args.gen_prompts),
        "EVAL_PROMPTS": str(args.gen_prompts),
        "BENCHMARK_TASKS": "",  # the bench times training and generation; the benchmark stage has its own
        "MAX_SEQ_LENGTH": "512",
        # Random weights know no turn end, so auto would train the turn tokens; the instruct models the bench
        # stands for know theirs (job/turn_tokens.py), and no peer trains them.
        "TRAIN_TURN_TOKENS": "false",
        "OUTPUT_DIR": str(Path(args.out).resolve() / "runs"),
        "RUN_NAME": "bench",
    }
    return load_settings({**os.environ, **env}, env_file=None)


def _parts(args) -> list[str] | None:
    """The parts of --recipes this machine can run, or None (with the reason printed) if the bench cannot run."""
    import torch

    if not torch.cuda.is_available():  # (no CUDA context is made here: only the children use the GPU)
        print("make bench needs a CUDA GPU")
        return None
    parts = [p for p in args.recipes.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown --recipes {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        return None
    for name in [p for p in parts if GPUS.get(p, 1) > torch.cuda.device_count()]:
        print(f"skipping {name}: it needs {GPUS[name]} GPUs, this machine has {torch.cuda.device_count()}")
        parts.remove(name)
    return parts


def run_rounds(parts: list[str], setup: dict, args, argv: list[str]) -> str:
    """Each part in a process of its own, `--repeat` rounds; the report rewritten after every part, so a run cut
    short keeps what it measured. Returns the report."""
    from transformers import AutoConfig

    t0 = time.perf_counter()
    model_config = AutoConfig.from_pretrained(args.model_dir)
    results: dict[str, Any] = {"setup": setup, "args": vars(args) | {"update_readme": str(args.update_readme)}}
    results["rounds"] = []
    md = ""
    for i in range(args.repeat):
        rnd: dict[str, Any] = {}
        results["rounds"].append(rnd)
        for name in parts if i % 2 == 0 else parts[::-1]:
            log.info("round %d: %s ...", i + 1, name)
            rnd[name] = r = in_own_process(name, args, argv)
            if name != CHECKS and "tokens_per_s" in r:
                add_derived(r, setup, model_config)
                t, flag = r["tokens_per_s"], "" if r["stable"] else " (not stable)"
                log.info(
                    f"{name}: {t['median']:.0f} tok/s (p10-p90 {t['p10']:.0f}-{t['p90']:.0f}), "
                    f"MFU {100 * r['mfu']:.1f}%, peak {r['peak_gib']:.1f} GiB, warm-up {r['warmup_steps']}{flag}"
                )
            results["wall_s"] = time.perf_counter() - t0
            md = write_report(results, Path(args.out), args.update_readme)
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.recipe_only:  # a child: one measurement
        cap_gpu_memory(args.gpu_memory)
        cfg = bench_settings(args)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        measured = run_part(args.recipe_only, cfg, args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(measured, default=str))
        return 0
    parts = _parts(args)
    if parts is None:
        return 2
    setup = in_own_process("prepare", args, argv)
    if "failed" in setup:
        return 1
    print(run_rounds(parts, setup, args, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
