"""Stage 5, benchmark: did fine-tuning make the model know less medicine?

Base (adapter disabled) and tuned model, on one load, score the MultiMedQA multiple-choice tasks zero-shot
with EleutherAI's lm-evaluation-harness (lm-eval): each choice's log-likelihood after the task's own prompt,
the most likely choice is the answer. The questions are fetched once, in the sample stage (`fetch`), into
data/benchmark/, from the tasks' own Hub datasets or from the local folder BENCHMARK_DATA; the same stage
drops training rows that share a 13-word sequence with a benchmark question or a held-out row
(`Decontaminator`). Here each task is scored from those files, question by question, and eval/benchmark.json
gets per task and overall: base and tuned accuracy, their paired difference with a 95% bootstrap interval,
and the number of questions. The push stage stops (`check_gate`) when the tuned model's mean accuracy fell by
more than MAX_BENCHMARK_DROP points.

Why lm-eval: its prompts and scoring are what published MultiMedQA numbers use, so ours are comparable.
Why our own statistics: lm-eval's stderr is per model and unpaired; the question here is the difference
between two models on the same questions, whose paired interval is several times narrower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from job import formats
from job.benchmark_tasks import OWN, TASKS
from job.config import Settings
from job.errors import ConfigError, QualityGateError, classify
from job.evaluate import load_tuned
from job.files import atomic_write_text, read_json, write_jsonl
from job.model import load_tokenizer, resolve_precision
from job.paths import RunPaths

log = logging.getLogger(__name__)

NGRAM = 13  # words in a row shared with a benchmark question that make a training row contaminated
BOOTSTRAP_ITERATIONS = 10_000  # Monte Carlo error of a 95% percentile bound at 10k draws: ~0.1 point
BOOTSTRAP_SEED = 0
# Sequences per forward pass. lm-eval takes log-softmax over the whole vocabulary at every position: for a
# 128k-vocabulary model that is 16 x 600 tokens x 128,256 x 4 bytes = 4.9 GB for the longest (pubmedqa)
# batches, which fits a 24 GB GPU beside the 4-bit 3B model.
BATCH_SIZE = 16


# --- task definitions ------------------------------------------------------------------------------------------
@cache
def task_manager():
    """lm-eval's task index, limited to the folders that define our tasks (indexing all of them takes seconds)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    stock = Path(lm_eval.tasks.__file__).parent
    folders = dict.fromkeys(str(stock / t.folder) if t.folder else str(OWN) for t in TASKS.values())
    return TaskManager(include_path=list(folders), include_defaults=False)


