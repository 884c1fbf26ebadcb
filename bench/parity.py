"""`python -m bench.parity`: does the job's fast path train the same model as the plain path? Held-out loss of
adapters trained one epoch by named variants on the same rows, measured with code independent of the trainer.

For each seed:
  1. `python -m job` with STAGES=sample writes the training rows and the held-out split once; every variant
     starts from a copy of that run directory, so all see the same rows and the same split.
  2. Each variant trains in a process of its own (Liger patches Transformers process-wide; compiled code and
     allocator state must not carry over): the job's variants are `python -m job` with STAGES=format,train and
     their settings; `trl-seed` is bench/throughput.py's `seed` recipe (the seed notebook's TRL SFTTrainer: NF4 base,
     LoRA r8/alpha 16 on q_proj,v_proj, batch 1 x accumulation 2, paged AdamW 32-bit, gradient checkpointing,
     no packing, loss on the reply only) through bench.py's trainer with TRL's stock SFTTrainer; `unsloth`
     is Unsloth's path where `import unsloth` works (else a row saying it was skipped).
  3. One more process loads the base as training saw it (bitsandbytes NF4, double quantization; compute dtype
     bf16 on a GPU, fp32 on CPU; `--eval-weights 16bit` for the plain base), puts every adapter on it with
     PEFT, renders each held-out conversation with the tokenizer's chat template, and sums the cross-entropy
     (nats) of the assistant reply's tokens, the template's end-of-turn included (the tokens after the
     rendered prompt with its generation prompt), over all held-out rows: loss = summed nats / reply tokens.
     The base is the same PEFT-wrapped model with its adapters disabled, on the same batches (the bare base's
     loss is recorded too, as base_without_peft).

Output in --out: parity.json (everything, with per-row sums for paired comparisons) and parity.md (the
README section: one row per seed and variant, then mean and spread across seeds); `--update-readme
README.md` rewrites the text between <!-- parity:start --> and <!-- parity:end -->. Settings shared by all
variants: `--set KEY=VAL` (repeatable); a variant of your own: `--variant name:KEY=VAL,KEY=VAL`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/parity.py` as well as `python -m bench.parity`
    sys.path.insert(0, str(REPO))

from bench.throughput import RECIPES  # noqa: E402
from job.config import SETTINGS, replace_section  # noqa: E402
from job.files import atomic_write_text, read_json, read_jsonl  # noqa: E402
from job.paths import RunPaths  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "medical_dialogues_sample.jsonl"  # the shared sample beside a checkout
# The job's plain path: every speed lever off, the base kept packed in 4 bits (the QLoRA of the seed recipe).
PLAIN = {
    "BATCH_SIZE": "4",  # 4 unpacked conversations a step, as the measured plain runs had
    "PACKING": "false",
    "CUDA_GRAPHS": "false",
    "LIGER_KERNEL": "false",
    "ATTN_IMPLEMENTATION": "sdpa",
    "DEQUANTIZE_BASE": "false",
    "TORCH_COMPILE": "false",
}
# name -> settings the variant changes (environment variables of the job). The plain path trains 4 unpacked
# conversations per optimizer step; the defaults' one packed row of 1,024 tokens holds about as many. job-b4 is
# the earlier default, 4 packed rows (~16 conversations) per step: an epoch in a quarter of the steps, which
# at the same learning rate trained less (README, "Same model?").
VARIANTS: dict[str, dict[str, str]] = {
    "job": {},
    "plain": PLAIN,
    "trl-seed": {**RECIPES["seed"], "TRAIN_TURN_TOKENS": "false"},  # the seed notebook trains LoRA alone
    "unsloth": {},
    "job-b4": {"BATCH_SIZE": "4"},
    "job-lora-only": {"TRAIN_TURN_TOKENS": "false"},  # the defaults before TRAIN_TURN_TOKENS
    # packed as job-b4, the learning rate doubled (the square root of the 4x larger step, Adam's rule of thumb)
    "job-lr2x": {"BATCH_SIZE": "4", "LEARNING_RATE": "4e-4"},
}
# Variants that do not run `python -m job` for training: the trainer that runs them (a subcommand of this file).
TRAINERS = {"trl-seed": "train-seed", "unsloth": "train-unsloth"}
DEFAULT_VARIANTS = ("job", "plain", "trl-seed", "unsloth", "job-b4")
# Compared against in every row (when they ran).
PLAIN_NAME, TRL_NAME = "plain", "trl-seed"
README_SECTION = "parity"


class ParityError(Exception):
    """A bad argument; the message names it and what to do (exit 2)."""


# --- variants --------------------------------------------------------------------------------------------
def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`name:KEY=VAL,KEY=VAL` (or a known name alone) -> (name, settings)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ParityError(f"--variant {text!r}: give name:KEY=VAL,KEY=VAL with a name of letters, digits, - or _")
    settings = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ParityError(f"--variant {text!r}: {item!r} is not KEY=VAL")
        settings[key.strip()] = value.strip()
    return name, settings


def parse_sets(items: list[str]) -> dict[str, str]:
    """--set KEY=VAL, each whole (a value may hold commas: LORA_TARGET_MODULES=q_proj,v_proj)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ParityError(f"--set {item!r}: give KEY=VAL")
        out[key.strip()] = value
    return out


