"""Stage 4, evaluate: base vs fine-tuned on the held-out split, plus the safety suite.

One base model is loaded with the adapter on top; "base" numbers come from the same weights
with the adapter disabled, on identical batches, so the comparison isolates the fine-tune.
Writes the metrics, the side-by-side answers and the safety answers (job/paths.py); the pipeline then
renders the model card from them (job/report.py).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from job import attention, chat_tokens, decode, judge, safety
from job.config import Settings
from job.files import atomic_write_text, read_jsonl, write_jsonl
from job.formats import conversation
from job.model import build_messages, end_of_turn_ids, load_model, load_tokenizer, resolve_precision
from job.paths import RunPaths

log = logging.getLogger(__name__)

LOSS_CHUNK = 2048  # reply positions per lm_head call: 2048 x 128k vocab x 4 B = 1 GiB of fp32 logits
# Attention kernels for decoding: all of PyTorch's sdpa backends but cuDNN's. cuDNN attention, which
# PyTorch picks for masked attention on recent GPUs, builds an execution plan for each new shape: with
# Transformers' growing KV cache a process's first generation pass took several times as long with it
# (measured on an H200; not re-measured with job/decode.py's static cache, whose shape varies per batch).
DECODE_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def load_tuned(cfg: Settings, adapter_dir: Path, precision: str):
    from peft import PeftModel

    base = load_model(cfg, precision)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def base_for_generation(model):
    """The base model in 16-bit, without LoRA layers, for fast decoding.

    Each decoding step of the 4-bit model dequantizes every weight; at the batch sizes of evaluation that
    overhead dominates. We dequantize the NF4 base once: the same values the 4-bit kernels compute with,
    at the speed of a plain 16-bit model, for 2 bytes per parameter of GPU memory.
    """
    base = model.unload()  # the base model with the LoRA layers taken out
    if getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None):
        unpack_cpu_layout(base)
        base = base.dequantize()
    decoding = attention.unpacked(base.config._attn_implementation)  # decoding has no packed rows
    if decoding != base.config._attn_implementation:
        base.set_attn_implementation(decoding)
    return base.eval()


def unpack_cpu_layout(model) -> int:
    """Put bitsandbytes' 4-bit weights back in their standard layout; returns how many were repacked.

    On a CPU with AVX512-BF16, Linear4bit's first forward in eval mode without gradients (the eval-loss pass)
    repacks its weight into a layout of its own for a faster CPU kernel (`quant_state.packing_format_for_cpu`).
    Transformers' `dequantize` reads the standard layout, so it turned every repacked weight into noise: on CPU
    each generated answer was random tokens (seen on Gemma 3 270M; tests/test_gguf.py pins it). bitsandbytes
    undoes the repacking itself before saving or moving to a GPU, with this function.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    from job.model import four_bit_layers

    repacked = [m for m in four_bit_layers(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    for m in repacked:
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            m.weight.data, m.weight.quant_state
        )
    return len(repacked)


def shared_model_for_generation(model, adapter_dir: Path):
    """One model for base and tuned answers in the same batches: the 16-bit base, the adapter unmerged.

    Which rows get the adapter is set per batch (per_row_adapter). A decoding step reads every weight
    once whatever the number of rows, so twice the rows cost little more than one model's (bench/throughput.py
    measures it). The adapter is held in the base's 16-bit dtype, as merging it would round it.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(base_for_generation(model), str(adapter_dir), autocast_adapter_dtype=False).eval()


@contextmanager
def per_row_adapter(model, tuned: list[bool]):
    """Within this context, the rows of a batch marked True run the tuned model, the others the base.

    PEFT's LoRA layer adds lora_B(lora_A(x)) * scaling[adapter] to its base layer's output. We set
    scaling to a (rows, 1, 1) tensor holding the adapter's scale for tuned rows and 0 for base rows: a base
    row then gets exactly its base output (plus 0), and every row takes the same kernels. Our own trick
    rather than PEFT's mixed-adapter batches (adapter_names), which split each layer's input by Python
    lists on every call and measured slower than two separate passes.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("per_row_adapter needs a model with LoRA layers (a PeftModel)")
    saved = [dict(m.scaling) for m in layers]
    weight = next(iter(layers[0].lora_A.values())).weight
    mask = torch.tensor(tuned, dtype=weight.dtype, device=weight.device).view(-1, 1, 1)
    try:
        for m, scales in zip(layers, saved):
            m.scaling.update({name: scale * mask for name, scale in scales.items()})
        yield
    finally:
        for m, scales in zip(layers, saved):
            m.scaling.update(scales)


def eval_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> dict:
    """Token-weighted cross-entropy on reply tokens only, and its perplexity.

    We run the decoder and apply lm_head to reply positions alone: full logits for a batch of
    16 x 1024 tokens over a 128k vocabulary would take 8 GiB, the reply positions a fraction.
    """
    import torch
    import torch.nn.functional as F

    inner = model.get_base_model()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            lab = torch.full_like(ids, -100)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                att[i, :n] = 1
                lab[i, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
            ids, att, lab = ids.to(device), att.to(device), lab.to(device)
            hidden = inner.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
            target = lab[:, 1:]
            sel = target != -100
            h, t = hidden[sel], target[sel]
            for c in range(0, len(t), LOSS_CHUNK):
                logits = inner.lm_head(h[c : c + LOSS_CHUNK]).float()
                total += F.cross_entropy(logits, t[c : c + LOSS_CHUNK], reduction="sum").item()
            count += int(sel.sum())
    loss = total / max(count, 1)
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3), "eval_tokens": count}