def task_config(task: str, data_file: Path | None) -> dict[str, Any]:
    """The task's full lm-eval config (prompt, choices, target, metric); with `data_file`, its questions are read
    from that JSONL file (same fields as the Hub dataset) instead of the Hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(load_yaml(task_manager().task_index[task].yaml_path, resolve_func=True))
    if data_file is not None:
        cfg.update(
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {"test": str(data_file)}},
            test_split="test",
            training_split=None,
            validation_split=None,
            fewshot_split=None,  # zero-shot: no examples are drawn
        )
    return cfg


def _load_task(task: str, data_file: Path | None):
    return task_manager().load_task_or_group([task_config(task, data_file)])[task]


# --- sample stage: fetch the questions, decontaminate the training rows ------------------------------------------
def ngrams(text: str) -> set[int]:
    """Hashes of the NGRAM-word sequences of `text` (lower-cased words of letters and digits; punctuation ignored)."""
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {hash(tuple(w[i : i + NGRAM])) for i in range(len(w) - NGRAM + 1)}


def row_ngrams(row: dict) -> set[int]:
    """The ngrams of every text field of a row and of its user and assistant turns (job/formats.py), each apart.
    Python's str hash is seeded per process: compare only hashes made in one process or in processes forked from it
    (job/parallel.py)."""
    texts = [v for v in row.values() if isinstance(v, str)] + (formats.turns(row) if "messages" in row else [])
    return set().union(*map(ngrams, texts))


class Decontaminator:
    """Tells which training rows share an NGRAM-word sequence with a benchmark question or a held-out row.

    Thirteen words in a row is the overlap GPT-3's and lm-eval's decontamination use: long enough that shared
    stock phrases do not count, short enough to catch a question pasted into a conversation.
    """

    def __init__(self, benchmark_texts: Iterable[str] = (), tasks: Iterable[str] = ()):
        texts = list(benchmark_texts)
        self.tasks = list(tasks)
        self.questions = len(texts)
        self.benchmark: set[int] = set().union(*map(ngrams, texts))
        self.held_out: set[int] = set()
        self.dropped: Counter = Counter()

    def hold_out(self, row: dict, grams: Iterable[int] | None = None) -> None:
        """Remember a held-out row: later training rows must not overlap it. `grams`: its row_ngrams, if known."""
        self.held_out.update(row_ngrams(row) if grams is None else grams)

    def overlap(self, row: dict, grams: Iterable[int] | None = None) -> str | None:
        """'benchmark' or 'held_out' if the row shares an n-word sequence with one (counted), else None."""
        grams = row_ngrams(row) if grams is None else grams
        # isdisjoint stops at the first shared hash and builds no set; it walks `grams` even for an empty set
        hit = bool(self.benchmark) and not self.benchmark.isdisjoint(grams)
        source = "benchmark" if hit else "held_out" if not self.held_out.isdisjoint(grams) else None
        if source:
            self.dropped[source] += 1
        return source

    def summary(self) -> dict:
        return {
            "ngram_words": NGRAM,
            "benchmark_tasks": self.tasks,
            "benchmark_questions": self.questions,
            "dropped_benchmark_overlap": self.dropped["benchmark"],
            "dropped_held_out_overlap": self.dropped["held_out"],
        }


def fetch(cfg: Settings, out_dir: Path) -> Decontaminator:
    """Write each selected task's questions to out_dir/<task>.jsonl and return a Decontaminator holding them.

    From BENCHMARK_DATA/<task>.jsonl when set, else from the task's Hub dataset as lm-eval loads it. The whole
    evaluation split is kept (BENCHMARK_LIMIT only limits scoring), so decontamination covers all of it.
    With BENCHMARK_TASKS empty nothing is fetched and only held-out overlap is checked.
    """
    tasks = cfg.benchmark_tasks
    # Questions of tasks no longer selected are stale: the folder holds exactly this run's.
    for old in out_dir.glob("*.jsonl") if out_dir.is_dir() else []:
        if old.stem not in tasks:
            old.unlink()
    if not tasks:
        return Decontaminator()
    local = Path(cfg.BENCHMARK_DATA).expanduser() if cfg.BENCHMARK_DATA else None
    if local is not None:
        missing = [f"{t}.jsonl" for t in tasks if not (local / f"{t}.jsonl").is_file()]
        if missing:
            raise ConfigError(
                f"BENCHMARK_DATA={cfg.BENCHMARK_DATA!r} lacks {', '.join(missing)}: add one JSONL file per task in "
                "BENCHMARK_TASKS, with the fields of the task's Hub dataset (see job/fixtures/benchmark/)"
            )
    texts: list[str] = []
    for task in tasks:
        source = local / f"{task}.jsonl" if local is not None else None
        docs = _questions(task, source)
        texts += [text for _, text in docs]
        write_jsonl(out_dir / f"{task}.jsonl", [doc for doc, _ in docs])
        log.info("benchmark %s: %d questions from %s", task, len(docs), source or "the Hub")
    return Decontaminator(texts, tasks)


def _questions(task: str, source: Path | None) -> list[tuple[dict, str]]:
    """Each question of `task` and its prompt, read by lm-eval from `source` (a JSONL file) or the Hub, checked."""
    where = f"BENCHMARK_DATA file {source}" if source else f"{task}'s Hub dataset"
    try:
        t = _load_task(task, source)
        docs = [dict(d) for d in t.eval_docs]
        texts = [t.doc_to_text(d) for d in docs]
    except Exception as e:  # datasets and lm-eval raise many types; classified by type, not by message
        err = classify(e, f"BENCHMARK_TASKS: {where}") if source is None else None
        if err is not None:
            raise err from None
        why = f"{type(e).__name__}: {e}"
        raise ConfigError(f"BENCHMARK_TASKS: {where} could not be read as task {task} ({why})") from None
    check_questions(task, t, docs, source, where)
    return list(zip(docs, texts))


def check_questions(task: str, t: Any, docs: list[dict], source: Path | None, where: str) -> None:
    """ConfigError naming the first question of `docs` (lm-eval task `t`) whose answer is not one of its choices,
    by file line (`source`, a JSONL file) or row, and the field. lm-eval reads an answer as an index into the
    choices: -1 would be graded against the last choice, null fails with a traceback when scoring, after
    training. A question whose prompt cannot be built fails the same way."""
    lines = _content_lines(source) if source is not None else None
    # Whether the task's answers are words of the choices (pubmedqa: yes, no, maybe) or their numbers (the rest).
    words = any(isinstance(d.get(t.config.doc_to_target), str) for d in docs if isinstance(t.config.doc_to_target, str))
    bad: list[str] = []
    for i, doc in enumerate(docs):
        problem = _question_problem(task, t, doc, words)
        if problem:
            at = f"line {lines[i]}" if lines is not None and i < len(lines) else f"row {i + 1}"
            bad.append(f"{at}: {problem}")
    if bad:
        more = f" ({len(bad) - 1} more question(s) like it)" if len(bad) > 1 else ""
        fix = (
            "Fix or delete that line"
            if source is not None
            else "That dataset is not what lm-eval's task expects; use BENCHMARK_DATA with a corrected copy"
        )
        raise ConfigError(f"BENCHMARK_TASKS: {where}, task {task}, {bad[0]}{more}. {fix}, then run again.")


def _question_problem(task: str, t: Any, doc: dict, words: bool) -> str | None:
    try:
        choices = list(t.doc_to_choice(doc))
        target = t.doc_to_target(doc)
        text = t.doc_to_text(doc)
    except Exception as e:  # lm-eval's prompt code on a row missing a field or of the wrong type
        return f"lm-eval cannot build its prompt ({type(e).__name__}: {e})"
    if not isinstance(text, str) or not text.strip():
        return "the question is empty"
    if isinstance(target, str) and target in choices:
        return None
    # A whole number; a column that holds one fraction reaches us as floats throughout (pyarrow's JSON reader).
    number = isinstance(target, (int, float)) and not isinstance(target, bool) and float(target).is_integer()
    if number and 0 <= target < len(choices):
        return None
    spec = t.config.doc_to_target
    field = spec if isinstance(spec, str) and spec in doc else TASKS[task].answer
    shown = "null" if target is None else json.dumps(target)
    if words:
        return f"field {field!r} is {shown}; it must be one of {', '.join(map(str, choices))}"
    return f"field {field!r} is {shown}; it must be the number of the right choice, 0 to {len(choices) - 1}"


def _content_lines(path: Path) -> list[int]:
    """The line numbers of a JSONL file's non-blank lines: one question each, in the order lm-eval reads them."""
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


