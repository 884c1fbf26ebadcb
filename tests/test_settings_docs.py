"""Documents that name settings and exit codes agree with the code: they are generated from the one schema
(job/config.py), and this checks they were regenerated (`python -m job config --write-docs .`)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from dotenv import dotenv_values

from job import benchmark_tasks
from job.config import Settings, load_settings, render_env_example, render_settings_table, replace_section
from job.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE, README = ROOT / ".env.example", ROOT / "README.md"
FIX = "run `python -m job config --write-docs .` and commit the result"


def test_env_example_and_readme_tables_are_generated_from_the_schema_and_the_tasks():
    assert ENV_EXAMPLE.read_text(encoding="utf-8") == render_env_example(), f".env.example is stale: {FIX}"
    readme = README.read_text(encoding="utf-8")
    assert replace_section(readme, "settings", render_settings_table()) == readme, f"README table is stale: {FIX}"
    tasks = benchmark_tasks.render_table()
    assert replace_section(readme, "benchmark-tasks", tasks) == readme, f"README's benchmark tasks are stale: {FIX}"


def test_env_example_parses_to_the_schema_defaults_and_leaves_secrets_empty():
    """Read by the job itself as a user's .env would be: quoting and escaping survive the round trip."""
    loaded, defaults = load_settings(environ={}, env_file=ENV_EXAMPLE), Settings()
    differ = {
        f.name: getattr(loaded, f.name)
        for f in fields(Settings)
        if getattr(loaded, f.name) != getattr(defaults, f.name)
    }
    assert not differ, f".env.example values differ from job/config.py defaults: {differ}"
    values = dotenv_values(ENV_EXAMPLE)
    assert all(values[f.name] == "" for f in fields(Settings) if f.metadata["secret"])


def test_readme_exit_code_table_is_the_code_table():
    text = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes = [int(m) for m in re.findall(r"^\| (\d+) \|", text, re.M)]
    assert codes == sorted(EXIT_CODES), f"README exit codes {codes}, job/errors.py {sorted(EXIT_CODES)}"


def test_replace_section_keeps_the_markers_and_is_idempotent():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n"
    once = replace_section(text, "x", "new\n")
    assert once == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n" and replace_section(once, "x", "new\n") == once
    with pytest.raises(ValueError, match="markers"):
        replace_section("a\n<!-- y:start -->\nb\n<!-- y:end -->\n", "x", "new\n")


def test_readme_run_directory_listing_names_every_run_path():
    """README's "What a run leaves" lists what job/paths.py declares: every top-level entry on a line of its own,
    every file or folder name in its entry (a `*` pattern such as *_tokens.jsonl counts), and nothing else."""
    from fnmatch import fnmatch

    from job.paths import RunPaths

    block = README.read_text().split("## What a run leaves", 1)[1].split("```")[1]
    listed = {line.split()[0].split("/")[0] for line in block.splitlines() if line and not line[0].isspace()}
    declared = [
        getattr(RunPaths(Path()), name).as_posix() for name, v in vars(RunPaths).items() if isinstance(v, property)
    ]
    assert listed == {p.split("/")[0] for p in declared}, "README's run directory listing: top-level entries"
    words = re.findall(r"[\w.*-]+", block)
    unlisted = [p for p in declared if not any(fnmatch(Path(p).name, w) for w in words)]
    assert not unlisted, f"README's run directory listing lacks {unlisted}"
