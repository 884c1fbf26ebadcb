"""Time the benchmark stage on the Llama-3.2-3B shape with random weights: `python -m job.bench_benchmark`.

For choosing BENCHMARK_LIMIT on a GPU machine that cannot reach the Hub. The questions are synthetic: the
bundled fixture questions (job/fixtures/benchmark), lengthened with filler words to about the length of each
task's real questions (WORDS). The adapter is random, so accuracy is near chance for both models; the
stage's time, its peak memory and the prompt lengths are what this measures. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

from job import benchmark
from job.__main__ import FIXTURE
from job.config import Settings, with_overrides
from job.files import read_jsonl, write_jsonl
from job.paths import RunPaths
from job.random_llama import build_random_llama

# Words in each task's question text (Llama 3 makes ~1.3 tokens of a word): my estimates of the real sets.
WORDS = {
    "medqa_4options": ("sent1", 120),
    "medmcqa": ("question", 14),
    "pubmedqa": ("context", 230),
    "mmlu_anatomy": ("question", 15),
    "mmlu_clinical_knowledge": ("question", 18),
    "mmlu_college_biology": ("question", 40),
    "mmlu_college_medicine": ("question", 60),
    "mmlu_medical_genetics": ("question", 15),
    "mmlu_professional_medicine": ("question", 150),
}


def random_adapter(model_dir: Path, adapter: Path) -> None:
    """A LoRA adapter (r8 on q_proj,v_proj) with random, non-zero lora_B: base and tuned answers differ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter)


def synthetic_questions(paths: RunPaths, limit: int, vocab: list[str]) -> None:
    """`limit` questions per task: the fixture's, cycled, each lengthened by WORDS random words of `vocab`."""
    rng = random.Random(0)
    for task, (field, words) in WORDS.items():
        base = read_jsonl(benchmark.FIXTURE / f"{task}.jsonl")
        rows = []
        for i in range(limit):
            d = copy.deepcopy(base[i % len(base)])
            filler = " ".join(rng.choice(vocab) for _ in range(words))
            if field == "context":
                d["context"]["contexts"] = [filler]
            else:
                d[field] = filler + " " + d[field]
            rows.append(d)
        write_jsonl(paths.benchmark_data / f"{task}.jsonl", rows)


def mean_prompt_tokens(model_dir: Path, paths: RunPaths, limit: int) -> dict[str, int]:
    """Each task's mean prompt length in tokens of the random model's tokenizer, as lm-eval renders it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for task in WORDS:
        t = benchmark._load_task(task, paths.benchmark_data / f"{task}.jsonl")
        docs = list(t.eval_docs)[:limit]
        out[task] = round(sum(len(tok.encode(t.doc_to_text(d))) for d in docs) / len(docs))
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=Settings().BENCHMARK_LIMIT, help="BENCHMARK_LIMIT to time")
    p.add_argument("--quantization", default="nf4", choices=("nf4", "none"))
    p.add_argument("--work", default="/tmp/bench-benchmark", help="model and run directory")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--shape", default="llama-3.2-3b", choices=("llama-3.2-3b", "tiny"), help="tiny: a CPU smoke run")
    args = p.parse_args(argv)
    limit, quant, work, out = args.limit, args.quantization, Path(args.work), Path(args.out)
    model_dir = work / f"{args.shape}-random"
    t_all = time.perf_counter()
    texts = [v for r in read_jsonl(FIXTURE) for v in r.values() if isinstance(v, str)]
    if not (model_dir / "config.json").exists():
        t = time.perf_counter()
        build_random_llama(model_dir, texts, shape=args.shape)
        print(f"built model in {time.perf_counter() - t:.1f} s", flush=True)
    paths = RunPaths(work / f"run-{quant}-{limit}")
    if not (paths.adapter / "adapter_config.json").exists():
        random_adapter(model_dir, paths.adapter)
    synthetic_questions(paths, limit, " ".join(texts).split())
    tokens = mean_prompt_tokens(model_dir, paths, limit)
    print("mean prompt tokens per question (this random tokenizer):", tokens, flush=True)

    cfg = with_overrides(Settings(), BASE_MODEL=str(model_dir), BENCHMARK_LIMIT=limit, QUANTIZATION=quant)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    benchmark.run(cfg, paths)
    stage = time.perf_counter() - t
    result = json.loads(paths.benchmark.read_text())
    summary = {
        "quantization": quant,
        "limit": limit,
        "stage_seconds": round(stage, 1),
        "per_task_seconds": result["seconds"],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "mean_prompt_tokens": tokens,
        "tasks": {
            k: {kk: v[kk] for kk in ("n", "base", "tuned", "difference", "ci95")} for k, v in result["tasks"].items()
        },
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "script_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(summary, indent=1), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"benchmark-{quant}-{limit}.json").write_text(json.dumps(summary, indent=1))
    (out / "card.md").write_text(benchmark.card_section(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
