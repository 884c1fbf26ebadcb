"""Stage 2, format: render each conversation with the model's chat template (its own, or CHAT_TEMPLATE's) and
mark the loss.

We tokenize here rather than inside TRL so that the loss mask is ours to test and to count:
`completion_mask` is 1 exactly on each assistant turn and its end-of-turn token, 0 on the
system and user turns. The mask comes from rendering each turn's prompt (with the generation prompt)
and the conversation up to that turn and checking both are prefixes of the whole; this works for
any chat template, unlike `{% generation %}` markers, which Llama 3.2's template lacks. Text from the data
never becomes a control token, and the template's date is TEMPLATE_DATE (job/chat_tokens.py).
Writes the token files (TRL's pre-tokenized format) and their statistics (job/paths.py); for a GGUF base, also
what the file is (job/gguf_base.py), for the model card.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import statistics
from pathlib import Path

from job import gguf_base, parallel
from job.chat_tokens import encode, holds_special_text
from job.config import Settings
from job.errors import ConfigError
from job.files import atomic_write_text, jsonl_line, read_jsonl, write_jsonl, write_lines
from job.formats import conversation, trained
from job.model import base_source, end_of_turn_ids, load_tokenizer
from job.paths import RunPaths

log = logging.getLogger(__name__)


def tokenize_row(cfg: Settings, tokenizer, row: dict) -> tuple[dict | None, str]:
    """Return ({input_ids, completion_mask}, status); status is ok, truncated or no_room (the first reply does not
    start within MAX_SEQ_LENGTH). A longer conversation is cut at MAX_SEQ_LENGTH."""
    ids, replies = reply_spans(cfg, tokenizer, conversation(cfg, row))
    if replies[0][0] >= cfg.MAX_SEQ_LENGTH:
        return None, "no_room"
    mask = [0] * len(ids)
    for start, end in replies:
        mask[start:end] = [1] * (end - start)
    status = "truncated" if len(ids) > cfg.MAX_SEQ_LENGTH else "ok"
    return {"input_ids": ids[: cfg.MAX_SEQ_LENGTH], "completion_mask": mask[: cfg.MAX_SEQ_LENGTH]}, status


def reply_spans(cfg: Settings, tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids, and where each trained assistant turn (formats.trained: not one the data gave
    weight 0) and the end-of-turn token after it lie: from the end of its prompt (the conversation before it, with
    the generation prompt) to the end of the conversation up to it. Special-token strings in the messages stay text
    (job/chat_tokens.py): only the template makes turns."""
    split = holds_special_text(tokenizer, messages)  # one way for all, so each part stays a prefix of the whole
    ids = functools.partial(encode, tokenizer, date_string=cfg.TEMPLATE_DATE, split=split)
    full = ids(messages, add_generation_prompt=False)
    spans = []
    for k in (k for k, m in enumerate(messages) if trained(m)):
        start = ids(messages[:k], add_generation_prompt=True)
        end = ids(messages[: k + 1], add_generation_prompt=False) if k < len(messages) - 1 else full
        if full[: len(start)] != start or full[: len(end)] != end or len(start) > len(end):
            what = (
                f"CHAT_TEMPLATE={cfg.CHAT_TEMPLATE!r}"
                if cfg.CHAT_TEMPLATE.strip()
                else f"BASE_MODEL={cfg.BASE_MODEL!r}"
            )
            raise ConfigError(
                f"{what}: its chat template renders the prompt differently from the start "
                "of the full conversation, so the reply cannot be located for the loss mask. Use a model whose "
                "template is prefix-stable (Llama 3.x, Qwen, Mistral instruct models are)."
            )
        spans.append((len(start), len(end)))
    return full, spans


def tokenize_rows(cfg: Settings, tokenizer, rows: list[dict]) -> list[tuple[str | None, str, int, int]]:
    """The pure per-row work, for a worker process: per row (its JSON line in the tokens file, or None when it is
    dropped; status; tokens; trained tokens). The line is made here so the stage's own process only joins them."""
    out = []
    for row in rows:
        item, status = tokenize_row(cfg, tokenizer, row)
        if item is None:
            out.append((None, status, 0, 0))
        else:
            out.append((jsonl_line(item), status, len(item["input_ids"]), sum(item["completion_mask"])))
    return out


