"""The settings schema (job/config.py): defaults, parsing, validation that reports everything, .env, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import job_process

from job.config import SECRET_NAMES, SETTINGS, STAGES, Settings, load_settings
from job.errors import ConfigError
from job.model import lora_targets

CANARY = "hf_canary_config_0c1d2e"


def load(env_file=None, **env):
    return load_settings(environ={k: str(v) for k, v in env.items()}, env_file=env_file)


def problems(**env) -> str:
    with pytest.raises(ConfigError) as err:
        load(**env)
    return str(err.value)


def _meta_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # the module names only: no memory
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=64))


def test_defaults_are_the_seed_recipe():
    s = load()
    assert s == Settings()
    assert s.BASE_MODEL == "meta-llama/Llama-3.2-3B-Instruct"
    assert s.DATASET == "ruslanmv/ai-medical-chatbot"
    assert s.QUANTIZATION == "nf4"
    assert (s.LORA_R, s.LORA_ALPHA, s.LORA_TARGET_MODULES) == (8, 16, "auto")
    assert lora_targets(s, _meta_llama()) == ["q_proj", "v_proj"]  # auto, on a Llama
    assert (s.LEARNING_RATE, s.EPOCHS, s.NUM_SAMPLES) == (2e-4, 1.0, 1000)
    assert s.PRECISION == "auto" and s.stages == STAGES
    assert s.HF_TOKEN == "" and s.WANDB_API_KEY == ""


def test_every_setting_has_a_type_default_and_help():
    for name, f in SETTINGS.items():
        assert name.isupper() and f.metadata["help"].strip(), name
        assert str(f.type) in {"str", "int", "float", "bool"}, (name, f.type)
        default = f.default
        choices = f.metadata["choices"]
        assert choices is None or default in choices, name
    assert (
        {n for n, f in SETTINGS.items() if f.metadata["secret"]}
        == set(SECRET_NAMES)
        == {"HF_TOKEN", "WANDB_API_KEY", "JUDGE_API_KEY"}
    )


def test_all_problems_are_reported_together_each_named():
    msg = problems(
        LORA_R="0",  # range
        LEARNING_RATE="fast",  # not a number
        QUANTIZATION="int3",  # not a choice
        PACKING="maybe",  # not a bool
        EVAL_SAMPLES="-1",  # range
        HUB_REPO_ID="no-owner",  # format
        RUN_NAME="a/b",  # becomes a folder name
    )
    for expected in (
        "LORA_R=0",
        "LEARNING_RATE='fast'",
        "QUANTIZATION='int3'",
        "PACKING='maybe'",
        "EVAL_SAMPLES=-1",
        "HUB_REPO_ID='no-owner'",
        "RUN_NAME='a/b'",
    ):
        assert expected in msg, f"{expected} missing from:\n{msg}"
    assert msg.count("\n  - ") == 7, msg  # one line each, no duplicates
    assert "nf4, none" in msg  # the choices are listed


@pytest.mark.parametrize("raw", ["1", "true", "True", "YES", "on", " on "])
def test_true_values(raw):
    assert load(PACKING=raw).PACKING is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "off"])
def test_false_values(raw):
    assert load(PACKING=raw).PACKING is False


def test_numbers_parse():
    s = load(NUM_SAMPLES="2_000", LORA_R=" 16 ", LEARNING_RATE="3e-4", EPOCHS="2", WARMUP_RATIO="0.1")
    assert (s.NUM_SAMPLES, s.LORA_R, s.LEARNING_RATE, s.EPOCHS, s.WARMUP_RATIO) == (2000, 16, 3e-4, 2.0, 0.1)
    assert isinstance(s.EPOCHS, float) and isinstance(s.LORA_R, int)


@pytest.mark.parametrize(
    ("name", "raw", "words"),
    [
        ("PACKING", "maybe", "expected true or false"),
        ("LORA_R", "8.5", "LORA_R='8.5'"),
        ("LORA_R", "", "empty"),
        ("LEARNING_RATE", "", "empty"),
        ("LEARNING_RATE", "2", "between 0 and 1"),
        ("LORA_DROPOUT", "1.5", "between 0 and 1"),
        ("EPOCHS", "0", "greater than 0"),
        ("MAX_SEQ_LENGTH", "32", "too short"),
        ("LORA_TARGET_MODULES", " , ", "at least one module"),
        ("LORA_TARGET_MODULES", "auto,q_proj", "auto stands alone"),
        ("LORA_TARGET_MODULES", "k_proj, all-linear", "all-linear stands alone"),
        ("REPETITION_PENALTY", "0.5", "between 1.0 and 2.0"),
        ("STAGES", "sample,trian", "STAGES='sample,trian'"),
        ("BASE_MODEL", " ", "must not be empty"),
    ],
)
def test_bad_values(name, raw, words):
    msg = problems(**{name: raw})
    assert name in msg and words in msg


def test_choices():
    s = load(QUANTIZATION="none", PRECISION="bf16", LR_SCHEDULER="linear", ATTN_IMPLEMENTATION="eager")
    assert (s.QUANTIZATION, s.PRECISION, s.LR_SCHEDULER, s.ATTN_IMPLEMENTATION) == ("none", "bf16", "linear", "eager")
    assert "choose one of auto, bf16, fp16, fp32" in problems(PRECISION="fp8")


def test_cross_field_checks(monkeypatch):
    import importlib.util

    assert "EVAL_PROMPTS=20: cannot exceed EVAL_SAMPLES=10" in problems(EVAL_SAMPLES=10, EVAL_PROMPTS=20)
    assert "WANDB_API_KEY" in problems(REPORT_TO="wandb")
    # wandb is in neither the venv nor the image: say so before any model loads, not after training starts
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert "pip install wandb" in problems(REPORT_TO="wandb", WANDB_API_KEY="k")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    assert load(REPORT_TO="wandb", WANDB_API_KEY="k").REPORT_TO == "wandb"


@pytest.mark.parametrize(
    "name, raw, words",
    [
        # each failed only after the model had loaded, or not at all, before (issue 16)
        ("SEED", "-1", "between 0 and 4294967295"),
        ("SEED", "4294967296", "between 0 and 4294967295"),
        ("EPOCHS", "inf", "finite"),
        ("EPOCHS", "nan", "finite"),
        ("LEARNING_RATE", "inf", "finite"),
        ("OPTIMIZER", "adamw_bogus", "did you mean adamw"),
        ("WARMUP_RATIO", "1.0", "less than 1"),
        ("RUN_NAME", "..", "starting with a letter or digit"),
        ("RUN_NAME", ".", "starting with a letter or digit"),
        ("RUN_NAME", ".hidden", "starting with a letter or digit"),
        ("RUN_NAME", "a" * 300, "1 to 100"),
        ("RUN_NAME", "a/b", "1 to 100"),
    ],
)
def test_values_that_would_fail_late_are_refused_up_front(name, raw, words):
    msg = problems(**{name: raw})
    assert f"{name}=" in msg and words in msg, msg
    assert "OUTPUT_DIR=" not in msg  # the setting at fault is named, not another one


def test_optimizer_names_read_from_source_are_transformers_own():
    """config reads OptimizerNames from Transformers' source (importing it costs seconds). An upgrade that moves
    or reshapes the enum fails here: the read must give exactly the imported enum's names."""
    from transformers.training_args import OptimizerNames

    from job.config import _optimizer_names

    assert _optimizer_names() == tuple(o.value for o in OptimizerNames)
    assert "adamw_torch_fused" in _optimizer_names()