def check_settings(where: str, settings: dict[str, str], allow_sample: bool = False) -> None:
    """Every name is a job setting; a variant may not change what the sample stage draws (all variants must
    train on the same rows and be scored on the same held-out split: seeds are --seeds)."""
    for key in settings:
        if key not in SETTINGS:
            import difflib

            close = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; `python -m job config` lists them"
            raise ParityError(f"{where}: {key} is not a setting of the job{hint}")
        if not allow_sample and SETTINGS[key].metadata["stage"] in ("sample", "run"):
            raise ParityError(
                f"{where}: {key} is a {SETTINGS[key].metadata['stage']} setting; every variant must train on the same "
                "rows and be scored on the same held-out split (set it for all with --set, seeds with --seeds)"
            )


def choose_variants(names: list[str], extra: list[str]) -> dict[str, dict[str, str]]:
    chosen = {}
    for name in names:
        if name not in VARIANTS:
            raise ParityError(f"--variants: {name!r} is not a variant; known: {', '.join(VARIANTS)} (or --variant)")
        chosen[name] = VARIANTS[name]
    for text in extra:
        name, settings = parse_variant(text)
        base = dict(VARIANTS.get(name, {})) if not settings else {}
        if name in TRAINERS and settings:
            raise ParityError(f"--variant {text!r}: {name} runs its own trainer; give your variant another name")
        check_settings(f"--variant {name}", settings)
        chosen[name] = base | settings
    return chosen


# --- running things in processes of their own ---------------------------------------------------------
def child_env(settings: dict[str, str], site: str = "") -> dict[str, str]:
    """This environment without any job setting, plus `settings`; this checkout first on PYTHONPATH. With
    `site` (a package folder: Unsloth's own stack), that folder and this checkout only: the inherited path
    would put this process's newer Transformers ahead of the one Unsloth pins."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(settings)
    inherited = None if site else os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(REPO), inherited) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_logged(cmd: list[str], settings: dict[str, str], log: Path, site: str = "") -> tuple[int, float]:
    """Run `cmd` with the job's `settings`, its output into `log`; (exit code, seconds).

    It runs in an empty folder beside the log: the job reads .env from its working folder, and `python -m`
    imports from it first (a run directory named `unsloth` there would stand in for the package)."""
    cwd = log.parent / ".cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, env=child_env(settings, site), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    return done.returncode, time.perf_counter() - t0


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def train_summary(paths: RunPaths) -> dict:
    """What the trainer recorded: optimizer steps, its runtime, tokens (real ones) per second."""
    logged = read_json(paths.train_log)
    history = logged.get("log_history", [])
    steps = max((e.get("step", 0) for e in history), default=0)
    runtime = logged.get("metrics", {}).get("train_runtime")
    stats = read_json(paths.format_stats)["train"]
    epochs = logged.get("metrics", {}).get("epoch") or 1.0
    tokens = stats["tokens"] * epochs  # every token the forward saw; padding not counted
    return {
        "steps": steps,
        "conversations": stats["kept"],
        "conversations_per_step": stats["kept"] * epochs / steps if steps else None,
        "train_runtime_s": runtime,
        "train_tokens_per_s": tokens / runtime if runtime else None,
        "train_loss": logged.get("metrics", {}).get("train_loss"),
    }


def train_variant(
    name: str, settings: dict[str, str], shared: dict[str, str], sample_dir: Path, seed_dir: Path, unsloth_site=""
):
    """Copy the seed's sampled run directory and train `name` in it, in a process of its own (`unsloth_site`:
    the packages of Unsloth's own stack, first on the unsloth variant's path, as bench/throughput.py's option)."""
    run_dir = seed_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(sample_dir, run_dir)
    env = {**shared, **settings, "OUTPUT_DIR": str(seed_dir), "RUN_NAME": name}
    log = seed_dir / f"{name}.log"
    if name in TRAINERS:
        cmd = [sys.executable, "-m", "bench.parity", TRAINERS[name], "--run-dir", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "job", "run"]
        env["STAGES"] = "format,train"
    print(f"  {name}: training ({' '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'}) ...", flush=True)
    code, wall = run_logged(cmd, env, log, unsloth_site if name == "unsloth" else "")
    out: dict[str, Any] = {"settings": settings, "process_wall_s": round(wall, 1), "log": log.name}
    skipped = run_dir / "skipped.txt"
    if skipped.exists():
        out["skipped"] = skipped.read_text().strip()
    elif code != 0 or not (RunPaths(run_dir).adapter / "adapter_config.json").exists():
        out["failed"] = f"exit {code}: {_tail(log, 6)}"
    else:
        out.update(train_summary(RunPaths(run_dir)))
    state = out.get("skipped") or out.get("failed") or f"{out['steps']} steps in {wall:.0f} s"
    print(f"  {name}: {state}", flush=True)
    return out