def format_rows(cfg: Settings, tokenizer, rows: list[dict], split: str) -> tuple[list[str], dict]:
    """The rows' lines of the tokens file (one JSON object of input_ids and completion_mask each) and their stats."""
    from tqdm.auto import tqdm

    out, counts, lengths, trained = [], {"ok": 0, "truncated": 0, "no_room": 0}, [], 0
    workers = parallel.resolve_workers(cfg.WORKERS, len(rows))
    progress = parallel.Progress(f"format {split}", workers, total=len(rows))
    work = functools.partial(tokenize_rows, cfg, tokenizer)
    # Tokenized on `workers` processes, in order (job/parallel.py); counted here as one process would.
    results = contextlib.closing(parallel.ordered_map(work, parallel.chunks(rows), workers, "format"))
    with tqdm(total=len(rows), desc=f"format {split}", unit="row", disable=None) as bar, results as chunks:
        for _, done in chunks:
            for line, status, tokens, trained_tokens in done:
                counts[status] += 1
                if line is not None:
                    out.append(line)
                    lengths.append(tokens)
                    trained += trained_tokens
            bar.update(len(done))
            progress.update(bar.n)
    dropped = counts["no_room"]
    if rows and dropped / len(rows) > cfg.MAX_DROPPED_FRACTION:
        raise ConfigError(
            f"MAX_SEQ_LENGTH={cfg.MAX_SEQ_LENGTH}: {dropped} of {len(rows)} {split} rows ({dropped / len(rows):.0%}) "
            f"have no room left for the reply, more than MAX_DROPPED_FRACTION={cfg.MAX_DROPPED_FRACTION}. "
            "Raise MAX_SEQ_LENGTH, shorten SYSTEM_PROMPT, or raise MAX_DROPPED_FRACTION."
        )
    if not out:
        raise ConfigError(f"No {split} conversation fits MAX_SEQ_LENGTH={cfg.MAX_SEQ_LENGTH}; raise it.")
    q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else lengths * 19
    stats = {
        "rows": len(rows),
        "kept": len(out),
        "dropped_no_room_for_reply": dropped,
        "reply_truncated": counts["truncated"],
        "tokens": sum(lengths),
        "trained_tokens": trained,
        "tokens_per_row": {"mean": round(statistics.fmean(lengths), 1), "p50": q[9], "p95": q[18], "max": max(lengths)},
    }
    return out, stats


def run(cfg: Settings, paths: RunPaths) -> list[Path]:
    tokenizer = load_tokenizer(cfg)
    all_stats = {}
    for split, rows_file, tokens_file in (
        ("train", paths.train_rows, paths.train_tokens),
        ("eval", paths.eval_rows, paths.eval_tokens),
    ):
        rows = read_jsonl(rows_file)
        if not rows:  # EVAL_SAMPLES=0 leaves an empty eval split; evaluation is skipped then
            write_jsonl(tokens_file, [])
            continue
        lines, stats = format_rows(cfg, tokenizer, rows, split)
        write_lines(tokens_file, lines)
        all_stats[split] = stats
        log.info(
            f"{split}: {stats['rows']} rows -> {stats['kept']} sequences, {stats['tokens']} tokens "
            f"({stats['trained_tokens']} trained), {stats['reply_truncated']} replies truncated, "
            f"{stats['dropped_no_room_for_reply']} dropped"
        )
    atomic_write_text(paths.format_stats, json.dumps(all_stats, indent=2))
    written = [paths.train_tokens, paths.eval_tokens, paths.format_stats]
    if gguf_base.is_gguf(cfg):  # the card names the file and the model it came from (job/report.py)
        record = gguf_base.source_record(cfg, Path(base_source(cfg)))
        record["end_of_turn"] = tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
        atomic_write_text(paths.base_model, json.dumps(record, indent=2))
        written.append(paths.base_model)
    else:  # a record left by an earlier GGUF base of this run directory would name the wrong model on the card
        paths.base_model.unlink(missing_ok=True)
    return written