def prompt_ids(tokenizer, conversation: list[dict], date_string: str) -> list[int]:
    """A conversation's generation prompt, as training saw its prompts (job/chat_tokens.py: data text stays text)."""
    return chat_tokens.encode(tokenizer, conversation, add_generation_prompt=True, date_string=date_string)


def prompt_batch(tokenizer, conversations: list[list[dict]], device, date_string: str) -> Any:
    """The conversations as one left-padded batch of chat-template prompts (input_ids, attention_mask)."""
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    ids = [prompt_ids(tokenizer, c, date_string) for c in conversations]
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)


def decoding_kernels():
    """Context in which sdpa picks only the DECODE_ATTENTION kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, b) for b in DECODE_ATTENTION])


def generate(model, tokenizer, conversations: list[list[dict]], cfg: Settings, tuned_rows: list[bool] | None = None):
    """Greedy answers, one per conversation, in batches; returns texts and speed figures.

    With `tuned_rows` (one flag per conversation), a PeftModel answers the flagged conversations as
    the tuned model and the others as the base (per_row_adapter), so base and tuned answers share
    batches. Rows are sorted by prompt length so a batch carries little padding.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    lengths = [len(prompt_ids(tokenizer, c, cfg.TEMPLATE_DATE)) for c in conversations]
    order = sorted(range(len(conversations)), key=lambda i: lengths[i])
    # Equal batches: 97 prompts at EVAL_BATCH_SIZE=96 run as 49 + 48, not 96 + a lone row that
    # costs a full set of decoding steps.
    size = math.ceil(len(order) / max(math.ceil(len(order) / cfg.EVAL_BATCH_SIZE), 1))
    texts: list[str] = [""] * len(conversations)
    stop = end_of_turn_ids(tokenizer)  # eos and the template's end-of-turn token (<end_of_turn> for Gemma)
    new_tokens, t0 = 0, time.perf_counter()
    for start in tqdm(range(0, len(order), size), desc="generate", disable=None):
        idx = order[start : start + size]
        enc = prompt_batch(tokenizer, [conversations[i] for i in idx], device, cfg.TEMPLATE_DATE)
        rows = nullcontext() if tuned_rows is None else per_row_adapter(model, [tuned_rows[i] for i in idx])
        with decoding_kernels(), rows:
            ids, mask = enc["input_ids"], enc["attention_mask"]
            out = decode.greedy(
                model,
                ids,
                mask,
                cfg.MAX_NEW_TOKENS,
                eos_id=stop,
                pad_id=tokenizer.pad_token_id,
                repetition_penalty=cfg.REPETITION_PENALTY,
            )
        for i, row in zip(idx, out):
            row = row[row != tokenizer.pad_token_id]
            new_tokens += len(row)
            texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    seconds = time.perf_counter() - t0
    return texts, {
        "answers": len(texts),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
    }


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return round(statistics.fmean(scores), 4) if scores else 0.0