# --- the trainers of this file (subcommands, each in its own process) ---------------------------------
def _settings_of(run_dir: Path):
    from job.config import load_settings

    return load_settings(dict(os.environ), env_file=None), RunPaths(run_dir)


def _write_train_log(paths: RunPaths, trainer, result) -> None:
    """The adapter where the job writes it, and the train log's fields train_summary reads."""
    trainer.model.save_pretrained(paths.adapter)
    trainer.processing_class.save_pretrained(paths.adapter)
    log = {"metrics": result.metrics, "log_history": trainer.state.log_history}
    atomic_write_text(paths.train_log, json.dumps(log, indent=2))


def cmd_train_seed(args) -> int:
    """bench/throughput.py's `seed` recipe: its settings, its trainer (the job's model loading and LoRA, TRL's stock
    SFTTrainer, no split micro-batches), one epoch on the job's formatted rows."""
    from job import formatting
    from job.model import model_code_restored, resolve_precision
    from job.train import build_trainer

    cfg, paths = _settings_of(args.run_dir)
    formatting.run(cfg, paths)
    precision, _ = resolve_precision(cfg)
    trainer = build_trainer(cfg, paths, precision, lean=False, save_strategy="no", report_to=[])
    with model_code_restored(trainer.model):
        result = trainer.train()
    _write_train_log(paths, trainer, result)
    return 0


def cmd_train_unsloth(args) -> int:
    """Unsloth's path (bench/throughput.py's measure_unsloth: 4-bit base, LoRA r/alpha/targets of the job without
    dropout, padded batches of BATCH_SIZE, same optimizer, learning rate and seed), one epoch. Where
    Unsloth does not import, writes skipped.txt saying why. Not run on any machine of this project yet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import unsloth  # noqa: F401  (first: it patches Transformers and TRL on import)
    except Exception as e:  # ImportError, or its own checks (no GPU) raising on import
        (args.run_dir / "skipped.txt").write_text(f"Unsloth does not import here ({type(e).__name__}: {e})\n")
        return 0
    from bench.throughput import unsloth_trainer
    from job import formatting

    cfg, paths = _settings_of(args.run_dir)
    formatting.run(cfg, paths)
    trainer = unsloth_trainer(
        cfg,
        paths.train_tokens,
        output_dir=str(paths.checkpoints),
        per_device_train_batch_size=cfg.BATCH_SIZE,
        gradient_accumulation_steps=cfg.GRAD_ACCUM,
        num_train_epochs=cfg.EPOCHS,
    )
    _write_train_log(paths, trainer, trainer.train())
    return 0


# --- the held-out loss, independent of the trainer -------------------------------------------------------
def scored_rows(tokenizer, conversations: list[list[dict]], max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, where the reply starts) per conversation whose last message is the reply. The reply is
    what the template renders after the prompt with its generation prompt: the reply's text and the turn's
    closing tokens. Cut at max_length as training cuts; a conversation whose prompt fills it is left out."""
    out = []
    for messages in conversations:

        def ids(msgs, gen):
            rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)
            return list(rendered["input_ids"])

        prompt, full = ids(messages[:-1], True), ids(messages, False)
        if full[: len(prompt)] != prompt:
            raise ParityError(
                "the chat template renders the prompt differently from the start of the whole conversation, so "
                "the reply cannot be told apart; use a prefix-stable template"
            )
        if len(prompt) < max_length:
            out.append((full[:max_length], len(prompt)))
    return out


