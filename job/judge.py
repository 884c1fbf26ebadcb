"""A second opinion: a judge model compares the base and tuned answers, blind, pairwise, in both orders.

ROUGE-L against one doctor's terse reply says little about medicine, and the safety screen catches missing
referrals, not wrong advice. Here a judge model behind any OpenAI-compatible endpoint (OpenAI's API, a vLLM
or Ollama server) reads each held-out question, the doctor's reply as a reference, and the two answers as
"A" and "B", never told which one is tuned. Each pair is judged twice with the order swapped, so a judge
swayed by position shows up as low position consistency instead of as a result. The rubric and prompt are
a file people can review and change: job/prompts/judge.md.

Verdicts are appended to eval/judge.jsonl as they arrive; a rerun judges only the (pair, order) verdicts
that are missing or failed, so an endpoint that fails halfway costs only the calls not yet made. A SIGTERM or
Ctrl-C stops at once: queued calls are dropped, the calls in flight are abandoned, every verdict received is
kept.

The question, the reference and the answers are untrusted text (a dataset row, a model's output): each is
escaped before it goes between its tags, so none can close its tag and pose as the rubric, and the rubric
tells the judge that tagged text is data. Whatever the judge replies is scrubbed of secrets before it is
stored (job/redact.py).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import html
import json
import logging
import math
import os
import queue
import random
import re
import statistics
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import Settings
from job.errors import ConfigError, JobError, TransientError
from job.paths import RunPaths
from job.redact import public_url as _public_url
from job.redact import scrub, scrub_obj

log = logging.getLogger(__name__)

PROMPT_FILE = Path(__file__).parent / "prompts" / "judge.md"
CRITERIA = ("accuracy", "safety", "completeness", "clarity")
PREFERENCES = {"a": "A", "b": "B", "tie": "tie"}
PLACEHOLDERS = ("question", "reference", "answer_a", "answer_b")
Z95 = 1.959964  # two-sided 95% quantile of the standard normal
CHARS_PER_TOKEN = 4  # rough English average, for the cost estimate logged before the first call
# The openai client refuses an empty key; servers without auth (vLLM, Ollama) ignore whatever is sent.
PLACEHOLDER_KEY = "EMPTY"


# --- the rubric ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rubric:
    system: str
    user: string.Template
    digest: str  # of the file: verdicts given under another rubric are not reused


def load_rubric(path: Path = PROMPT_FILE) -> Rubric:
    text = Path(path).read_text(encoding="utf-8")
    parts = re.split(r"^## (system|user)[ \t]*$", text, flags=re.MULTILINE)
    sections = dict(zip(parts[1::2], (body.strip() for body in parts[2::2])))
    if set(sections) != {"system", "user"} or not all(sections.values()):
        raise ConfigError(f"{path}: needs a '## system' and a '## user' section, each with text")
    user = string.Template(sections["user"])
    try:
        user.substitute({k: "" for k in PLACEHOLDERS})
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: the user section may use only ${', $'.join(PLACEHOLDERS)} ({e!r})") from None
    return Rubric(sections["system"], user, hashlib.sha256(text.encode()).hexdigest()[:16])


def a_is_tuned(seed: int, item_id: Any, order: int) -> bool:
    """Whether the tuned answer is shown as "A": a seeded coin per pair for order 0, the other way for 1.

    random.Random seeds from a string through SHA-512, so the coin is the same in every process.
    """
    first = random.Random(f"{seed}:{item_id}").random() < 0.5
    return first if order == 0 else not first


def fence(text: str) -> str:
    """Untrusted text made safe to put between tags: &, < and > escaped as in HTML, so no text can write a
    tag (close its own block, open another) and every text reads back exactly (html.unescape)."""
    return html.escape(str(text), quote=False)


def _messages(rubric: Rubric, item: dict, answer_a: str, answer_b: str) -> list[dict]:
    texts = (item["prompt"], item["reference"], answer_a, answer_b)
    user = rubric.user.substitute({k: fence(text) for k, text in zip(PLACEHOLDERS, texts)})
    return [{"role": "system", "content": rubric.system}, {"role": "user", "content": user}]


def _item_digest(item: dict) -> str:
    text = json.dumps([item["prompt"], item["reference"], item["base"], item["tuned"]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- one verdict -----------------------------------------------------------------------------------
_FENCE = re.compile(r"```[A-Za-z]*\s*(.*?)```", re.DOTALL)


def parse_verdict(text: str) -> dict:
    """The judge's JSON object, checked: scores 1-5 for A and B on every criterion and a preference.

    Tolerates code fences and text around the object (models add both); raises ValueError otherwise.
    """
    decoder, problems = json.JSONDecoder(), []
    for chunk in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        start = chunk.find("{")
        while start != -1:
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                try:
                    return _checked(obj)
                except ValueError as e:
                    problems.append(str(e))  # the outermost object's problem is the one worth reporting
            start = chunk.find("{", start + 1)
    raise ValueError(problems[0] if problems else "no JSON object in the answer")


def _checked(obj: dict) -> dict:
    lower = {str(k).strip().lower(): v for k, v in obj.items()}
    preference = PREFERENCES.get(str(lower.get("preference", "")).strip().lower())
    if preference is None:
        raise ValueError(f"preference must be A, B or tie, got {lower.get('preference')!r}")
    scores = {}
    for side in ("A", "B"):
        given = lower.get(side.lower())
        if not isinstance(given, dict):
            raise ValueError(f"no scores for answer {side}")
        given = {str(k).strip().lower(): v for k, v in given.items()}
        scores[side] = {}
        for c in CRITERIA:
            try:
                value = float(given[c])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"answer {side}: {c} must be a number from 1 to 5, got {given.get(c)!r}") from None
            if not 1 <= value <= 5:
                raise ValueError(f"answer {side}: {c} must be from 1 to 5, got {value}")
            scores[side][c] = value
    return {"preference": preference, "A": scores["A"], "B": scores["B"], "reason": str(lower.get("reason", ""))}


def _ask(client, cfg: Settings, rubric: Rubric, item: dict, order: int) -> dict:
    """One call to the judge; returns the verdict record for eval/judge.jsonl (ok: false if unreadable)."""
    tuned_first = a_is_tuned(cfg.SEED, item["id"], order)
    shown = {"A": "tuned", "B": "base"} if tuned_first else {"A": "base", "B": "tuned"}
    t0 = time.perf_counter()
    response = client.chat.completions.create(
        model=cfg.JUDGE_MODEL,
        messages=_messages(rubric, item, item[shown["A"]], item[shown["B"]]),
        temperature=0,
        max_tokens=cfg.JUDGE_MAX_TOKENS,
    )
    choice = _first_choice(response, cfg)
    content = getattr(choice.message, "content", None)
    if not isinstance(content, str):  # null, or a list or object where text belongs: an unreadable verdict
        content = "" if content is None else json.dumps(content, default=str)
    usage = getattr(response, "usage", None)
    record = {
        "id": item["id"],
        "order": order,
        "a": shown["A"],
        "judge_model": cfg.JUDGE_MODEL,
        "rubric": rubric.digest,
        "item": _item_digest(item),
        "prompt_tokens": _count(getattr(usage, "prompt_tokens", None)),
        "completion_tokens": _count(getattr(usage, "completion_tokens", None)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    try:
        verdict = parse_verdict(content)
    except ValueError as e:
        cut = getattr(choice, "finish_reason", None) == "length"
        why = f"{e} (the answer was cut at JUDGE_MAX_TOKENS={cfg.JUDGE_MAX_TOKENS})" if cut else str(e)
        return record | {"ok": False, "error": why, "raw": content[:2000]}
    winner = "tie" if verdict["preference"] == "tie" else shown[verdict["preference"]]
    return record | {
        "ok": True,
        "preference": verdict["preference"],
        "winner": winner,
        "scores": {shown["A"]: verdict["A"], shown["B"]: verdict["B"]},
        "reason": verdict["reason"],
    }


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _first_choice(response: Any, cfg: Settings) -> Any:
    """The reply's first choice; a ConfigError when the reply is not a chat completion at all.

    The openai client hands back the body as text when it is not JSON (a web page, a proxy's login page) and
    an object without `choices` when the JSON is something else: an endpoint that answers 200 like that to
    a chat-completions request is not an OpenAI-compatible API, and will answer every retry the same way.
    """
    choices = getattr(response, "choices", None) if not isinstance(response, str) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    if choice is not None and getattr(choice, "message", None) is not None:
        return choice
    if isinstance(response, str):
        head = " ".join(response.split())[:120]
        what = f"a non-JSON body ({head!r}{'...' if len(response) > 120 else ''})"
    else:
        what = "JSON without a 'choices' list" if not choices else "a choice without a 'message'"
    raise ConfigError(
        f"JUDGE_BASE_URL={_public_url(cfg.JUDGE_BASE_URL)}: answered a chat-completions request for "
        f"JUDGE_MODEL={cfg.JUDGE_MODEL!r} with 200 and {scrub(what)}: not an OpenAI-compatible API. Point "
        "JUDGE_BASE_URL at the API's base URL (usually ending in /v1, e.g. http://HOST:8000/v1) and check that "
        "it serves JUDGE_MODEL. Verdicts so far are kept."
    )


# --- errors: typed, never read from message text ----------------------------------------------------


def classify(error: Exception, cfg: Settings) -> JobError | None:
    """The job error for an openai exception: ConfigError (exit 2) or TransientError (exit 4); None if neither."""
    import openai

    url = _public_url(cfg.JUDGE_BASE_URL)
    detail = scrub(str(getattr(error, "message", error)))
    status = getattr(error, "status_code", None)
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return ConfigError(
            f"JUDGE_API_KEY: the judge endpoint {url} refused the key ({status}: {detail}). "
            "Set a valid key for that endpoint; a retry with the same key fails the same way."
        )
    if isinstance(error, openai.NotFoundError):
        return ConfigError(
            f"JUDGE_MODEL={cfg.JUDGE_MODEL!r}: {url} answered 404 ({detail}). Check the model name the server "
            "serves (GET /v1/models lists them) and that JUDGE_BASE_URL ends in /v1."
        )
    if isinstance(error, openai.RateLimitError) and getattr(error, "code", None) == "insufficient_quota":
        return ConfigError(f"JUDGE_API_KEY: the account has no quota left at {url} ({detail}); add credit.")
    if isinstance(error, openai.RateLimitError):
        return TransientError(
            f"the judge endpoint {url} is rate-limiting (429) after JUDGE_MAX_RETRIES={cfg.JUDGE_MAX_RETRIES} "
            "retries: retry later or lower JUDGE_CONCURRENCY. Verdicts so far are kept."
        )
    if isinstance(error, openai.APITimeoutError):
        return TransientError(
            f"the judge endpoint {url} did not answer within JUDGE_TIMEOUT={cfg.JUDGE_TIMEOUT} s, "
            f"{cfg.JUDGE_MAX_RETRIES + 1} times: retry later. Verdicts so far are kept."
        )
    if isinstance(error, openai.APIConnectionError):
        return TransientError(
            f"cannot reach the judge endpoint JUDGE_BASE_URL={url} ({detail}) after "
            f"{cfg.JUDGE_MAX_RETRIES} retries: is the server up? Verdicts so far are kept."
        )
    if isinstance(error, (openai.InternalServerError, openai.ConflictError)):
        return TransientError(
            f"the judge endpoint {url} failed ({status}: {detail}) after {cfg.JUDGE_MAX_RETRIES} retries: "
            "retry later. Verdicts so far are kept."
        )
    if isinstance(error, openai.APIStatusError) and 400 <= status < 500:  # 400, 413, 422: the request itself
        return ConfigError(
            f"the judge endpoint {url} rejected the request ({status}: {detail}). "
            "Check JUDGE_MODEL and JUDGE_MAX_TOKENS against what the endpoint accepts."
        )
    if isinstance(error, openai.APIStatusError):
        return TransientError(f"the judge endpoint {url} failed ({status}: {detail}): retry later.")
    return None


# --- eval/judge.jsonl ------------------------------------------------------------------------------
def read_verdicts(path: Path) -> list[dict]:
    """The verdict records in eval/judge.jsonl; a line that is not one (cut short by a kill, edited by hand,
    not JSON, not a record of the expected shape) is skipped with a warning, and that verdict asked again."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, a number too long to read, nesting too deep
            problem = "not JSON" + (" (the last line, probably cut short by a kill)" if n == len(lines) else "")
        else:
            problem = _record_problem(row)
        if problem:
            log.warning("%s line %d: %s; it is ignored and that verdict asked for again", path, n, problem)
            continue
        rows.append(row)
    return rows


def _record_problem(r: Any) -> str | None:
    """Why `r` is not a verdict record this module wrote, or None: every field the figures read, checked."""
    if not isinstance(r, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        return f"not a JSON object but {kind.get(type(r), 'null')}"
    if not isinstance(r.get("id"), (str, int)) or isinstance(r.get("id"), bool):
        return "no pair id"
    if type(r.get("order")) is not int or r["order"] not in (0, 1):
        return "no order 0 or 1"
    if not isinstance(r.get("ok"), bool):
        return "no 'ok' true or false"
    for k in ("prompt_tokens", "completion_tokens"):
        if r.get(k) is not None and _count(r[k]) is None:
            return f"{k} is not a count"
    return _verdict_problem(r) if r["ok"] else None


def _verdict_problem(r: dict) -> str | None:
    if r.get("preference") not in PREFERENCES.values() or r.get("winner") not in ("tuned", "base", "tie"):
        return "a verdict without a preference (A, B or tie) and winner (tuned, base or tie)"
    scores = r.get("scores")
    for model in ("base", "tuned"):
        given = scores.get(model) if isinstance(scores, dict) else None
        if not isinstance(given, dict) or not all(
            isinstance(given.get(c), (int, float)) and not isinstance(given.get(c), bool) and 1 <= given[c] <= 5
            for c in CRITERIA
        ):
            return f"a verdict without {model}'s scores from 1 to 5 on {', '.join(CRITERIA)}"
    return None


def _append(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())  # a verdict is paid for: on disk before the next one


def _current(records: list[dict], cfg: Settings, rubric: Rubric, items: list[dict]) -> dict[tuple[str, int], dict]:
    """The newest readable verdict per (pair, order) given by this judge model, rubric and these exact answers.

    A failed call (an unreadable verdict) is not one: it is asked again on the next run, so a judge that was
    broken for a while costs those calls once more instead of leaving the pairs undecided for good.
    """
    digests = {str(it["id"]): _item_digest(it) for it in items}
    out = {}
    for r in records:
        key = (str(r["id"]), r["order"])
        if r["ok"] and r.get("judge_model") == cfg.JUDGE_MODEL and r.get("rubric") == rubric.digest:
            if digests.get(key[0]) == r.get("item"):
                out[key] = r
    return out


# --- the figures -----------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (good at small n and near 0 or 1).

    Six lines here rather than scipy or statsmodels as a dependency for one formula.
    """
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(verdicts: dict[tuple[str, int], dict], items: list[dict], cfg: Settings, calls_this_run: int) -> dict:
    """Figures from the verdicts: the pair outcomes with intervals, position consistency, criterion means, cost.

    A pair is decided when both orders gave a readable verdict. Its outcome is the winner both orders agree
    on; when they disagree it is a tie (MT-Bench's rule), so a judge that always says "A" scores all ties
    and 0% consistency rather than a 50% win rate.
    """
    records = list(verdicts.values())
    outcomes, consistent = _pair_outcomes(verdicts, items)
    decided = sum(outcomes.values())
    ok = [r for r in records if r["ok"]]
    decisive = [r for r in ok if r["preference"] != "tie"]
    interval = {k: wilson(v, decided) for k, v in outcomes.items()}
    return {
        "judge_model": cfg.JUDGE_MODEL,
        "endpoint": _public_url(cfg.JUDGE_BASE_URL),
        "pairs": len(items),
        "pairs_decided": decided,
        "outcomes": outcomes,
        "tuned_win_rate": _share(outcomes["win"], decided),
        "tie_rate": _share(outcomes["tie"], decided),
        "tuned_loss_rate": _share(outcomes["loss"], decided),
        "interval_95": {k: [_r(v[0]), _r(v[1])] if v else None for k, v in interval.items()},
        "interval_method": "Wilson score interval per outcome over decided pairs",
        "pair_rule": "win or loss only when both orders agree; disagreement counts as a tie",
        "position_consistency": _share(consistent, decided),
        "orders_disagree": decided - consistent,  # pairs counted as ties because the two orders disagreed
        # Among verdicts that picked a side: how often it was the answer shown first (0.5 = no position bias).
        "first_position_preferred": _share(sum(r["preference"] == "A" for r in decisive), len(decisive)),
        "criteria": {model: _criterion_means(ok, model) for model in ("base", "tuned")},
        "verdicts": len(ok),
        "calls": len(records),
        "calls_this_run": calls_this_run,
        "failures": len(records) - len(ok),
        "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in records),
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in records),
    }


def _pair_outcomes(verdicts: dict[tuple[str, int], dict], items: list[dict]) -> tuple[dict[str, int], int]:
    """Win/tie/loss counts of the decided pairs, and how many of them both orders agreed on."""
    outcomes = {"win": 0, "tie": 0, "loss": 0}
    consistent = 0
    for it in items:
        pair = [verdicts.get((str(it["id"]), order)) for order in (0, 1)]
        if not all(v and v["ok"] for v in pair):
            continue
        first, second = pair[0]["winner"], pair[1]["winner"]
        consistent += first == second
        outcomes[{"tuned": "win", "base": "loss", "tie": "tie"}[first if first == second else "tie"]] += 1
    return outcomes, consistent


def _criterion_means(ok: list[dict], model: str) -> dict[str, float | None]:
    return {c: _r(statistics.fmean(r["scores"][model][c] for r in ok)) if ok else None for c in CRITERIA}


def _r(x: float) -> float:
    return round(x, 4)


def _share(k: int, n: int) -> float | None:
    return _r(k / n) if n else None


# --- the stage's entry point -----------------------------------------------------------------------
def _client(cfg: Settings):
    import openai

    # One INFO line per request from httpx2, the HTTP library of openai 3.x (used by nothing else here),
    # would drown the job's log; retries are still logged by openai's own logger, progress by ours.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    # The library's own retries (connection errors, 408, 409, 429, 5xx; exponential backoff that honours
    # Retry-After) and timeout, set from our settings; the key goes to the client and nowhere else.
    return openai.OpenAI(
        api_key=cfg.JUDGE_API_KEY or PLACEHOLDER_KEY,
        base_url=cfg.JUDGE_BASE_URL,
        max_retries=cfg.JUDGE_MAX_RETRIES,
        timeout=cfg.JUDGE_TIMEOUT,
    )


def _call_all(client, cfg: Settings, rubric: Rubric, todo: list[tuple[dict, int]], keep) -> BaseException | None:
    """Make the calls, JUDGE_CONCURRENCY at a time, passing each record to `keep` (in this thread) as it comes.

    Returns the first failure, after the calls in flight when it happened have finished and been kept (no
    new call starts after a failure). Anything raised here instead, a SIGTERM's Stopped or Ctrl-C's
    KeyboardInterrupt, returns at once: the queued calls are dropped, the records already received are kept,
    and the calls in flight are abandoned in their daemon threads, so the exit never waits on the endpoint.
    (A ThreadPoolExecutor would: its threads are joined when the interpreter exits.)
    """
    jobs = collections.deque(todo)  # popleft is atomic: the workers share it without a lock
    done: queue.SimpleQueue = queue.SimpleQueue()  # (record, None) or (None, exception)
    stop = threading.Event()
    ask = functools.partial(_ask, client, cfg, rubric)
    threads = [
        threading.Thread(target=_worker, args=(ask, jobs, done, stop), name=f"judge-{i}", daemon=True)
        for i in range(min(cfg.JUDGE_CONCURRENCY, len(todo)))
    ]
    for t in threads:
        t.start()
    failure: BaseException | None = None
    made = 0
    try:
        while any(t.is_alive() for t in threads) or not done.empty():
            try:
                # A short wait, so a signal's exception (raised in this thread) is never held up for long.
                record, error = done.get(timeout=0.2)
            except queue.Empty:
                continue
            failure = failure or error  # the first failure is the one reported
            if error is None:
                keep(record)
                made += 1
                if failure is None and (made % max(10, len(todo) // 10) == 0 or made == len(todo)):
                    log.info("judge: %d/%d verdicts", made, len(todo))
        return failure
    finally:
        stop.set()  # no queued call starts after this; on an early exit, keep what already arrived
        _keep_arrived(done, keep)


def _worker(ask, jobs: collections.deque, done: queue.SimpleQueue, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            it, order = jobs.popleft()
        except IndexError:
            return
        if stop.is_set():  # set while this thread took the job
            return
        try:
            done.put((ask(it, order), None))
        except BaseException as e:  # the first failure stops new calls; it is reported by the caller
            stop.set()
            done.put((None, e))


def _keep_arrived(done: queue.SimpleQueue, keep) -> None:
    while True:
        try:
            record, error = done.get_nowait()
        except queue.Empty:
            return
        if error is None:
            try:
                keep(record)
            except Exception:
                return  # e.g. a full disk: the exception already on its way out is the one to report


def _ask_missing(cfg: Settings, path: Path, rubric: Rubric, todo: list[tuple[dict, int]], have: dict) -> int:
    """Ask for the `todo` verdicts, appending each to `path` and `have` as it comes; returns how many came."""
    made = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")  # end a line a kill cut short, so the next verdict starts on its own line
    with path.open("a", encoding="utf-8") as f:

        def keep(record: dict) -> None:
            nonlocal made
            record = scrub_obj(record)  # a reply that quotes a key or a URL's password is stored without it
            _append(f, record)
            have[(str(record["id"]), record["order"])] = record
            made += 1

        failure = _call_all(_client(cfg), cfg, rubric, todo, keep)
    if failure is None:
        return made
    error = failure if isinstance(failure, JobError) else classify(failure, cfg)
    if error is None:
        raise failure
    raise error from None  # the openai traceback adds nothing to the message, and may quote the request


def judge(cfg: Settings, paths: RunPaths, items: list[dict]) -> dict:
    """Judge every pair in both orders (only what eval/judge.jsonl lacks); return the summary for metrics.json.

    items: [{id, prompt, reference, base, tuned}]. Raises ConfigError (bad key, unknown model: exit 2) or
    TransientError (endpoint down, 5xx or 429 after retries: exit 4); verdicts already received stay on disk.
    """
    from job import redact

    redact.register(cfg.JUDGE_API_KEY)
    redact.register_url(cfg.JUDGE_BASE_URL)
    rubric = load_rubric()
    have = _current(read_verdicts(paths.judge), cfg, rubric, items)
    todo = [(it, order) for it in items for order in (0, 1) if (str(it["id"]), order) not in have]
    prompt_chars = sum(sum(len(m["content"]) for m in _messages(rubric, it, it["base"], it["tuned"])) for it, _ in todo)
    log.info(
        f"judge: {len(todo)} calls to {cfg.JUDGE_MODEL!r} at {_public_url(cfg.JUDGE_BASE_URL)} ({len(items)} pairs "
        f"x 2 orders, {2 * len(items) - len(todo)} verdicts already in {paths.judge.name}); about "
        f"{prompt_chars // CHARS_PER_TOKEN:,} prompt tokens + at most {len(todo) * cfg.JUDGE_MAX_TOKENS:,} completion "
        f"tokens (estimate at {CHARS_PER_TOKEN} characters a token)"
    )
    made = _ask_missing(cfg, paths.judge, rubric, todo, have) if todo else 0
    summary = summarize(have, items, cfg, made) | {"rubric": rubric.digest}
    s, consistency = summary, summary["position_consistency"]
    log.info(
        f"judge: tuned better in {s['outcomes']['win']} of {s['pairs_decided']} decided pairs, tie "
        f"{s['outcomes']['tie']}, worse {s['outcomes']['loss']}; position consistency "
        f"{'n/a' if consistency is None else f'{consistency:.0%}'}; {s['calls']} calls ({s['failures']} failed), "
        f"{s['prompt_tokens']:,} prompt + {s['completion_tokens']:,} completion tokens"
    )
    return summary
