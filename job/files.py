"""Small file helpers shared by the stages: every file is written whole or not at all.

A spot machine can be killed at any instant. Writing to a temporary name, fsyncing, then
`os.replace` means a reader sees the old file or the new one, never half of one (on a local
disk; on bucket mounts the manifest, not the rename, is what says a stage finished).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk or a signal: leave the old file and no temporary one behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # write() errors carry no file name: say which file the stage was writing
        raise


def jsonl_line(row: dict[str, Any]) -> str:
    """One row as a line of a .jsonl file, without its newline."""
    return json.dumps(row, ensure_ascii=False)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_lines(path, map(jsonl_line, rows))


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """A .jsonl file from lines made by jsonl_line (in worker processes: job/formatting.py)."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# DATASET's local file types, by the `datasets` builder that reads each (job/sample.py)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def is_local_path(name: str) -> bool:
    """Whether a DATASET or BASE_MODEL value names a local file or folder (or looks like one) rather than a Hub id."""
    p = Path(name)
    return p.suffix.lower() in LOCAL_SUFFIXES or p.exists() or name.startswith((".", "/", "~"))