def _batches(rows: list[tuple[list[int], int]], tokens_per_batch: int) -> list[list[int]]:
    """Row indices in batches of similar length (sorted), each padded batch at most tokens_per_batch tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches, current = [], []
    for i in order:
        if current and len(rows[i][0]) * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def reply_nats(
    model, rows: list[tuple[list[int], int]], pad_id: int, tokens_per_batch: int, stop_ids: tuple[int, ...] = ()
) -> tuple[list[float], list[float | None]]:
    """Summed cross-entropy (nats) of each row's reply tokens under `model`: plain forward passes of right-
    padded batches, full logits, log-softmax in fp32. Also the nats of the first end-of-turn token (one of
    `stop_ids`) in each reply, None where the row was cut before it: whether the model learned to end a turn,
    which a loss summed over hundreds of reply tokens cannot show."""
    import torch

    device = next(model.parameters()).device
    sums = [0.0] * len(rows)
    ends: list[float | None] = [None] * len(rows)
    with torch.no_grad():
        for idx in _batches(rows, tokens_per_batch):
            width = max(len(rows[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
                mask[j, : len(rows[i][0])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for j, i in enumerate(idx):
                tokens, start = rows[i]
                # the logit at position t predicts token t + 1
                pred = logits[j, start - 1 : len(tokens) - 1].float().log_softmax(-1)
                target = torch.tensor(tokens[start:], device=pred.device)
                nats = -pred.gather(-1, target[:, None])[:, 0]
                sums[i] = nats.sum().item()
                at = next((k for k, t in enumerate(tokens[start:]) if t in stop_ids), None)
                ends[i] = None if at is None else nats[at].item()
            del logits
    return sums, ends


def load_scoring_base(base: str, weights: str):
    """The base model as the job trains on it: bitsandbytes NF4 with double quantization (compute dtype bf16
    on a GPU, fp32 on CPU), or with weights='16bit' the plain checkpoint in that dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if cuda:
        kwargs["device_map"] = {"": 0}
    if weights == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs).eval()
    return model, f"{weights}, compute {str(dtype).removeprefix('torch.')}, {'cuda' if cuda else 'cpu'}"