def test_retired_settings_say_what_became_of_them():
    assert "EVAL_GENERATIONS: renamed EVAL_PROMPTS" in problems(EVAL_GENERATIONS="8")
    assert "EVAL_COMPILE: removed" in problems(EVAL_COMPILE="true")


def test_env_file_that_is_not_utf8_is_named(tmp_path):
    env = tmp_path / ".env"
    env.write_bytes(b"SEED=1\nSYSTEM_PROMPT=caf\xe9\n")  # Latin-1, as some editors save
    with pytest.raises(ConfigError, match=r"\.env: line 2 is not UTF-8"):
        load_settings({}, env_file=env)


def test_stages_and_target_modules_are_split():
    s = load(STAGES=" sample , format,train ", LORA_TARGET_MODULES="q_proj, k_proj,v_proj ,o_proj")
    assert s.stages == ("sample", "format", "train")
    assert s.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert s.run_dir == Path("outputs") / "medical-assistant"


@pytest.mark.parametrize(
    ("typo", "meant"), [("LORA_RANK", "LORA_R"), ("LERNING_RATE", "LEARNING_RATE"), ("NUM_SAMPLE", "NUM_SAMPLES")]
)
def test_typo_in_dotenv_suggests_the_setting(tmp_path, typo, meant):
    env_file = tmp_path / ".env"
    env_file.write_text(f"{typo}=16\nSEED=1\n")
    msg = problems_from_file(env_file)
    assert f"{typo}: unknown setting in .env; did you mean {meant}?" in msg


def test_unknown_dotenv_names_without_a_close_match_point_to_the_list(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("BANANA=1\nHF_HOME=/cache\nWANDB_PROJECT=x\n")  # library variables are fine
    msg = problems_from_file(env_file)
    assert "BANANA: unknown setting in .env; see `python -m job config`" in msg
    assert "HF_HOME" not in msg and "WANDB_PROJECT" not in msg


def test_typo_in_the_environment_suggests_the_setting():
    assert "LERNING_RATE: unknown setting; did you mean LEARNING_RATE?" in problems(LERNING_RATE="1e-4")
    assert load(PATH="/usr/bin", HOME="/root").LORA_R == 8  # unrelated variables are ignored


def problems_from_file(env_file: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={}, env_file=env_file)
    return str(err.value)


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LORA_R=4\nSEED=7\n# a comment\nRUN_NAME='from-file'\n")
    s = load_settings(environ={"LORA_R": "32"}, env_file=env_file)
    assert (s.LORA_R, s.SEED, s.RUN_NAME) == (32, 7, "from-file")
    assert load_settings(environ={}, env_file=tmp_path / "missing.env") == Settings()


def test_masked_hides_secrets_only():
    masked = load(HF_TOKEN=CANARY, LORA_R=4).masked()
    assert masked["HF_TOKEN"] == "***" and masked["WANDB_API_KEY"] == ""
    assert masked["LORA_R"] == 4 and set(masked) == set(SETTINGS)
    assert CANARY not in json.dumps(masked)


# --- the CLI, as a user runs it -------------------------------------------------------------------------------
def test_cli_config_prints_resolved_settings_with_secrets_masked(tmp_path):
    (tmp_path / ".env").write_text("SEED=5\n")
    done = job_process({"HF_TOKEN": CANARY, "LORA_R": "4"}, "config", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["HF_TOKEN"] == "***" and printed["LORA_R"] == 4 and printed["SEED"] == 5
    assert set(printed) == set(SETTINGS)
    assert CANARY not in done.stdout + done.stderr
