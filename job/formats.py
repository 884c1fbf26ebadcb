"""The conversation formats DATASET may hold (DATA_FORMAT), and the one row shape every format becomes.

  columns   three text columns, DESCRIPTION_COLUMN / PATIENT_COLUMN / DOCTOR_COLUMN: a patient's message and the
            doctor's reply (the default dataset's shape)
  messages  OpenAI's chat shape: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]} ("user", "assistant" too)
  alpaca    {"instruction": "...", "input": "...", "output": "..."}: the instruction, then the input after a blank
            line when there is one, is the user's turn; the output is the reply

`auto` reads the keys of the first AUTO_ROWS rows. After the sample stage every row has one shape:
{"messages": [...], "source_index": i} ("source" too in a mixture), and "description" for the columns format
(the format stage puts it before the patient's message when USE_DESCRIPTION is on). Its messages are user and
assistant turns taking turns, from a user's turn to an assistant's, with a system message first only where the
data has one; the format stage puts SYSTEM_PROMPT first where a row has none (`conversation`): a dataset's own
system messages win over the setting.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from job.errors import ConfigError

FORMATS = ("columns", "messages", "sharegpt", "alpaca")
AUTO_ROWS = 100  # rows whose keys tell the format: a file's first rows, before any sampling
# Turn-based formats: (the field holding the turns, a turn's role key, its text key) and the role names each takes.
TURNS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
ROLES = {
    # "developer": OpenAI's newer name for the system message
    "messages": {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"},
    "sharegpt": {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
}
ALPACA = ("instruction", "input", "output")
# The cleaning rules of job/clean.py that a turn gets, by its role: a system message is the data's instruction to
# the model, not platform text, and is kept as it is.
CLEANED_AS = {"user": "patient", "assistant": "doctor"}


def keys(cfg, fmt: str) -> tuple[str, ...]:
    """The fields whose presence in a row tells the format."""
    return {
        "columns": (cfg.PATIENT_COLUMN, cfg.DOCTOR_COLUMN),
        "messages": ("messages",),
        "sharegpt": ("conversations",),
        "alpaca": ("instruction", "output"),
    }[fmt]


def fields(cfg, ds) -> list[str]:
    """The dataset's fields that a row of any format is read from (its other columns are never read)."""
    names = (cfg.DESCRIPTION_COLUMN, cfg.PATIENT_COLUMN, cfg.DOCTOR_COLUMN, "messages", "conversations", *ALPACA)
    return [c for c in dict.fromkeys(names) if c in ds.column_names]


def fits(cfg, record: dict) -> list[str]:
    """The formats whose fields the record holds (a missing field and a null one are alike: Arrow fills a field
    that only some rows have with nulls in the others)."""
    return [f for f in FORMATS if all(record.get(k) is not None for k in keys(cfg, f))]


def where(dataset: str, index: int) -> str:
    """A row as an error names it: its line in a local .jsonl file (the loader skips blank lines), else its index;
    after the DATASET value."""
    return f"DATASET={dataset!r} {_line(dataset, index)}"


def _line(dataset: str, index: int) -> str:
    path = Path(dataset).expanduser()
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with path.open("rb") as f:
            lines = (n for n, text in enumerate(f, 1) if text.strip())
            line = next(itertools.islice(lines, index, None), None)
        if line is not None:
            return f"line {line}"
    return f"row {index} (counting from 0)"


# --- which format ----------------------------------------------------------------------------------------------------
def detect(cfg, ds) -> tuple[str, str]:
    """(format, why): DATA_FORMAT's, or for auto the one format the first AUTO_ROWS rows' fields fit."""
    if cfg.DATA_FORMAT != "auto":
        return cfg.DATA_FORMAT, "set by DATA_FORMAT"
    head = ds.select_columns(fields(cfg, ds))[:AUTO_ROWS]  # only the fields a format has: a Hub dataset may hold images
    first: dict[str, int] = {}  # format -> the first row that fits it
    for j, values in enumerate(zip(*head.values())):
        shapes = fits(cfg, dict(zip(head, values)))
        if len(shapes) > 1:
            raise ConfigError(
                f"DATA_FORMAT=auto: {where(cfg.DATASET, j)} has the fields of {' and '.join(shapes)} "
                f"({', '.join(k for f in shapes for k in keys(cfg, f))}), so its format is ambiguous. Set DATA_FORMAT "
                f"to the one to train on ({', '.join(FORMATS)})."
            )
        for shape in shapes:
            first.setdefault(shape, j)
    if len(first) > 1:
        (a, i), (b, k) = sorted(first.items(), key=lambda item: item[1])[:2]
        raise _mixed(cfg, k, b, a, f"{_line(cfg.DATASET, i)} is")
    if not first:  # the columns format's own check names the columns missing (check_fields)
        return "columns", f"auto: none of the first {AUTO_ROWS} rows has the fields of another format"
    fmt = next(iter(first))
    return fmt, f"auto: the first {min(len(ds), AUTO_ROWS)} rows have the fields {', '.join(keys(cfg, fmt))}"