def held_out_losses(
    base: str,
    conversations: list[list[dict]],
    adapters: dict[str, Path],
    max_length: int,
    weights: str = "nf4",
    tokens_per_batch: int | None = None,
    probe: int = 0,
) -> dict:
    """Loss (nats per reply token) of the base and of each adapter on `conversations` (each ending in the
    reference reply), with per-row nats for paired comparisons."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from job.model import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.chat_template:
        raise ParityError(f"{base}: its tokenizer has no chat template (bench.real_model prepare writes one)")
    rows = scored_rows(tokenizer, conversations, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    budget = tokens_per_batch or (16384 if torch.cuda.is_available() else 2048)
    model, how = load_scoring_base(base, weights)
    reply_tokens = [len(t) - s for t, s in rows]
    total = sum(reply_tokens)

    stop = tuple(end_of_turn_ids(tokenizer))

    def scored(result: tuple[list[float], list[float | None]]) -> dict:
        nats, ends = result
        ended = [e for e in ends if e is not None]
        return {
            "loss": sum(nats) / total,
            "row_nats": [round(x, 4) for x in nats],
            # p(end of turn) where the reference reply ends, mean over rows: 1 = always ends there
            "end_of_turn_p": statistics.fmean(math.exp(-e) for e in ended) if ended else None,
        }

    t0 = time.perf_counter()
    out: dict[str, Any] = {"weights": how, "rows": len(rows), "reply_tokens": total, "row_tokens": reply_tokens}
    # The base is scored through the PEFT-wrapped model with its adapters disabled, the path the adapters'
    # scores take and the one training saw: with bitsandbytes' 4-bit layers on CPU the wrapped layer's output
    # differs from the bare layer's (by 3e-4 of the loss on Gemma 3 270M). The bare base is kept as a check.
    out["base_without_peft"] = scored(reply_nats(model, rows, pad, budget, stop))
    peft_model = None
    for name, path in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name).eval()
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
        peft_model.set_adapter(name)
        out[name] = scored(reply_nats(peft_model, rows, pad, budget, stop))
        if probe:
            out[name]["probe"] = generation_probe(peft_model, tokenizer, conversations[:probe], stop)
    if peft_model is None:
        out["base"] = out["base_without_peft"]
        if probe:
            out["base"]["probe"] = generation_probe(model, tokenizer, conversations[:probe], stop)
    else:
        with peft_model.disable_adapter():
            out["base"] = scored(reply_nats(peft_model, rows, pad, budget, stop))
            if probe:
                out["base"]["probe"] = generation_probe(peft_model, tokenizer, conversations[:probe], stop)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def repeated_share(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one (near 1.0: one passage over and over).

    Not the most frequent n-gram's share: a loop of a 9-word sentence spreads over 9 n-grams of about 1/9 each
    (the tuned Gemma 3 270M's answers, 2026-12-07, passed that measure while repeating one sentence)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def generation_probe(model, tokenizer, conversations: list[list[dict]], stop: tuple[int, ...], new: int = 256) -> dict:
    """Greedy answers to the first held-out prompts (Transformers' generate, not the job's decoder), plain and
    with a repetition penalty of 1.15: the share that ends its turn within `new` tokens, mean new tokens, and
    the share of word 4-grams repeating an earlier one (a loop measure: 0 for prose, near 1 for a loop)."""
    import torch

    prompts = [tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False) for c in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    tokenizer.padding_side = side
    out = {}
    for label, penalty in (("greedy", 1.0), ("greedy, repetition penalty 1.15", 1.15)):
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=new,
                do_sample=False,
                repetition_penalty=penalty,
                eos_token_id=list(stop),
                pad_token_id=tokenizer.pad_token_id,
            )[:, enc["input_ids"].shape[1] :]
        ended, lengths, loops, texts = 0, [], [], []
        for row in gen.tolist():
            cut = next((k for k, t in enumerate(row) if t in stop), None)
            ended += cut is not None
            row = row[: cut if cut is not None else len(row)]
            lengths.append(len(row))
            text = tokenizer.decode(row, skip_special_tokens=True)
            loops.append(repeated_share(text))
            texts.append(" ".join(text.split()))
        out[label] = {
            "ended": ended / len(gen),
            "new_tokens_mean": statistics.fmean(lengths),
            "loop_share_mean": statistics.fmean(loops),
            "answers": texts[:3],
        }
    return out


def eval_conversations(rows_file: Path, settings: dict[str, str]) -> tuple[list[list[dict]], int]:
    """The held-out rows as the job renders them (its system prompt, description setting), and MAX_SEQ_LENGTH."""
    from job.config import load_settings
    from job.formats import conversation

    cfg = load_settings({**settings, "BASE_MODEL": settings.get("BASE_MODEL", "unused")}, env_file=None)
    convs = [conversation(cfg, r) for r in read_jsonl(rows_file)]  # scored on its last reply
    return convs, cfg.MAX_SEQ_LENGTH


def cmd_loss(args) -> int:
    settings = parse_sets(args.set)
    conversations, max_length = eval_conversations(args.rows, settings)
    adapters = {name: Path(path) for name, path in (a.split("=", 1) for a in args.adapter)}
    result = held_out_losses(args.base, conversations, adapters, max_length, args.eval_weights, probe=args.probe)
    atomic_write_text(args.result, json.dumps(result) + "\n")
    return 0


# --- the report ---------------------------------------------------------------------------------------------
def _pct(x: float | None, digits: int = 1, sign: bool = True) -> str:
    return "–" if x is None else f"{100 * x:+.{digits}f}%" if sign else f"{100 * x:.{digits}f}%"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def derive(seed_result: dict) -> None:
    """Per variant: improvement over the base, as a share of the plain path's, relative differences."""
    losses = seed_result.get("losses", {})
    base = losses.get("base", {}).get("loss")
    ref = {n: losses.get(n, {}).get("loss") for n in (PLAIN_NAME, TRL_NAME)}
    for name, v in seed_result["variants"].items():
        loss = losses.get(name, {}).get("loss")
        if loss is None or base is None:
            continue
        v["loss"] = loss
        v["improvement"] = base - loss
        plain_gain = base - ref[PLAIN_NAME] if ref[PLAIN_NAME] is not None else None
        v["share_of_plain_improvement"] = v["improvement"] / plain_gain if plain_gain else None
        for ref_name, key in ((PLAIN_NAME, "rel_diff_to_plain"), (TRL_NAME, "rel_diff_to_trl_seed")):
            v[key] = (loss - ref[ref_name]) / ref[ref_name] if ref[ref_name] is not None else None