# --- statistics --------------------------------------------------------------------------------------------------
def paired_difference(pairs: list[tuple[Any, Any]], iterations: int = BOOTSTRAP_ITERATIONS, seed: int = BOOTSTRAP_SEED):
    """Mean over tasks of tuned minus base accuracy, and its 95% bootstrap interval resampling questions.

    `pairs` holds, per task, the base and tuned 0/1 correctness on the same questions in the same order. Each
    task's questions are resampled with replacement, independently (a stratified bootstrap), keeping each
    question's base and tuned answers together: that pairing is what lm-eval's per-model stderr lacks. A
    question's paired difference is -1, 0 or +1, so a resample is fully described by how many of each it draws:
    one multinomial draw per iteration gives exactly the resampled mean, in O(iterations) memory.
    Returns (difference, (low, high)) as fractions.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = np.zeros(iterations)
    point = 0.0
    for base, tuned in pairs:
        d = np.asarray(tuned, dtype=np.int64) - np.asarray(base, dtype=np.int64)
        n = len(d)
        counts = np.array([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()])
        sample = rng.multinomial(n, counts / n, size=iterations)
        draws += (sample[:, 2] - sample[:, 0]) / n
        point += d.mean()
    draws /= len(pairs)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point / len(pairs), (float(low), float(high))


def verdict(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def summarize(per_task: dict[str, dict]) -> dict:
    """The per-task numbers and the overall mean over tasks, from the stored correctness vectors."""
    out = {}
    for task, r in per_task.items():
        diff, (low, high) = paired_difference([(r["base_correct"], r["tuned_correct"])])
        n = len(r["base_correct"])
        out[task] = {
            "n": n,
            "base": sum(r["base_correct"]) / n,
            "tuned": sum(r["tuned_correct"]) / n,
            "difference": diff,
            "ci95": [low, high],
        }
    if per_task:
        diff, (low, high) = paired_difference([(r["base_correct"], r["tuned_correct"]) for r in per_task.values()])
        out["overall"] = {
            "n": sum(v["n"] for v in out.values()),
            "tasks": len(per_task),
            "base": sum(v["base"] for v in out.values()) / len(per_task),
            "tuned": sum(v["tuned"] for v in out.values()) / len(per_task),
            "difference": diff,
            "ci95": [low, high],
            "verdict": verdict(low, high),
        }
    return out


# --- the stage ---------------------------------------------------------------------------------------------------
def evaluate_task(lm, task: str, data_file: Path, limit: int | None) -> list[dict]:
    """lm-eval's zero-shot log-likelihood scoring of one task's questions in `data_file`: its per-question
    samples (doc_id, arguments = (context, choice) pairs, filtered_resps = (log-likelihood, is_greedy), acc).

    Through `lm_eval.evaluator.evaluate`, the function `simple_evaluate` calls once it has built the tasks, with
    the one setting that matters here made as simple_evaluate(num_fewshot=0) makes it. simple_evaluate itself
    then collects environment information (torch's collect_env runs `pip list` and more in subprocesses), which
    costs more than scoring a small task, and the stage makes two calls per task.
    """
    from lm_eval.evaluator import evaluate

    loaded = task_manager().load([task_config(task, data_file)])
    for t in loaded["tasks"].values():
        t.set_config(key="num_fewshot", value=0)  # zero-shot
    out = evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
        log_samples=True,  # per-question results, for the paired interval
        bootstrap_iters=0,  # lm-eval's own (unpaired) stderr is not used
    )
    return out["samples"][task]


def score(lm, task: str, data_file: Path, limit: int | None) -> dict[int, float]:
    """{doc_id: 1.0 if the most likely choice is the answer else 0.0}."""
    return {s["doc_id"]: float(s["acc"]) for s in evaluate_task(lm, task, data_file, limit)}


def _digest(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def run(cfg: Settings, paths: RunPaths) -> list[Path]:
    tasks = cfg.benchmark_tasks
    if not tasks:
        log.info("BENCHMARK_TASKS is empty: no benchmark")
        return []
    _check_fetched(cfg, paths)
    key, done = _reusable(cfg, paths)

    from lm_eval.models.huggingface import HFLM

    # One line per task from us instead; lm-eval also warns that it was given a loaded model, which is the point.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    precision, _ = resolve_precision(cfg)
    tokenizer = load_tokenizer(cfg, str(paths.adapter))
    model = None
    for task in tasks:
        if task in done:
            log.info("benchmark %-28s already scored; skipping", task)
            continue
        if model is None:  # loaded only when a task is left to score
            model = load_tuned(cfg, paths.adapter, precision)
            # HFLM re-ties the embeddings, which fails on PEFT's trainable-token wrappers (TRAIN_TURN_TOKENS,
            # job/turn_tokens.py: `model.embed_tokens.weight` is no parameter there); PEFT keeps them tied itself.
            # tests/test_pipeline.py's demo trains turn tokens and benchmarks the adapter: it fails if this goes.
            model.tie_weights = lambda *args, **kwargs: None
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
        t0 = time.perf_counter()
        data_file = paths.benchmark_data / f"{task}.jsonl"
        tuned = score(lm, task, data_file, cfg.BENCHMARK_LIMIT)
        with model.disable_adapter():  # the same weights without LoRA: the base model
            base = score(lm, task, data_file, cfg.BENCHMARK_LIMIT)
        ids = sorted(tuned)
        assert ids == sorted(base), "base and tuned were scored on different questions"
        done[task] = {
            "questions_sha256": _digest([data_file]),
            "doc_ids": ids,
            "base_correct": [int(base[i]) for i in ids],
            "tuned_correct": [int(tuned[i]) for i in ids],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        _write(paths, cfg, key, done)
        r = summarize({task: done[task]})[task]
        log.info(
            "benchmark %-28s n=%d base %.1f%% tuned %.1f%% difference %+.1f points [%+.1f, %+.1f] (%.1f s)",
            task, r["n"], 100 * r["base"], 100 * r["tuned"], 100 * r["difference"],
            100 * r["ci95"][0], 100 * r["ci95"][1], done[task]["seconds"],
        )  # fmt: skip
    _write(paths, cfg, key, done)
    overall = summarize(done)["overall"]
    log.info(
        "benchmark mean of %d tasks: base %.1f%% tuned %.1f%% difference %+.1f points [%+.1f, %+.1f]: %s",
        overall["tasks"], 100 * overall["base"], 100 * overall["tuned"], 100 * overall["difference"],
        100 * overall["ci95"][0], 100 * overall["ci95"][1], overall["verdict"],
    )  # fmt: skip
    return [paths.benchmark]


def _check_fetched(cfg: Settings, paths: RunPaths) -> None:
    """ConfigError for a question file the sample stage did not fetch or that was edited by hand since: here, before
    the model loads, not in lm-eval's scoring."""
    missing = [t for t in cfg.benchmark_tasks if not (paths.benchmark_data / f"{t}.jsonl").is_file()]
    if missing:
        raise ConfigError(
            f"BENCHMARK_TASKS={cfg.BENCHMARK_TASKS!r}: the questions of {', '.join(missing)} are not in "
            f"{paths.benchmark_data} (the sample stage fetches them). Rerun with REDO=true and STAGES=all."
        )
    for task in cfg.benchmark_tasks:
        data_file = paths.benchmark_data / f"{task}.jsonl"
        t = _load_task(task, data_file)
        where = f"{data_file} (fetched by the sample stage; delete it and rerun with REDO=true to fetch it again)"
        check_questions(task, t, [dict(d) for d in t.eval_docs], data_file, where)


def _reusable(cfg: Settings, paths: RunPaths) -> tuple[dict, dict[str, dict]]:
    """(the key results are stored under, the tasks already scored under it). A task's results are reused only for
    the same adapter, BENCHMARK_LIMIT and questions: a rerun after a kill skips finished tasks, and nothing stale
    survives a retrained adapter or refetched questions."""
    key = {"limit": cfg.BENCHMARK_LIMIT, "adapter_sha256": _digest(sorted(paths.adapter.glob("adapter_*")))}
    previous, damage = read_results(paths.benchmark)
    if damage:
        log.warning("%s is damaged (%s): scoring every task again", paths.benchmark, damage)
    done = previous["raw"] if previous and previous.get("key") == key else {}
    questions = {t: _digest([paths.benchmark_data / f"{t}.jsonl"]) for t in cfg.benchmark_tasks}
    return key, {t: r for t, r in done.items() if t in questions and r.get("questions_sha256") == questions[t]}


def _write(paths: RunPaths, cfg: Settings, key: dict, done: dict[str, dict]) -> None:
    """eval/benchmark.json: the summary per task and overall, then the raw per-question results it came from."""
    ordered = {t: done[t] for t in cfg.benchmark_tasks if t in done}
    body = {
        "tasks": summarize(ordered),
        "seconds": {t: r["seconds"] for t, r in ordered.items()},
        "bootstrap": {"iterations": BOOTSTRAP_ITERATIONS, "seed": BOOTSTRAP_SEED, "resampled": "questions, per task"},
        "key": key,
        "raw": ordered,
    }
    text = json.dumps(body, indent=1)
    # Lists of numbers (intervals, per-question results) on one line each, so the file reads top to bottom.
    text = re.sub(r"\[\s+([-\d.e,\s]+?)\s+\]", lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)
    atomic_write_text(paths.benchmark, text)


# --- reading the results back ------------------------------------------------------------------------------------
def read_results(path: Path) -> tuple[dict | None, str | None]:
    """(eval/benchmark.json's contents, None); (None, None) without the file; (None, what is wrong) when it does
    not parse or lacks the shape `_write` gives it (a disk fault, a hand edit)."""
    if not path.is_file():
        return None, None
    try:
        body = read_json(path)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"{type(e).__name__}: {e}"
    problem = _results_problem(body)
    return (None, problem) if problem else (body, None)


def _results_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("tasks"), dict) or not isinstance(body.get("raw"), dict):
        return "not an object with 'tasks' and 'raw'"
    if not isinstance(body.get("key"), dict):
        return "'key' is not an object"
    summaries = (f"tasks.{t}{p}" for t, r in body["tasks"].items() if (p := _summary_problem(r)))
    raw = (f"raw.{t}{p}" for t, r in body["raw"].items() if (p := _raw_problem(r)))
    return next(summaries, None) or next(raw, None)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _summary_problem(r: Any) -> str | None:
    fields = ("n", "base", "tuned", "difference")
    if not isinstance(r, dict) or not all(_number(r.get(f)) for f in fields):
        return f" lacks one of {', '.join(fields)}"
    ci = r.get("ci95")
    if not (isinstance(ci, list) and len(ci) == 2 and all(map(_number, ci))):
        return ".ci95 is not two numbers"
    return None