def _mixed(cfg, index: int, found: str, fmt: str, known: str) -> ConfigError:
    return ConfigError(
        f"{where(cfg.DATASET, index)} is a row of the {found} format, but {known} {fmt}: a dataset holds one "
        f"format. Convert the {found} rows to {fmt} (or the other way round), or split the file in two."
    )


def check_fields(cfg, fmt: str, ds) -> None:
    """The dataset has the fields of its format, and the columns format's columns hold text."""
    if fmt == "columns":
        return _check_columns(cfg, ds)
    if missing := [k for k in keys(cfg, fmt) if k not in ds.column_names]:
        raise ConfigError(
            f"DATA_FORMAT={fmt}: DATASET={cfg.DATASET!r} has no field {', '.join(map(repr, missing))}; its fields "
            f"are {ds.column_names}. Set DATA_FORMAT to the format of the data ({', '.join(FORMATS)}, or auto)."
        )


def _check_columns(cfg, ds) -> None:
    """Refuses a column this run needs that is missing or whose type cannot hold text (an integer Doctor column, a
    struct), naming it and its type."""
    columns = {"description": cfg.DESCRIPTION_COLUMN, "patient": cfg.PATIENT_COLUMN, "doctor": cfg.DOCTOR_COLUMN}
    required = ["patient", "doctor"] + (["description"] if cfg.USE_DESCRIPTION else [])
    missing = [f"{k.upper()}_COLUMN={columns[k]!r}" for k in required if columns[k] not in ds.column_names]
    if missing:
        raise ConfigError(
            f"DATASET={cfg.DATASET!r} lacks the column(s) {', '.join(missing)}; "
            f"it has {ds.column_names}. Set the *_COLUMN settings to match, or DATA_FORMAT to the data's format "
            f"({', '.join(FORMATS[1:])})."
        )
    bad = []
    for key in required:
        feature = ds.features.get(columns[key])
        inner = getattr(feature, "feature", feature)  # List(Value("string")) -> Value("string")
        dtype = "JSON object" if isinstance(inner, dict) else getattr(inner, "dtype", type(inner).__name__)
        if dtype not in ("string", "large_string", "null"):
            bad.append(f"{key.upper()}_COLUMN={columns[key]!r} holds {dtype} values")
    if bad:
        raise ConfigError(
            f"DATASET: {'; '.join(bad)}, not text. Point the setting at a text column, or convert the "
            "column to strings in the file."
        )


# --- a row of the data as a conversation -----------------------------------------------------------------------------
def read(cfg, fmt: str, record: dict, index: int) -> dict:
    """The raw conversation of one dataset row (before cleaning); a row of another format, or one whose turns
    cannot be a conversation, is a ConfigError naming the row, the field and the fix."""
    if any(record.get(k) is None for k in keys(cfg, fmt)) and (other := fits(cfg, record)):
        raise _mixed(cfg, index, other[0], fmt, "this dataset's format is")
    if fmt == "columns":
        columns = (cfg.PATIENT_COLUMN, cfg.DOCTOR_COLUMN, cfg.DESCRIPTION_COLUMN)
        return single_turn(*(as_text(record.get(c), c, index, cfg.DATASET) for c in columns))
    messages = _alpaca(record) if fmt == "alpaca" else _turns(fmt, record)
    if isinstance(messages, str):
        raise ConfigError(f"{where(cfg.DATASET, index)}, {messages}")
    return {"messages": messages}


def single_turn(user: str, reply: str, description: str | None = None) -> dict:
    """A row of one user message and its reply; `description` only for the columns format."""
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
    return row if description is None else {"description": description, **row}


def as_text(value: Any, column: str, index: int, dataset: str) -> str:
    """A dataset cell as text. A list of strings is one reply in parts: joined by newlines (not its Python repr)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
        return "\n".join(v for v in value if v)
    raise ConfigError(
        f"{where(dataset, index)}, column {column!r}: holds a {type(value).__name__} ({str(value)[:60]!r}), not text. "
        "Store each conversation's text as a string (or a list of strings, joined by newlines), "
        "or point the *_COLUMN setting at a text column."
    )


def _alpaca(record: dict) -> list[dict] | str:
    """The Alpaca row's two turns, or what is wrong with it."""
    text = {}
    for k in ALPACA:
        value = record.get(k)
        if value is not None and not isinstance(value, str):
            return f"field {k!r}: holds a {type(value).__name__} ({str(value)[:60]!r}), not text. Write it as a string."
        text[k] = value or ""
        if k != "input" and not text[k].strip():
            return f"field {k!r} is empty. Fill it in or delete the row (only 'input' may be empty)."
    user = f"{text['instruction']}\n\n{text['input']}" if text["input"].strip() else text["instruction"]
    return single_turn(user, text["output"])["messages"]