def markdown(result: dict) -> str:
    """The README section: what ran and how it was scored, the per-seed table, the summary across seeds, the
    greedy probe's table (when it ran), and the variants' settings."""
    seeds = result["seeds"]
    variants = "; ".join(
        f"`{n}`: {', '.join(f'{k}={v}' for k, v in vs.items()) or 'the defaults'}"
        for n, vs in result["variants"].items()
    )
    names = list(result["variants"])
    parts = [_intro(result), _seed_table(seeds, names), _summary_table(seeds, names), _probe_table(seeds)]
    return "\n\n".join([p for p in parts if p] + [f"Variants: {variants}."]) + "\n"


def _intro(result: dict) -> str:
    s, seeds = result["setup"], result["seeds"]
    settings = ", ".join(f"{k}={v}" for k, v in s["shared_settings"].items() if k not in ("BASE_MODEL", "DATASET"))
    first = next((r["losses"] for r in seeds.values() if "losses" in r), None)
    scored = (
        f"Held-out loss: {first['rows']} conversations, {first['reply_tokens']:,} reply tokens (first seed), scored "
        f"by bench/parity.py on the base loaded as {first['weights']}, adapters through PEFT. "
        if first
        else "Not scored yet. "
    )
    return (
        f"Device: {s['device']}. Base: {s['base_model']}. Data: {s['data']}; {settings}; seeds {', '.join(seeds)} "
        f"(each seed draws other rows and another held-out split). {scored}"
        f"Train tokens/s: the formatted rows' tokens over the trainer's own runtime (graph capture included). "
        f"{s['versions']}."
    )


def _seed_table(seeds: dict, names: list[str]) -> str:
    head = (
        "variant|seed|optimizer steps|conversations per step|train tokens/s|held-out loss (nats/token)|"
        "improvement over base|share of plain's improvement|vs plain|vs trl-seed|p(end of turn)"
    ).split("|")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, r in seeds.items():
        losses = r.get("losses", {})
        base = losses.get("base", {})
        rows.append(
            f"| base | {seed} | – | – | – | {_num(base.get('loss'), '.4f')} | – | – | – | – | "
            f"{_num(base.get('end_of_turn_p'), '.3f')} |"
        )
        bare = losses.get("base_without_peft", {}).get("loss")
        if bare is not None:  # the check: the same base without PEFT's wrapper
            rows.append(f"| base, no PEFT wrapper | {seed} | – | – | – | {bare:.4f} | – | – | – | – | – |")
        rows += [_variant_row(name, seed, r["variants"].get(name, {}), losses.get(name, {})) for name in names]
    return "\n".join(rows)


def _variant_row(name: str, seed: str, v: dict, scored: dict) -> str:
    if "loss" not in v:
        why = v.get("skipped") or (f"failed: {v['failed'][:120]}" if "failed" in v else "not run")
        return f"| {name} | {seed} | {why.replace('|', '/').replace(chr(10), ' ')} |" + " |" * 8
    cells = [
        name,
        seed,
        str(v["steps"]),
        _num(v["conversations_per_step"], ".1f"),
        _num(v["train_tokens_per_s"], ",.0f"),
        f"{v['loss']:.4f}",
        f"{v['improvement']:.4f}",
        _pct(v["share_of_plain_improvement"], 0, sign=False),
        _pct(v["rel_diff_to_plain"], 2),
        _pct(v["rel_diff_to_trl_seed"], 2),
        _num(scored.get("end_of_turn_p"), ".3f"),
    ]
    return "| " + " | ".join(cells) + " |"


