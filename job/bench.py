"""`make bench` / `python -m job.bench`: training and generation throughput, side by side, on one GPU.

Runs the job's own data, training and generation code on the Llama-3.2-3B shape (random
weights built locally: the compute per token equals the real model's) and compares, in one
process on one card:
  (a) seed   the seed recipe as published: batch 1 x accumulation 2, paged AdamW 32-bit,
             gradient checkpointing, no packing
  (b) trl    the best plain TRL setup measured before: packing + Liger kernels, batch 8
             (TRL's own defaults otherwise, which include gradient checkpointing)
  (c) job    this job's defaults (job/config.py)
For each: tokens/s (non-padding tokens through forward+backward), MFU by DESIGN.md's formula
against the bf16 matmul peak measured on this card, peak GiB, and projected wall time and cost
for 1,000 samples and for the full 257k-row dataset. Also: an equivalence check (packed vs
padded loss and LoRA gradients on the same rows) and generation tokens/s of the evaluate stage.
Writes bench.json and bench.md to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
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
        },
        "sft": {},
    },
    # The job's defaults. The bench runs at MAX_SEQ_LENGTH=512 (like the baseline figures), so batch 8
    # gives the same tokens per micro-batch as the default 4 packed rows of 1024.
    "job": {"settings": {"BATCH_SIZE": "8"}, "sft": {}},
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
        "settings": recipe["settings"] or "defaults",
        "final_loss": losses[-1] if losses else None,
    }
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def equivalence(model, rows: list[dict], pad_id: int) -> dict:
    """Loss and LoRA gradients of the packed (padding-free) path vs the padded path on the same rows."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    device = next(model.parameters()).device
    model.eval()  # no LoRA dropout: both passes must see the same function (gradients still flow)
    examples = [
        {
            "input_ids": r["input_ids"],
            "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])],
        }
        for r in rows
    ]
    results = {}
    for name, free in (("padded", False), ("packed", True)):
        batch = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=free)(examples)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
        results[name] = (loss.item(), grads)
    (l1, g1), (l2, g2) = results["padded"], results["packed"]
    cos = float(torch.nn.functional.cosine_similarity(g1, g2, dim=0))
    model.zero_grad(set_to_none=True)
    return {
        "loss_padded": l1,
        "loss_packed": l2,
        "loss_rel_diff": abs(l1 - l2) / abs(l1),
        "grad_cosine": cos,
        "grad_rel_l2": float((g1 - g2).norm() / g1.norm()),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from job import data, evaluate, format, safety
    from job.config import load_settings
    from job.io import read_jsonl
    from job.model import build_messages, resolve_precision
    from job.tiny import build_tiny_model
    from job.train import build_trainer

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_dialogues_sample.jsonl"
    p = argparse.ArgumentParser(description="Side-by-side GPU benchmark of the training recipes.")
    p.add_argument("--model-dir", default="/tmp/llama-3.2-3b-random")
    fixture = Path(__file__).parent / "fixtures" / "dialogues.jsonl"
    p.add_argument("--data", default=str(shared if shared.exists() else fixture))
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5, help="steps not timed (compilation, autotuning, allocator)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe")
    p.add_argument("--recipes", default="seed,trl,job")
    p.add_argument("--gen-prompts", type=int, default=64)
    p.add_argument("--gen-peft", action="store_true", help="also time generation on the 4-bit model + LoRA")
    p.add_argument("--usd-per-hour", type=float, default=None, help="spot price of this GPU, for the cost columns")
    p.add_argument("--out", default="bench-results")
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
        build_tiny_model(model_dir, texts, shape="llama-3.2-3b")
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
    data.run(cfg, run_dir)
    format.run(cfg, run_dir)
    rows = read_jsonl(run_dir / "data" / "train_tokens.jsonl")
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    precision, why = resolve_precision(cfg)
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
        r = train_throughput(cfg, run_dir, precision, RECIPES[name], args.warmup, args.steps)
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
    trainer = build_trainer(cfg, run_dir, precision, max_steps=3, save_strategy="no", report_to=[], disable_tqdm=True)
    trainer.train()  # a few steps so lora_B is non-zero and gradients flow through both LoRA matrices
    results["equivalence"] = equivalence(trainer.model, rows[:8], trainer.processing_class.pad_token_id)
    log.info("equivalence: %s", results["equivalence"])
    trainer.model.save_pretrained(run_dir / "adapter")
    trainer.processing_class.save_pretrained(run_dir / "adapter")
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    model = evaluate.load_tuned(cfg, run_dir, precision)
    tok = evaluate.load_tokenizer(cfg, str(run_dir / "adapter"))
    prompts = [build_messages(cfg, r["patient"]) for r in read_jsonl(run_dir / "data" / "eval.jsonl")]
    prompts += [build_messages(cfg, s["prompt"]) for s in safety.SAFETY_PROMPTS]
    n = len(prompts)
    if args.gen_peft:  # 4-bit weights + LoRA, base and tuned rows in shared batches (PEFT adapter_names)
        _, mixed = evaluate.generate(model, tok, prompts * 2, cfg, ["__base__"] * n + ["default"] * n)
        results["generation_peft_4bit"] = mixed
        log.info("generation, 4-bit + LoRA: %s", mixed)
    # What the evaluate stage does: dequantized base, then the adapter merged in.
    speed = {"answers": 0, "new_tokens": 0, "seconds": 0.0}
    for _, m in evaluate.models_for_generation(model, cfg, run_dir):
        _, s = evaluate.generate(m, tok, prompts, cfg)
        speed = {k: speed[k] + s[k] for k in speed}
    speed["tokens_per_s"] = speed["new_tokens"] / speed["seconds"]
    results["generation"] = speed | {"batch": cfg.EVAL_BATCH_SIZE, "max_new_tokens": cfg.MAX_NEW_TOKENS}
    log.info("generation: %s", results["generation"])
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    return 0


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
            f"Packed vs padded, same rows: loss {e['loss_packed']:.5f} vs {e['loss_padded']:.5f} "
            f"(rel. diff {e['loss_rel_diff']:.1e}), LoRA gradient cosine {e['grad_cosine']:.5f}, "
            f"rel. L2 {e['grad_rel_l2']:.1e}.",
        ]
    if "generation_peft_4bit" in r:
        g = r["generation_peft_4bit"]
        lines += [
            "",
            f"Generation on the 4-bit model with LoRA (base+tuned rows batched together): "
            f"{g['tokens_per_s']:,.0f} new tokens/s.",
        ]
    if "generation" in r:
        g = r["generation"]
        lines += [
            "",
            f"Generation (evaluate stage: dequantized base, adapter merged; batch {g['batch']}, up to "
            f"{g['max_new_tokens']} new tokens): {g['tokens_per_s']:,.0f} new tokens/s "
            f"({g['new_tokens']} tokens in {g['seconds']} s).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
