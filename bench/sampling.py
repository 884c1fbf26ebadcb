"""Time the sample and format stages on a large dataset at several WORKERS, and check their files are the same.

The dataset is made here from real rows (--source) repeated to --rows rows, each copy's patient text marked with
its copy number so that duplicate removal keeps it (copies of held-out rows are still dropped as held-out overlap,
as they share 13 words in a row). Each WORKERS value runs the job's own stage functions (job/sample.py,
job/formatting.py) into its own run directory; the script prints rows a second per stage and whether every file
is byte-identical to the first WORKERS value's. Offline: the tokenizer is a local folder (--tokenizer; without
it a 32k-token BPE is trained on the source rows, close to Llama 3's tokens per conversation but not its speed).

    python bench/sampling.py --source rows.jsonl --rows 257000 --workers auto --tokenizer /models/llama-3.2-3b
    python bench/sampling.py --source rows.jsonl --rows 30000 --num-samples 29000 --workers 1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job package, when run as a script

from job import formatting, parallel, sample  # noqa: E402
from job.config import load_settings  # noqa: E402
from job.errors import ConfigError  # noqa: E402
from job.files import read_jsonl  # noqa: E402
from job.paths import RunPaths  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "job" / "fixtures" / "dialogues.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(FIXTURE), help="JSONL of real rows (Description, Patient, Doctor)")
    p.add_argument("--rows", type=int, default=257_000, help="rows of the dataset made from --source")
    p.add_argument(
        "--num-samples",
        type=int,
        default=0,
        help="NUM_SAMPLES (default: 75%% of --rows: of the 2,656 real rows about 12%% are dropped, mostly for "
        "sharing 13 words with a held-out row, and the copies of held-out rows go too, EVAL_SAMPLES / source rows "
        "of them; with a small --source give a lower number)",
    )
    p.add_argument("--eval-samples", type=int, default=100, help="EVAL_SAMPLES")
    p.add_argument("--workers", default="1,auto", help="comma list of WORKERS values, each timed once")
    p.add_argument("--tokenizer", default="", help="local folder with a chat tokenizer (e.g. Llama 3.2's)")
    p.add_argument("--benchmark-data", default="", help="BENCHMARK_DATA folder to decontaminate against")
    p.add_argument("--out", default="", help="folder for the dataset and run directories (default: a temp dir)")
    return p.parse_args(argv)


def make_dataset(source: Path, rows: int, out: Path) -> Path:
    base = [r for r in read_jsonl(source)]
    path = out / f"rows-{rows}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for k in range(rows):
            row, copy = dict(base[k % len(base)]), k // len(base)
            if copy and (row.get("Patient") or "").strip():
                row["Patient"] = f"{row['Patient']} (case {copy})"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def tokenizer_dir(args: argparse.Namespace, out: Path) -> str:
    if args.tokenizer:
        return args.tokenizer
    from job.tiny_model import build_tokenizer

    folder = out / "bpe-32k"
    if not (folder / "tokenizer.json").exists():
        texts = [v for r in read_jsonl(Path(args.source)) for v in r.values() if isinstance(v, str)]
        build_tokenizer(texts, vocab_size=32000).save_pretrained(folder)
    return str(folder)


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished child processes): user + system CPU seconds."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-sampling-"))
    out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(Path(args.source), args.rows, out)
    env = {
        "DATASET": str(data),
        "NUM_SAMPLES": str(args.num_samples or int(args.rows * 0.75)),
        "EVAL_SAMPLES": str(args.eval_samples),
        "EVAL_PROMPTS": str(min(50, args.eval_samples)),
        "BASE_MODEL": tokenizer_dir(args, out),
        "BENCHMARK_TASKS": "" if not args.benchmark_data else ",".join(load_settings(env_file=None).benchmark_tasks),
        "BENCHMARK_DATA": args.benchmark_data,
        "OUTPUT_DIR": str(out),
    }
    sample.load_rows(load_settings(environ=env, env_file=None))  # the Arrow cache, made once, outside the timings
    import torch  # noqa: F401  the job's process has torch loaded when it forks its workers: so does this one

    results, first = [], None
    for w in args.workers.split(","):
        cfg = load_settings(environ={**env, "WORKERS": w, "RUN_NAME": f"workers-{w}"}, env_file=None)
        paths = RunPaths(cfg.run_dir)
        paths.root.mkdir(parents=True, exist_ok=True)
        c0, t0 = cpu_seconds(), time.perf_counter()
        sample.run(cfg, paths)
        c1, t1 = cpu_seconds(), time.perf_counter()
        formatting.run(cfg, paths)
        c2, t2 = cpu_seconds(), time.perf_counter()
        stats = json.loads(paths.sample_stats.read_text())
        formatted = sum(v["rows"] for v in json.loads(paths.format_stats.read_text()).values())
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths.data.iterdir())}
        first = first or digests
        results.append(
            {
                "workers": w,
                "processes": parallel.resolve_workers(w, stats["rows_in_dataset"]),
                "rows_read": stats["rows_read"],
                "sample_s": round(t1 - t0, 1),
                "sample_rows_per_s": round(stats["rows_read"] / (t1 - t0)),
                "rows_formatted": formatted,
                "format_s": round(t2 - t1, 1),
                "format_rows_per_s": round(formatted / (t2 - t1)),
                "total_s": round(t2 - t0, 1),
                # CPU seconds of this process and of its (finished) workers: on a shared machine the wall time
                # depends on the other load, these do not
                "sample_cpu_s": [round(b - a, 1) for a, b in zip(c0, c1)],
                "format_cpu_s": [round(b - a, 1) for a, b in zip(c1, c2)],
                "same_files_as_first": digests == first,
                # to compare with a run on another machine (same --source, --rows and tokenizer)
                "sha256": {name: d[:16] for name, d in digests.items()},
            }
        )
        print(json.dumps(results[-1]), flush=True)
    tok_digest = hashlib.sha256(Path(env["BASE_MODEL"], "tokenizer.json").read_bytes()).hexdigest()[:16]
    print(
        f"\n{args.rows:,} rows from {args.source}; tokenizer {env['BASE_MODEL']} (tokenizer.json sha256 "
        f"{tok_digest}); {parallel.cpus()} CPUs usable\n"
    )
    print(
        "| WORKERS | processes | sample: rows read | s | rows/s | CPU s (job, workers) | format: rows | s | rows/s "
        "| CPU s (job, workers) | total s | same files |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['workers']} | {r['processes']} | {r['rows_read']:,} | {r['sample_s']} | {r['sample_rows_per_s']:,} "
            f"| {r['sample_cpu_s']} | {r['rows_formatted']:,} | {r['format_s']} | {r['format_rows_per_s']:,} "
            f"| {r['format_cpu_s']} | {r['total_s']} "
            f"| {'yes' if r['same_files_as_first'] else 'NO'} |"
        )
    return 0 if all(r["same_files_as_first"] for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:  # too few usable rows for --num-samples, a tokenizer without a chat template
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
