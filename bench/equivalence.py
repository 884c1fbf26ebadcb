"""The fast paths give the plain paths' results: training's packed rows on the job's base weights against padded
rows through bitsandbytes' 4-bit layers (loss and LoRA gradients), CUDA-graphed layers against eager ones, and
the decoders against each other. The throughput bench (bench/throughput.py) runs the checks in one process on
the GPU; `equivalence` and `compare_decoders` run on CPU in the tests too.
"""

from __future__ import annotations

import time
from typing import Any

from job import decode, evaluate
from job.config import with_overrides
from job.files import read_jsonl
from job.model import load_model, model_code_restored, resolve_precision, torch_dtype
from job.paths import RunPaths
from job.speedups import cuda_graphs
from job.train import base_weights, build_trainer


def trained_adapter(cfg, precision: str):
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
    trainer = trained_adapter(cfg, precision)
    paths = RunPaths(cfg.run_dir)
    plain = PeftModel.from_pretrained(load_model(cfg, precision), str(paths.adapter), is_trainable=True)
    rows = read_jsonl(paths.train_tokens)[:8]
    out = equivalence(trainer.model, rows, trainer.processing_class.pad_token_id, plain_model=plain)
    return {**out, "job_base_weights": base_weights(cfg, trainer.model), "liger_modules": liger_modules(trainer.model)}


def check_graphs(cfg) -> dict:
    """job/speedups/cuda_graphs.py's replayed layers against the eager ones: one padded micro-batch of `cfg` (the
    bench's `job` recipe), dropout off, loss and LoRA gradients; two eager steps give the noise floor to compare
    with."""
    import torch

    rcfg = with_overrides(cfg, LORA_DROPOUT=0.0)
    precision, _ = resolve_precision(rcfg)
    dtype = torch_dtype(precision)
    trainer = build_trainer(rcfg, RunPaths(rcfg.run_dir), precision, max_steps=1, save_strategy="no", report_to=[])
    fixed, model = trainer.data_collator, trainer.model
    if not isinstance(fixed, cuda_graphs.FixedShape):  # the job did not take the graphs on this model: nothing to check
        attn = model.config._attn_implementation
        return {"skipped": cuda_graphs.why_not(rcfg, compiled=False, attn=attn) or "the job runs these layers eager"}
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
    sync = torch.cuda.synchronize if ids.is_cuda else lambda: None
    if not ids.is_cuda:
        del decoders["graph"]  # CUDA graphs need CUDA (the CPU tests run this function too)
    out, answers = {}, {}
    rows = nullcontext() if tuned is None else evaluate.per_row_adapter(model, tuned)
    with torch.no_grad(), evaluate.decoding_kernels(), rows:
        for name, run in decoders.items():
            run()
            sync()
            t0 = time.perf_counter()
            tokens = run()
            sync()
            seconds = time.perf_counter() - t0
            answers[name] = [[t for t in row if t != pad] for row in tokens.tolist()]
            count = sum(map(len, answers[name]))
            out[name] = {"seconds": round(seconds, 3), "new_tokens": count, "tokens_per_s": round(count / seconds, 1)}
    for name in decoders.keys() - {"eager_loop"}:  # rows whose whole answer equals the eager loop's
        same = sum(a == b for a, b in zip(answers[name], answers["eager_loop"]))
        out[name]["rows_equal_to_eager_loop"] = f"{same}/{len(conversations)}"
    return out
