"""`make bench` / `python -m job.bench`: training and generation throughput, side by side, on one GPU.

Runs the job's own data, training and generation code on the Llama-3.2-3B shape (random
weights built locally: the compute per token equals the real model's) and compares, on one
card, each recipe in a process of its own (Liger patches Transformers' classes process-wide):
  (a) seed   the seed recipe as published: batch 1 x accumulation 2, paged AdamW 32-bit,
             gradient checkpointing, no packing
  (b) trl    the best plain TRL setup measured before: packing + Liger kernels, batch 8
             (TRL's own defaults otherwise, which include gradient checkpointing)
  (c) job    this job's defaults (job/config.py)
plus trl-nogc ((b) without gradient checkpointing) and one-lever variants of (c): job-nf4 (4-bit
kernels kept), job-compile, job-noliger, job-sdpa. For each: tokens/s (non-padding tokens through
forward+backward), MFU by DESIGN.md's formula against the bf16 matmul peak measured on this card,
peak GiB, and projected wall time and cost for 1,000 samples and for the full 257k-row dataset.
Also: an equivalence check (loss and LoRA gradients of the job's path, packed rows on its base
weights, vs the plain path, padded rows through bitsandbytes' 4-bit layers, same rows and adapter)
and generation tokens/s: the evaluate stage's default (base and tuned rows in shared batches), one pass
per model, and with EVAL_COMPILE's static cache.
Writes bench.json and bench.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
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

log = logging.getLogger("job.bench")

FULL_DATASET_ROWS = 256_916  # ruslanmv/ai-medical-chatbot, train split
RECIPES: dict[str, dict[str, Any]] = {
    # settings overrides, then SFTConfig overrides
    "seed": {
        "settings": {
            "BATCH_SIZE": "1",
            "GRAD_ACCUM": "2",
            "PACKING": "false",
            "GRADIENT_CHECKPOINTING": "true",
            "OPTIMIZER": "paged_adamw_32bit",
            "LIGER_KERNEL": "false",
            "ATTN_IMPLEMENTATION": "sdpa",
            "TORCH_COMPILE": "false",
            "DEQUANTIZE_BASE": "false",
        },
        "sft": {},
    },
    "trl": {
        "settings": {
            "BATCH_SIZE": "8",
            "GRAD_ACCUM": "1",
            "PACKING": "true",
            "GRADIENT_CHECKPOINTING": "true",
            "OPTIMIZER": "adamw_torch",
            "LIGER_KERNEL": "true",
            "ATTN_IMPLEMENTATION": "sdpa",
            "TORCH_COMPILE": "false",
            "DEQUANTIZE_BASE": "false",
        },
        "sft": {},
    },
    # (b) as tuned by hand: TRL ships gradient checkpointing on; the earlier 10.9k tok/s / 12.8 GiB
    # figures match a run with it off, so we measure that too.
    "trl-nogc": {
        "settings": {
            "BATCH_SIZE": "8",
            "GRAD_ACCUM": "1",
            "PACKING": "true",
            "GRADIENT_CHECKPOINTING": "false",
            "OPTIMIZER": "adamw_torch",
            "LIGER_KERNEL": "true",
            "ATTN_IMPLEMENTATION": "sdpa",
            "TORCH_COMPILE": "false",
            "DEQUANTIZE_BASE": "false",
        },
        "sft": {},
    },
    # The job's defaults. The bench runs at MAX_SEQ_LENGTH=512 (like the baseline figures), so batch 8
    # gives the same tokens per micro-batch as the default 4 packed rows of 1024.
    "job": {"settings": {"BATCH_SIZE": "8"}, "sft": {}},
    # Levers, one at a time against the job's defaults: the 4-bit kernels kept (DEQUANTIZE_BASE off);
    # regional compilation; Liger's kernels.
    "job-nf4": {"settings": {"BATCH_SIZE": "8", "DEQUANTIZE_BASE": "false"}, "sft": {}},
    "job-compile": {"settings": {"BATCH_SIZE": "8", "TORCH_COMPILE": "true"}, "sft": {}},
    "job-noliger": {"settings": {"BATCH_SIZE": "8", "LIGER_KERNEL": "false"}, "sft": {}},
    # The job's defaults with Transformers' stock sdpa: packed rows then attend through a dense
    # block-diagonal mask. Shows what job/attention.py's varlen kernel buys.
    "job-sdpa": {"settings": {"BATCH_SIZE": "8", "ATTN_IMPLEMENTATION": "sdpa"}, "sft": {}},
}


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


def measure_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


class _CountingCollator:
    """Wraps the trainer's collator to count the real (non-padding) tokens of each micro-batch."""

    def __init__(self, inner, pad_id: int):
        self.inner, self.pad_id, self.tokens = inner, pad_id, []

    def __call__(self, examples):
        batch = self.inner(examples)
        if "attention_mask" in batch:
            self.tokens.append(int(batch["attention_mask"].sum()))
        else:  # padding-free: one flat row of real tokens
            self.tokens.append(int(batch["input_ids"].numel()))
        return batch