def _raw_problem(r: Any) -> str | None:
    if not isinstance(r, dict):
        return " is not an object"
    base, tuned, ids = r.get("base_correct"), r.get("tuned_correct"), r.get("doc_ids")
    lists = [x for x in (base, tuned, ids) if isinstance(x, list)]
    if len(lists) < 3 or not base or not len(base) == len(tuned) == len(ids):
        return ": base_correct, tuned_correct and doc_ids are not lists of one length"
    if not all(v in (0, 1) and not isinstance(v, float) for v in base + tuned) or not _number(r.get("seconds")):
        return ": answers are not 0 or 1, or seconds is not a number"
    return None


def results(paths: RunPaths) -> dict | None:
    """The per-task summary that the push gate and the model card read (None without a file). A damaged file is
    moved aside, so the same command scores the benchmark again (the pipeline reruns a stage whose file is gone)."""
    body, damage = read_results(paths.benchmark)
    if damage:
        aside = paths.benchmark.with_name(paths.benchmark.name + ".damaged")
        paths.benchmark.replace(aside)
        raise ConfigError(
            f"{paths.benchmark} is damaged ({damage}); it was moved to {aside.name}. Run the same command again: the "
            "benchmark stage scores the tasks again and the push follows."
        )
    return body["tasks"] if body else None


