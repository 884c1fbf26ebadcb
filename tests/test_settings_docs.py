"""Documents that name settings agree with the one schema, job/config.py.

.env.example lists every setting with its default and its help; sky/*.yaml envs name only settings.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from job.config import SETTINGS, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = ROOT / ".env.example"


def test_env_example_lists_every_setting_once():
    keys = [line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#"]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicated, f".env.example sets these more than once: {duplicated}"
    missing, extra = sorted(set(SETTINGS) - set(keys)), sorted(set(keys) - set(SETTINGS))
    assert not missing and not extra, f".env.example: missing {missing}, not settings {extra}"


def test_env_example_values_are_the_schema_defaults():
    assert all(v is not None for v in dotenv_values(ENV_EXAMPLE).values()), "write KEY=value (or KEY=) lines"
    # Parsed by the job itself, as if .env.example were a user's .env and the environment were empty.
    loaded, defaults = load_settings(environ={}, env_file=ENV_EXAMPLE), Settings()
    differ = {
        f.name: (getattr(loaded, f.name), getattr(defaults, f.name))
        for f in fields(Settings)
        if getattr(loaded, f.name) != getattr(defaults, f.name)
    }
    assert not differ, f".env.example values differ from job/config.py defaults (file, schema): {differ}"


def test_env_example_secrets_are_empty():
    values = dotenv_values(ENV_EXAMPLE)
    for name, f in SETTINGS.items():
        if f.metadata["secret"]:
            assert values[name] == "", f"{name} must be empty in .env.example"


def test_env_example_comment_above_each_setting_is_its_help():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0]
        if line.startswith("#") or name not in SETTINGS:
            continue
        comments = []
        for above in reversed(lines[:i]):
            if not above.startswith("# ") or above.startswith("# ---"):
                break
            comments.insert(0, above[2:])
        help_ = SETTINGS[name].metadata["help"]
        assert comments and comments[0].startswith(help_), f".env.example: put '# {help_}' above {name}="


@pytest.mark.parametrize("path", sorted((ROOT / "sky").glob("*.yaml")), ids=lambda p: p.name)
def test_sky_envs_are_settings(path):
    envs = yaml.safe_load(path.read_text()).get("envs") or {}
    unknown = sorted(set(envs) - set(SETTINGS))
    assert not unknown, f"{path.relative_to(ROOT)}: envs that are not settings in job/config.py: {unknown}"