def _summary_table(seeds: dict, names: list[str]) -> str:
    rows = [
        "| variant | seeds | held-out loss, mean (min–max) | share of plain's improvement, mean (min–max) | "
        "vs plain, mean | vs trl-seed, mean | train tokens/s, mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        ran = [r["variants"][name] for r in seeds.values() if "loss" in r["variants"].get(name, {})]
        if not ran:
            continue

        def values(key, ran=ran):
            return [v[key] for v in ran if v.get(key) is not None]

        def spread(key, fmt):
            xs = values(key)
            if not xs:
                return "–"
            return f"{fmt(statistics.fmean(xs))} ({fmt(min(xs))}–{fmt(max(xs))})" if len(xs) > 1 else fmt(xs[0])

        def mean(key, fmt):
            xs = values(key)
            return fmt(statistics.fmean(xs)) if xs else "–"

        rows.append(
            f"| {name} | {len(ran)} | {spread('loss', lambda x: f'{x:.4f}')} | "
            f"{spread('share_of_plain_improvement', lambda x: f'{100 * x:.0f}%')} | "
            f"{mean('rel_diff_to_plain', lambda x: f'{100 * x:+.2f}%')} | "
            f"{mean('rel_diff_to_trl_seed', lambda x: f'{100 * x:+.2f}%')} | "
            f"{mean('train_tokens_per_s', lambda x: f'{x:,.0f}')} |"
        )
    return "\n".join(rows)


def _probe_table(seeds: dict) -> str:
    probes = [
        f"| {name} | {seed} | {how} | {100 * g['ended']:.0f}% | {g['new_tokens_mean']:.0f} | "
        f"{g['loop_share_mean']:.2f} |"
        for seed, r in seeds.items()
        for name, scored in r.get("losses", {}).items()
        if isinstance(scored, dict) and "probe" in scored
        for how, g in scored["probe"].items()
    ]
    if not probes:
        return ""
    head = "| model | seed | decoding (256 new tokens at most) | ended its turn | new tokens, mean | repeated 4-grams |"
    return "\n".join([head, "|---|---|---|---|---|---|", *probes])


def write_report(result: dict, out: Path, readme: Path | None) -> str:
    md = markdown(result)
    atomic_write_text(out / "parity.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "parity.md", md)
    if readme:
        atomic_write_text(readme, replace_section(readme.read_text(encoding="utf-8"), README_SECTION, md))
    return md


# --- the whole harness -------------------------------------------------------------------------------------
def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def _device() -> str:
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"
    # in a child, so this process never makes a CUDA context
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _base_model_text(base: Path) -> str:
    source = base / "source.json"
    if source.exists():
        s = read_json(source)
        return f"{s['source_model']} ({s.get('gguf_file', '')}, dequantized; {s.get('architecture', '')})"
    return base.name


def earlier_seeds(previous: Path, shared: dict, variants: dict, weights: str, now: list[int]) -> dict:
    """Seeds a previous run into the same --out finished with the same settings, variants and scoring, other
    than the ones run now: a run split over several calls (a machine lent for minutes) adds up in one table."""
    try:
        old = read_json(previous)
    except (OSError, ValueError):
        return {}
    same = (old.get("setup", {}).get("shared_settings"), old.get("variants"), old.get("setup", {}).get("eval_weights"))
    if same != (shared, variants, weights):
        return {}
    return {k: v for k, v in old.get("seeds", {}).items() if "losses" in v and int(k) not in now}


def cmd_run(args) -> int:
    base = Path(args.base).resolve()
    if not (base / "config.json").exists():
        raise ParityError(f"--base {args.base}: no config.json there; prepare one: python -m bench.real_model prepare")
    data = Path(args.data)
    if not data.is_file():
        raise ParityError(f"--data {args.data}: no such file")
    shared = parse_sets(args.set)
    check_settings("--set", shared, allow_sample=True)
    variants = choose_variants([v for v in args.variants.split(",") if v], args.variant)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shared = {
        "BASE_MODEL": str(base),
        "DATASET": str(data.resolve()),
        "NUM_SAMPLES": str(args.num_samples),
        "EVAL_SAMPLES": str(args.eval_samples),
        "BENCHMARK_TASKS": "",  # no benchmark questions to fetch: parity trains and scores only
        "EVAL_PROMPTS": "0",  # nor generates
        "HUB_REPO_ID": "",
        **shared,
    }
    result: dict[str, Any] = {
        "setup": {
            "device": _device(),
            "base_model": _base_model_text(base),
            "data": data.name,
            "shared_settings": shared,
            "versions": _versions(),
            "eval_weights": args.eval_weights,
        },
        "variants": variants,
        "seeds": earlier_seeds(out / "parity.json", shared, variants, args.eval_weights, seeds),
    }
    if result["seeds"]:
        print(f"keeping seeds {', '.join(result['seeds'])} of {out / 'parity.json'} (same settings and variants)")
    t0 = time.perf_counter()
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        shutil.rmtree(seed_dir, ignore_errors=True)
        settings = {**shared, "SEED": str(seed), "OUTPUT_DIR": str(seed_dir), "RUN_NAME": "sample", "STAGES": "sample"}
        print(f"seed {seed}: sampling ...", flush=True)
        code, _ = run_logged([sys.executable, "-m", "job", "run"], settings, seed_dir / "sample.log")
        if code != 0:
            raise ParityError(f"the sample stage failed (exit {code}):\n{_tail(seed_dir / 'sample.log')}")
        sample_dir = seed_dir / "sample"
        r: dict[str, Any] = {"variants": {}}
        result["seeds"][str(seed)] = r
        for name, vs in variants.items():
            shared_seed = {**shared, "SEED": str(seed)}
            r["variants"][name] = train_variant(name, vs, shared_seed, sample_dir, seed_dir, args.unsloth_site)
            write_report(result, out, None)  # a run cut short keeps what it measured
        trained = {n: seed_dir / n / "adapter" for n, v in r["variants"].items() if "steps" in v}
        print(f"seed {seed}: scoring the base and {len(trained)} adapters on the held-out split ...", flush=True)
        scored = seed_dir / "losses.json"
        cmd = [sys.executable, "-m", "bench.parity", "loss", "--base", str(base), "--result", str(scored)]
        cmd += ["--rows", str(RunPaths(sample_dir).eval_rows), "--eval-weights", args.eval_weights]
        cmd += ["--probe", str(args.probe)]
        cmd += [a for kv in shared.items() for a in ("--set", "=".join(kv))]
        cmd += [a for n, p in trained.items() for a in ("--adapter", f"{n}={p}")]
        code, wall = run_logged(cmd, {}, seed_dir / "loss.log")
        if code != 0:
            raise ParityError(f"scoring failed (exit {code}):\n{_tail(seed_dir / 'loss.log')}")
        r["losses"] = read_json(scored)
        r["losses"]["process_wall_s"] = round(wall, 1)
        derive(r)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        md = write_report(result, out, args.update_readme)
    print(md)
    return 0


def cmd_report(args) -> int:
    result = read_json(Path(args.out) / "parity.json")
    print(write_report(result, Path(args.out), args.update_readme))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="sample, train every variant, score (the default)")
    for q in (p, run):  # `python -m bench.parity --base ...` means run
        q.add_argument("--base", help="model folder (python -m bench.real_model prepare --out DIR)")
        q.add_argument("--data", default=str(DEFAULT_DATA), help="conversations file (DATASET)")
        q.add_argument("--seeds", default="42", help="comma list; each draws other rows and another held-out split")
        q.add_argument("--num-samples", type=int, default=1000, help="training conversations (NUM_SAMPLES)")
        q.add_argument("--eval-samples", type=int, default=100, help="held-out conversations (EVAL_SAMPLES)")
        q.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="known: " + ", ".join(VARIANTS))
        q.add_argument("--variant", action="append", default=[], help="name:KEY=VAL,KEY=VAL (repeatable)")
        q.add_argument("--set", action="append", default=[], help="KEY=VAL for every variant (repeatable)")
        q.add_argument("--eval-weights", choices=("nf4", "16bit"), default="nf4", help="base weights when scoring")
        q.add_argument("--probe", type=int, default=0, help="greedy answers to this many held-out prompts per model")
        q.add_argument("--unsloth-site", default="", help="PYTHONPATH of the unsloth variant (Unsloth's own stack)")
        q.add_argument("--out", default="parity-results", help="folder for parity.json, parity.md, the runs")
        q.add_argument("--update-readme", type=Path, default=None, help="rewrite this README's parity section")
    report = sub.add_parser("report", help="render parity.md (and the README section) from --out's parity.json")
    report.add_argument("--out", default="parity-results")
    report.add_argument("--update-readme", type=Path, default=None)
    loss = sub.add_parser("loss", help="score the base and adapters on held-out rows (a step of run)")
    loss.add_argument("--base", required=True)
    loss.add_argument("--rows", type=Path, required=True, help="the held-out rows (a run's data/eval.jsonl)")
    loss.add_argument("--adapter", action="append", default=[], help="name=folder (repeatable)")
    loss.add_argument("--set", action="append", default=[], help="KEY=VAL: the job settings the rows are rendered with")
    loss.add_argument("--eval-weights", choices=("nf4", "16bit"), default="nf4")
    loss.add_argument("--probe", type=int, default=0, help="greedy answers to this many held-out prompts per model")
    loss.add_argument("--result", type=Path, required=True)
    for name in TRAINERS.values():
        t = sub.add_parser(name, help=argparse.SUPPRESS)
        t.add_argument("--run-dir", type=Path, required=True)
    args = p.parse_args(argv)
    commands = {"report": cmd_report, "loss": cmd_loss}
    commands |= {"train-seed": cmd_train_seed, "train-unsloth": cmd_train_unsloth}
    try:
        if args.command in commands:
            return commands[args.command](args)
        if not args.base:
            raise ParityError("--base: give the model folder (python -m bench.real_model prepare --out DIR)")
        return cmd_run(args)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