# --- the gate ----------------------------------------------------------------------------------------------------
def check_gate(cfg: Settings, paths: RunPaths) -> None:
    """Stop the push (exit 5) if the tuned model's mean accuracy fell by more than MAX_BENCHMARK_DROP points."""
    if not cfg.benchmark_tasks:
        return
    tasks = results(paths)
    if tasks is None:
        return
    overall = tasks.get("overall")
    if overall is None or -100 * overall["difference"] <= cfg.MAX_BENCHMARK_DROP:
        return
    fell = [(t, r) for t, r in tasks.items() if t != "overall" and r["difference"] < 0]
    detail = "; ".join(
        f"{t} {100 * r['base']:.1f}% -> {100 * r['tuned']:.1f}% ({100 * r['difference']:+.1f} points)" for t, r in fell
    )
    raise QualityGateError(
        f"MAX_BENCHMARK_DROP={cfg.MAX_BENCHMARK_DROP}: the tuned model's mean benchmark accuracy fell by "
        f"{-100 * overall['difference']:.1f} points (base {100 * overall['base']:.1f}%, tuned "
        f"{100 * overall['tuned']:.1f}%, 95% CI {100 * overall['ci95'][0]:+.1f} to {100 * overall['ci95'][1]:+.1f}). "
        f"Tasks that fell: {detail or 'none alone'}. Nothing was pushed. See eval/benchmark.json; train with a lower "
        "LEARNING_RATE or fewer EPOCHS, or raise MAX_BENCHMARK_DROP only if the drop is acceptable."
    )