def train_throughput(cfg, run_dir: Path, precision: str, recipe: dict, warmup: int, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from job.config import load_settings
    from job.train import build_trainer

    env = {
        **{k: str(v) for k, v in cfg.masked().items() if k not in ("HF_TOKEN", "WANDB_API_KEY")},
        **recipe["settings"],
    }
    rcfg = load_settings(env, env_file=None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(
        rcfg,
        run_dir,
        precision,
        max_steps=warmup + steps,
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        report_to=[],
        **recipe["sft"],
    )
    counter = _CountingCollator(trainer.data_collator, trainer.processing_class.pad_token_id)
    trainer.data_collator = counter
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            marks[state.global_step] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    ga = rcfg.GRAD_ACCUM
    tokens = sum(counter.tokens[warmup * ga : (warmup + steps) * ga])
    seconds = marks[warmup + steps] - marks[warmup]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    out = {
        "tokens_per_s": tokens / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens_per_step": tokens / steps,
        "seconds_per_step": seconds / steps,
        "lora_params": trainer.model.get_nb_trainable_parameters()[0],
        "liger": bool(trainer.args.use_liger_kernel),
        "compiled": rcfg.TORCH_COMPILE,
        "settings": recipe["settings"] or "defaults",
        "final_loss": losses[-1] if losses else None,
    }
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def equivalence(model, rows: list[dict], pad_id: int, plain_model=None) -> dict:
    """Loss and LoRA gradients of the job's path (packed, padding-free, on `model`) vs the plain padded
    path on the same rows, on `plain_model` when given (the 4-bit base with the same adapter), else on
    `model` itself."""
    import torch
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
    results = {}
    for name, free, m in (("padded", False, plain_model), ("packed", True, model)):
        batch = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=free)(examples)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        m.zero_grad(set_to_none=True)
        loss = m(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.requires_grad])
        m.zero_grad(set_to_none=True)
        results[name] = (loss.item(), grads)
    (l1, g1), (l2, g2) = results["padded"], results["packed"]
    cos = float(torch.nn.functional.cosine_similarity(g1, g2, dim=0))
    return {
        "loss_padded": l1,
        "loss_packed": l2,
        "loss_rel_diff": abs(l1 - l2) / abs(l1),
        "grad_cosine": cos,
        "grad_rel_l2": float((g1 - g2).norm() / g1.norm()),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from job import evaluate, formatting, safety, sample
    from job.config import load_settings
    from job.files import read_jsonl
    from job.model import build_messages, resolve_precision
    from job.random_llama import build_random_llama
    from job.train import base_weights, build_trainer

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_dialogues_sample.jsonl"
    p = argparse.ArgumentParser(description="Side-by-side GPU benchmark of the training recipes.")
    p.add_argument("--model-dir", default="/tmp/llama-3.2-3b-random")
    fixture = Path(__file__).parent / "fixtures" / "dialogues.jsonl"
    p.add_argument("--data", default=str(shared if shared.exists() else fixture))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5, help="steps not timed (compilation, autotuning, allocator)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe")
    p.add_argument("--recipes", default="seed,trl,trl-nogc,job,job-nf4,job-compile")
    p.add_argument("--gen-prompts", type=int, default=50, help="held-out prompts (plus the safety suite)")
    p.add_argument("--usd-per-hour", type=float, default=None, help="spot price of this GPU, for the cost columns")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--skip-static", action="store_true", help="time eager generation only (no compile)")
    p.add_argument("--recipe-only", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not torch.cuda.is_available():
        print("make bench needs a CUDA GPU")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        texts = [v for r in read_jsonl(Path(args.data)) for v in r.values() if isinstance(v, str)]
        build_random_llama(model_dir, texts, shape="llama-3.2-3b")
    env = {
        "BASE_MODEL": str(model_dir),
        "DATASET": args.data,
        "NUM_SAMPLES": str(args.rows),
        "EVAL_SAMPLES": str(args.gen_prompts),
        "EVAL_GENERATIONS": str(args.gen_prompts),
        "MAX_SEQ_LENGTH": "512",
        "OUTPUT_DIR": str(out / "runs"),
        "RUN_NAME": "bench",
    }
    cfg = load_settings({**os.environ, **env}, env_file=None)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    precision, why = resolve_precision(cfg)
    if args.recipe_only:  # the child process of one recipe (see below)
        r = train_throughput(cfg, run_dir, precision, RECIPES[args.recipe_only], args.warmup, args.steps)
        Path(args.result).write_text(json.dumps(r, default=str))
        return 0
    sample.run(cfg, run_dir)
    formatting.run(cfg, run_dir)
    rows = read_jsonl(run_dir / "data" / "train_tokens.jsonl")
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    peak = measure_peak_tflops()
    device = torch.cuda.get_device_name(0)
    log.info("%s: measured bf16 matmul peak %.0f TFLOP/s; %d rows, mean %.0f tokens", device, peak, len(rows), mean_len)

    from transformers import AutoConfig

    mconf = AutoConfig.from_pretrained(model_dir)
    results: dict[str, Any] = {
        "device": device,
        "peak_tflops": peak,
        "precision": precision,
        "rows": len(rows),
        "mean_tokens_per_row": mean_len,
        "recipes": {},
    }
    for name in args.recipes.split(","):
        log.info("recipe %s ...", name)
        # Each recipe in a process of its own: Liger patches Transformers' Llama classes process-wide,
        # and compiled code, allocator state and autotuning must not carry from one recipe to the next.
        result = out / f"recipe-{name}.json"
        result.unlink(missing_ok=True)
        child = [sys.executable, "-m", "job.bench", *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run([*child, "--recipe-only", name, "--result", str(result)], env=os.environ)
        if proc.returncode != 0 or not result.exists():  # one broken recipe must not cost the others' figures
            log.error("recipe %s failed (exit %d); its log is above", name, proc.returncode)
            results["failed"] = {**results.get("failed", {}), name: f"exit {proc.returncode}"}
            continue
        r = json.loads(result.read_text())
        f = flops_per_token(mconf, mean_len, r["lora_params"])
        r["gflops_per_token"] = f / 1e9
        r["mfu"] = r["tokens_per_s"] * f / (peak * 1e12)
        for label, n in (("1k", 1000), ("full", FULL_DATASET_ROWS)):
            hours = n * mean_len / r["tokens_per_s"] / 3600
            r[f"hours_{label}"] = hours
            r[f"usd_{label}"] = hours * args.usd_per_hour if args.usd_per_hour else None
        results["recipes"][name] = r
        log.info(
            "recipe %s: %.0f tok/s, MFU %.1f%%, peak %.1f GiB", name, r["tokens_per_s"], 100 * r["mfu"], r["peak_gib"]
        )
        (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))

    # Equivalence and generation on the job's own model path.
    # With static-cache generation timed below, train here as the job does with EVAL_COMPILE=true (which
    # keeps Liger off: job/train.py, use_liger).
    eq_cfg = dataclasses.replace(cfg, EVAL_COMPILE=not args.skip_static)
    trainer = build_trainer(
        eq_cfg, run_dir, precision, max_steps=3, save_strategy="no", report_to=[], disable_tqdm=True
    )
    trainer.train()  # a few steps so lora_B is non-zero and gradients flow through both LoRA matrices
    trainer.model.save_pretrained(run_dir / "adapter")
    trainer.processing_class.save_pretrained(run_dir / "adapter")
    # The plain path: the base packed in 4 bits (bitsandbytes' kernels), the same adapter, padded rows.
    from peft import PeftModel

    from job.model import load_model

    plain = PeftModel.from_pretrained(load_model(cfg, precision), str(run_dir / "adapter"), is_trainable=True)
    results["equivalence"] = equivalence(
        trainer.model, rows[:8], trainer.processing_class.pad_token_id, plain_model=plain
    )
    results["equivalence"]["job_base_weights"] = base_weights(cfg, trainer.model)
    log.info("equivalence: %s", results["equivalence"])
    del trainer, plain
    gc.collect()
    torch.cuda.empty_cache()
    tok = evaluate.load_tokenizer(cfg, str(run_dir / "adapter"))
    prompts = [build_messages(cfg, r["patient"]) for r in read_jsonl(run_dir / "data" / "eval.jsonl")]
    prompts += [build_messages(cfg, s["prompt"]) for s in safety.prompts()]
    n = len(prompts)
    passes, texts = {}, {}
    # What the evaluate stage does by default: the dequantized base with the adapter unmerged, base and
    # tuned answers as rows of the same batches (eager decoding).
    shared = evaluate.shared_model_for_generation(evaluate.load_tuned(cfg, run_dir, precision), run_dir)
    texts["shared"], passes["shared-eager"] = evaluate.generate(shared, tok, prompts * 2, cfg, [False] * n + [True] * n)
    log.info("generation, base and tuned rows in shared batches: %s", passes["shared-eager"])
    # Check: a base row of a shared batch must answer exactly as the base model alone in a batch of the
    # same shape. (Against a batch of another shape it need not: bf16 matmuls then round differently, and
    # greedy decoding of random weights sits on near-ties. Measured on an H200: the base alone at 166 vs
    # 83 rows shared a mean 3.7 of ~18 answer tokens; at 83 rows twice, all answers were identical.)
    with shared.disable_adapter():
        base_alone, _ = evaluate.generate(shared, tok, prompts * 2, cfg)
    same_shape = sum(a == b for a, b in zip(texts["shared"][:n], base_alone[:n]))
    del shared
    gc.collect()
    torch.cuda.empty_cache()
    # For comparison, one model per pass (what EVAL_COMPILE does): dequantized base, then the adapter
    # merged in; each with the static cache (compiled decoding step; the first pass pays the compile)
    # and with the plain dynamic cache in eager mode.
    for name, m in evaluate.models_for_generation(evaluate.load_tuned(cfg, run_dir, precision), run_dir):
        for mode in ("eager",) if args.skip_static else ("static", "eager"):
            texts[name, mode], passes[f"{name}-{mode}"] = evaluate.generate(
                m, tok, prompts, cfg, static_cache=mode == "static"
            )
            log.info("generation %s %s: %s", name, mode, passes[f"{name}-{mode}"])

    results["generation"] = {
        "batch": cfg.EVAL_BATCH_SIZE,
        "max_new_tokens": cfg.MAX_NEW_TOKENS,
        "prompts": n,
        "passes": passes,
        "tokens_per_s_shared": _rate(passes, "shared-eager"),
        "tokens_per_s_eager": _rate(passes, "base-eager", "tuned-eager"),
        "shared_base_rows_equal_base_alone": same_shape,
    }
    if not args.skip_static:
        results["generation"] |= _static_figures(passes, texts)
    log.info("generation: %s", {k: v for k, v in results["generation"].items() if k != "passes"})
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _rate(passes: dict, *keys: str) -> float:
    """New tokens per second over the given generation passes together."""
    return sum(passes[k]["new_tokens"] for k in keys) / sum(passes[k]["seconds"] for k in keys)


def _static_figures(passes: dict, texts: dict) -> dict:
    return {
        "tokens_per_s_stage": _rate(passes, "base-static", "tuned-static"),  # what evaluate does, compile included
        "tokens_per_s_steady": _rate(passes, "tuned-static"),  # compiled step reused
        "compile_s": passes["base-static"]["seconds"] - passes["tuned-static"]["seconds"],
        # the compiled graph must see the merged weights: tuned answers differ from base ones
        "static_tuned_differs_from_base": sum(
            a != b for a, b in zip(texts["tuned", "static"], texts["base", "static"])
        ),
        "static_equals_eager": {
            name: sum(a == b for a, b in zip(texts[name, "static"], texts[name, "eager"])) for name in ("base", "tuned")
        },
        # greedy decoding of a random-weight model sits on near-ties, so bf16 rounding differences
        # (compiled vs eager) change later tokens; the shared prefix shows where they part
        "static_eager_common_prefix_chars": {
            name: statistics.fmean(
                len(os.path.commonprefix([a, b])) for a, b in zip(texts[name, "static"], texts[name, "eager"])
            )
            for name in ("base", "tuned")
        },
        "mean_answer_chars": statistics.fmean(len(t) for t in texts["tuned", "eager"]),
    }


def markdown(r: dict) -> str:
    base = r["recipes"].get("trl", {}).get("tokens_per_s")  # (b) as the issue defines it
    lines = [
        f"Device: {r['device']} (bf16 matmul peak measured {r['peak_tflops']:.0f} TFLOP/s), "
        f"precision {r['precision']}, {r['rows']} conversations, mean {r['mean_tokens_per_row']:.0f} tokens.",
        "",
        "| recipe | tokens/s | vs (b) trl | MFU | peak GiB | 1k samples | full dataset | full, USD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, x in r["recipes"].items():
        ratio = f"{x['tokens_per_s'] / base:.2f}x" if base else "–"
        usd = f"{x['usd_full']:.0f}" if x.get("usd_full") else "–"
        lines.append(
            f"| {name} | {x['tokens_per_s']:,.0f} | {ratio} | {100 * x['mfu']:.1f}% | {x['peak_gib']:.1f} | "
            f"{60 * x['hours_1k']:.1f} min | {x['hours_full']:.1f} h | {usd} |"
        )
    if "equivalence" in r:
        e = r["equivalence"]
        lines += [
            "",
            f"Job path (packed rows, base weights {e.get('job_base_weights', 'as configured')}) vs plain path "
            f"(padded rows, bitsandbytes' 4-bit layers), same rows and adapter: loss {e['loss_packed']:.5f} vs "
            f"{e['loss_padded']:.5f} "
            f"(rel. diff {e['loss_rel_diff']:.1e}), LoRA gradient cosine {e['grad_cosine']:.5f}, "
            f"rel. L2 {e['grad_rel_l2']:.1e}.",
        ]
    if "generation" in r:
        g = r["generation"]
        same = g.get("shared_base_rows_equal_base_alone")
        same = "" if same is None else f" (base rows answer as the base alone, same batch shape: {same}/{g['prompts']})"
        lines += [
            "",
            f"Generation ({g['prompts']} prompts answered by the base and the tuned model, up to "
            f"{g['max_new_tokens']} new tokens, EVAL_BATCH_SIZE={g['batch']} rows; the base dequantized "
            "to 16-bit), new tokens/s:",
            "",
            "| path | tokens/s |",
            "|---|---|",
            f"| eager, base and tuned rows in shared batches (the evaluate stage's default){same} | "
            f"{g['tokens_per_s_shared']:,.0f} |",
            f"| eager, one pass per model (adapter merged) | {g['tokens_per_s_eager']:,.0f} |",
        ]
    if "generation" in r and "tokens_per_s_steady" in r["generation"]:
        g = r["generation"]
        lines += [
            f"| EVAL_COMPILE: static cache + compiled step, both passes, {g['compile_s']:.0f} s compile included | "
            f"{g['tokens_per_s_stage']:,.0f} |",
            f"| EVAL_COMPILE, steady (tuned pass) | {g['tokens_per_s_steady']:,.0f} |",
            "",
            f"Static vs eager answers identical: base {g['static_equals_eager']['base']}/{g['prompts']}, tuned "
            f"{g['static_equals_eager']['tuned']}/{g['prompts']}; tuned differs from base in "
            f"{g['static_tuned_differs_from_base']}/{g['prompts']}. Mean shared prefix of static and eager "
            f"answers: base {g['static_eager_common_prefix_chars']['base']:.0f}, tuned "
            f"{g['static_eager_common_prefix_chars']['tuned']:.0f} of {g['mean_answer_chars']:.0f} characters.",
        ]
    for name, err in r.get("failed", {}).items():
        lines += ["", f"Recipe {name} failed: {err}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
