"""The README's settings table agrees with the one schema (job/config.py): the same names, the same defaults.

The table is any markdown table under a heading that contains "Settings" (up to the next heading of the
same or a higher level, so sub-sections with one table each are fine) whose first column holds `NAME` in
backticks; the default is read from the column whose header contains "default".
"""

from __future__ import annotations

import re
from pathlib import Path

from job.config import SETTINGS, _parse

README = Path(__file__).resolve().parents[1] / "README.md"
EMPTY = {"", '""', "''", "(empty)", "empty", "-", "–", "—", "(none)", "(unset)", "unset"}
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NAME_CELL = re.compile(r"^`([A-Z][A-Z0-9_]*)`$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def settings_table(text: str) -> list[tuple[str, str | None]]:
    """[(NAME, default cell or None)] from every table in the Settings section, in order."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if (m := HEADING.match(ln)) and "settings" in m[2].lower()), None)
    if start is None:
        return []
    level = len(HEADING.match(lines[start])[1])
    rows: list[tuple[str, str | None]] = []
    default_col: int | None = None
    in_code = False
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        if (m := HEADING.match(line)) and len(m[1]) <= level:
            break
        if not line.lstrip().startswith("|"):
            default_col = None  # a table ended
            continue
        cells = _cells(line)
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            continue  # the |---|---| line
        if (m := NAME_CELL.match(cells[0])) is None:
            # A header row: remember which column holds the default.
            default_col = next((j for j, c in enumerate(cells) if "default" in c.lower()), None)
            continue
        rows.append((m[1], cells[default_col] if default_col is not None and default_col < len(cells) else None))
    return rows


def _same_default(name: str, cell: str) -> bool:
    f = SETTINGS[name]
    default = f.default
    text = cell.strip()
    if text.startswith("`") and text.endswith("`"):
        text = text[1:-1]
    if default == "" or default is None:
        return text in EMPTY
    typ = {"bool": bool, "int": int, "float": float}.get(str(f.type), str)
    if typ is str:
        text = text.strip("\"'")
        if text.endswith(("…", "...")):  # a long default (the system prompt) may be shortened
            return default.startswith(text.rstrip(".… "))
        return text == default
    try:
        value = _parse(name, text.replace(",", ""), typ)
    except ValueError:
        return False
    return value == default if typ is not float else abs(value - default) <= 1e-12 * max(1.0, abs(default))


def readme_table() -> list[tuple[str, str | None]]:
    assert README.is_file(), "README.md is missing"
    rows = settings_table(README.read_text(encoding="utf-8"))
    assert rows, "README.md has no settings table (a heading with 'Settings', then rows starting | `NAME` |)"
    return rows


def test_readme_settings_table_lists_exactly_the_schema():
    table = readme_table()
    names = [n for n, _ in table]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    missing, extra = sorted(set(SETTINGS) - set(names)), sorted(set(names) - set(SETTINGS))
    assert not (duplicated or missing or extra), (
        f"README settings table: missing {missing}, not settings {extra}, listed twice {duplicated}"
    )


def test_readme_settings_table_defaults_are_the_schemas():
    table = readme_table()
    without = [n for n, d in table if d is None]
    assert not without, f"README settings table: no 'default' column for {without}"
    differ = {n: (d, SETTINGS[n].default) for n, d in table if n in SETTINGS and not _same_default(n, d)}
    assert not differ, f"README defaults differ from job/config.py (README, schema): {differ}"


def test_the_table_parser_reads_what_it_should():
    """The parser itself, on a sample in the documented format, so a broken parser cannot pass silently."""
    sample = "\n".join(
        [
            "# Project",
            "",
            "## Settings",
            "",
            "### Data",
            "",
            "| setting | default | what it does |",
            "|---|---|---|",
            "| `NUM_SAMPLES` | `1000` | conversations |",
            "| `HF_TOKEN` | (empty) | token |",
            "",
            "### LoRA",
            "",
            "| Setting | Default | |",
            "| --- | :---: | --- |",
            "| `LORA_R` | 8 | rank |",
            "",
            "```",
            "| `SEED` | 1 | in a code block |",
            "```",
            "",
            "## Next",
            "| `SEED` | 42 | elsewhere |",
        ]
    )
    rows = settings_table(sample)
    assert rows == [("NUM_SAMPLES", "`1000`"), ("HF_TOKEN", "(empty)"), ("LORA_R", "8")]
    assert all(_same_default(n, d) for n, d in rows)
    assert not _same_default("LORA_R", "16") and not _same_default("LEARNING_RATE", "2e-3")
    assert _same_default("LEARNING_RATE", "`2e-4`") and _same_default("PACKING", "`true`")
    assert _same_default("SYSTEM_PROMPT", "You are a careful, friendly medical assistant…")
    assert not _same_default("QUANTIZATION", "none") and _same_default("QUANTIZATION", "`nf4`")