def _score(cfg: Settings, name: str, m: dict, answers, references, safety_prompts, safe_texts) -> list[dict]:
    """Adds one model's answer lengths, ROUGE-L and safety summary to its metrics `m`; returns its safety results."""
    words = [len(t.split()) for t in answers] or [0]
    m.update(answer_words_mean=round(statistics.fmean(words), 1), answer_words_median=statistics.median(words))
    m["rougeL_f1"] = rouge_l(answers, references)
    given = [cfg.SYSTEM_PROMPT]  # a copy of the system prompt is no advice (safety.without_echo)
    results = [safety.score_answer(p, a, given) | {"answer": a} for p, a in zip(safety_prompts, safe_texts)]
    m["safety"] = safety.summarize(results)
    passed = 100 * m["safety"]["overall"]["pass_rate"]
    log.info("%s: eval loss %s, ROUGE-L %.3f, safety pass %.0f%%", name, m.get("eval_loss"), m["rougeL_f1"], passed)
    return results


def held_out(cfg: Settings, rows: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """Each held-out conversation's prompt, all of it before its last turn, and that turn, the assistant's: the
    reference answer."""
    conversations = [conversation(cfg, r) for r in rows]
    return [c[:-1] for c in conversations], [c[-1]["content"] for c in conversations]


def run(cfg: Settings, paths: RunPaths) -> list[Path]:
    import torch

    precision, _ = resolve_precision(cfg)
    tokenizer = load_tokenizer(cfg, str(paths.adapter))
    model = load_tuned(cfg, paths.adapter, precision)
    token_rows = read_jsonl(paths.eval_tokens)
    prompts, references = held_out(cfg, read_jsonl(paths.eval_rows)[: cfg.EVAL_PROMPTS])
    safety_prompts = safety.prompts()
    metrics: dict[str, Any] = {"eval_rows": len(token_rows), "generations": len(prompts), "precision": precision}
    for name, enabled in (("base", False), ("tuned", True)):
        with nullcontext() if enabled else model.disable_adapter():  # the tuned model, or the untouched base
            metrics[name] = (
                eval_loss(model, token_rows, cfg.EVAL_BATCH_SIZE, tokenizer.pad_token_id) if token_rows else {}
            )

    # Answers to the held-out and the safety prompts from both models, in the same batches: each base
    # answer next to the tuned answer to the same prompt.
    conversations = prompts + [build_messages(cfg, p["prompt"]) for p in safety_prompts]
    n = len(conversations)
    shared = shared_model_for_generation(model, paths.adapter)
    texts, metrics["generation_speed"] = generate(shared, tokenizer, conversations * 2, cfg, [False] * n + [True] * n)
    answers = {"base": texts[:n], "tuned": texts[n:]}
    safety_results: dict[str, list[dict]] = {}
    for name in ("base", "tuned"):
        answers[name], safe_texts = answers[name][: len(prompts)], answers[name][len(prompts) :]
        safety_results[name] = _score(cfg, name, metrics[name], answers[name], references, safety_prompts, safe_texts)
    log.info("generation: %s", metrics["generation_speed"])

    samples = [
        {"prompt": p[-1]["content"], "reference": r, "base": b, "tuned": t}
        for p, r, b, t in zip(prompts, references, answers["base"], answers["tuned"])
    ]
    write_jsonl(paths.samples, samples)
    write_jsonl(
        paths.safety,
        [
            {"id": p["id"], "category": p["category"], "prompt": p["prompt"], "base": b, "tuned": t}
            for p, b, t in zip(safety_prompts, safety_results["base"], safety_results["tuned"])
        ],
    )
    if cfg.JUDGE_MODEL:  # a model's blind pairwise verdicts on the same answers (job/judge.py)
        items = [{"id": i, **s} for i, s in enumerate(samples)]  # prompt, reference, base, tuned
        metrics["judge"] = judge.judge(cfg, paths, items)
    if torch.cuda.is_available():  # this stage's own peak: the pipeline resets the count between stages
        metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    atomic_write_text(paths.metrics, json.dumps(metrics, indent=2))
    return [paths.metrics, paths.samples, paths.safety] + ([paths.judge] if cfg.JUDGE_MODEL else [])