def _turns(fmt: str, record: dict) -> list[dict] | str:
    """A messages or ShareGPT row's turns with our role names, or what is wrong with them."""
    field = TURNS[fmt][0]
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        return f"field {field!r}: holds {str(turns)[:60]!r}, not a list of turns. Give each row a list of turns."
    messages = [_turn(fmt, turn, f"field {field}[{t}]") for t, turn in enumerate(turns)]
    if problem := next((m for m in messages if isinstance(m, str)), None):
        return problem
    problem = _order(messages)
    return f"field {field!r}: {problem}" if problem else messages


def _turn(fmt: str, turn: Any, at: str) -> dict | str:
    """One turn as a message with our role name, or what is wrong with it."""
    _, role_key, text_key = TURNS[fmt]
    if not isinstance(turn, dict):
        return (
            f"{at}: holds a {type(turn).__name__}, not a turn. Write each as {{{role_key!r}: ..., {text_key!r}: ...}}."
        )
    role, text = ROLES[fmt].get(turn.get(role_key)), turn.get(text_key)
    if fmt == "messages" and isinstance(text, list):  # OpenAI's content parts
        text, problem = _text_parts(text)
        if problem:
            return f"{at}.{text_key}{problem}"
    if role is None:
        names = ", ".join(ROLES[fmt])
        return f"{at}.{role_key}: {turn.get(role_key)!r} is not a role of the {fmt} format. Use one of {names}."
    if not isinstance(text, str):
        return f"{at}.{text_key}: holds a {type(text).__name__} ({str(text)[:60]!r}), not text. Write it as a string."
    if not text.strip():
        return f"{at}.{text_key} is empty. Fill it in, or delete the turn with the reply or question that goes with it."
    # OpenAI's fine-tuning format (and ShareGPT files that copy it): an assistant turn of weight 0 is not trained on.
    # Elsewhere a weight changes nothing (user and system text is never trained on), so it is left alone.
    if "weight" in turn and role == "assistant":
        weight = turn["weight"]
        if weight not in (0, 1) or isinstance(weight, bool):
            return f"{at}.weight: {weight!r}; an assistant turn's weight is 0 (not trained on) or 1."
        if weight == 0:
            return {"role": role, "content": text, "weight": 0}
    return {"role": role, "content": text}


def _text_parts(parts: list) -> tuple[str, str | None]:
    """OpenAI's content parts ([{"type": "text", "text": ...}, ...]) as one text, the parts joined by newlines, and
    what is wrong with them (None), from the part's index on. The job trains on text, so an image or audio part is
    refused rather than silently left out of a conversation that may refer to it."""
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if kind else f"{str(part)[:60]!r}"
            return "", (
                f"[{k}]: {what}, where only text parts ({{'type': 'text', 'text': ...}}) can be trained on. "
                "Remove the conversations with other parts, or write their content as a string."
            )
    return "\n".join(p["text"] for p in parts), None


def _order(messages: list[dict]) -> str | None:
    """What is wrong with the order of a conversation's roles, or None."""
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    if "assistant" not in roles:
        return (
            "the conversation has no assistant turn: nothing in it would be trained. Add the reply or delete the row."
        )
    for k, role in enumerate(roles[start:], start):
        expected = ("user", "assistant")[(k - start) % 2]
        if role != expected:
            return (
                f"turn {k} is the {role}'s where the {expected}'s belongs. A conversation is an optional system "
                "message, then user and assistant turns taking turns, from a user turn to an assistant turn."
            )
    if roles[-1] != "assistant":
        return f"the last turn ({len(roles) - 1}) is a user turn without a reply. End the conversation with its reply."
    return None


# --- a row as the model sees it --------------------------------------------------------------------------------------
def conversation(cfg, row: dict) -> list[dict]:
    """The row's messages as the model sees them, in training, evaluation and chat alike: SYSTEM_PROMPT first where
    the row has no system message, and with USE_DESCRIPTION the row's description before its first user turn."""
    messages = [dict(m) for m in row["messages"]]
    user = next(m for m in messages if m["role"] == "user")
    if cfg.USE_DESCRIPTION and row.get("description"):
        user["content"] = f"{row['description']}\n\n{user['content']}"
    if cfg.SYSTEM_PROMPT and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.SYSTEM_PROMPT})
    return messages


def turns(row: dict) -> list[str]:
    """What deduplication and decontamination compare: the user and assistant turns. Not a system message: often the
    same in every row, it would make every row a duplicate of every other."""
    return [m["content"] for m in row["messages"] if m["role"] != "system"]


def replies(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def trained(message: dict) -> bool:
    """Whether the loss covers this turn: every assistant turn but one the data gave weight 0 (OpenAI's format)."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0
