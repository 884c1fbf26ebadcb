"""The format stage (job/formatting.py): chat-template tokenization and the reply-only loss mask, tiny tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from job.config import load_settings
from job.errors import ConfigError
from job.formatting import format_rows, tokenize_row
from job.model import build_messages, load_tokenizer

PATIENT = "I have had a headache and a mild fever for two days. Should I worry?"
REPLY = "Drink fluids and rest. See a doctor if the fever lasts more than three days or you feel worse."
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def settings(model_dir, **env):
    base = {"BASE_MODEL": str(model_dir), "MAX_SEQ_LENGTH": "512"}
    return load_settings(environ={**base, **{k: str(v) for k, v in env.items()}}, env_file=None)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(settings(tiny_model_dir))


def masked_in(item):
    return [t for t, m in zip(item["input_ids"], item["completion_mask"]) if m]


def test_mask_covers_exactly_the_reply_and_its_end_of_turn(tiny_model_dir, tok):
    cfg = settings(tiny_model_dir)
    item, status = tokenize_row(cfg, tok, {"patient": PATIENT, "doctor": REPLY})
    ids, mask = item["input_ids"], item["completion_mask"]
    assert status == "ok" and len(ids) == len(mask) < cfg.MAX_SEQ_LENGTH
    assert set(mask) == {0, 1}

    first = mask.index(1)
    last = len(mask) - 1 - mask[::-1].index(1)
    assert mask[first : last + 1] == [1] * (last + 1 - first), "the reply is one contiguous run"
    assert last == len(ids) - 1
    # Everything before the reply -- BOS, system and user turns, their headers, the assistant header -- is 0.
    before = tok.decode(ids[:first], skip_special_tokens=False)
    assert before.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert cfg.SYSTEM_PROMPT in before and PATIENT in before
    assert before.endswith(ASSISTANT_HEADER), "the first trained token comes right after the assistant header"
    # ... and the prompt part is exactly what generation starts from.
    prompt_ids = tok.apply_chat_template(
        build_messages(cfg, PATIENT), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert ids[:first] == list(prompt_ids)
    # The trained tokens are the reply and the end-of-turn token, nothing else.
    assert ids[last] == tok.convert_tokens_to_ids("<|eot_id|>") == tok.eos_token_id
    assert tok.decode(masked_in(item), skip_special_tokens=False) == REPLY + "<|eot_id|>"


def test_mask_agrees_with_the_templates_generation_markers(tiny_model_dir, tok):
    """The tiny template marks the assistant turn with {% generation %}; our prefix-based mask must agree."""
    cfg = settings(tiny_model_dir)
    item, _ = tokenize_row(cfg, tok, {"patient": PATIENT, "doctor": REPLY})
    marked = tok.apply_chat_template(
        build_messages(cfg, PATIENT, reply=REPLY), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert list(marked["input_ids"]) == item["input_ids"]
    assert list(marked["assistant_masks"]) == item["completion_mask"]


def test_no_system_turn_when_the_system_prompt_is_empty(tiny_model_dir, tok):
    cfg = settings(tiny_model_dir, SYSTEM_PROMPT="")
    item, _ = tokenize_row(cfg, tok, {"patient": PATIENT, "doctor": REPLY})
    text = tok.decode(item["input_ids"], skip_special_tokens=False)
    assert "system" not in text and text.startswith("<|begin_of_text|><|start_header_id|>user")
    assert tok.decode(masked_in(item), skip_special_tokens=False) == REPLY + "<|eot_id|>"


def test_description_goes_before_the_patient_text_when_asked(tiny_model_dir, tok):
    row = {"patient": PATIENT, "doctor": REPLY, "description": "Headache with fever"}
    plain, _ = tokenize_row(settings(tiny_model_dir), tok, row)
    with_desc, _ = tokenize_row(settings(tiny_model_dir, USE_DESCRIPTION="true"), tok, row)
    assert "Headache with fever" not in tok.decode(plain["input_ids"])
    assert f"Headache with fever\n\n{PATIENT}" in tok.decode(with_desc["input_ids"])
    assert masked_in(plain) == masked_in(with_desc)  # the trained reply is the same


def test_truncation_keeps_the_prompt_and_cuts_the_reply(tiny_model_dir, tok):
    full, _ = tokenize_row(settings(tiny_model_dir), tok, {"patient": PATIENT, "doctor": REPLY})
    n_prompt = full["completion_mask"].index(1)
    limit = n_prompt + 5
    cfg = settings(tiny_model_dir, MAX_SEQ_LENGTH=limit)
    item, status = tokenize_row(cfg, tok, {"patient": PATIENT, "doctor": REPLY})
    assert status == "truncated"
    assert len(item["input_ids"]) == len(item["completion_mask"]) == limit
    assert item["input_ids"] == full["input_ids"][:limit]
    assert item["completion_mask"] == [0] * n_prompt + [1] * 5
    assert tok.eos_token_id not in item["input_ids"][n_prompt:], "a cut reply has no end-of-turn"


def _rows(n, long_prompts=0):
    long_patient = "My head hurts and I feel dizzy when I stand up. " * 60  # ~1,000 tiny-BPE tokens
    return [
        {"patient": long_patient if i < long_prompts else f"{PATIENT} (case {i})", "doctor": REPLY} for i in range(n)
    ]


def test_rows_whose_prompt_leaves_no_room_are_dropped_and_counted(tiny_model_dir, tok):
    cfg = settings(tiny_model_dir, MAX_SEQ_LENGTH=256, MAX_DROPPED_FRACTION=0.05)
    item, status = tokenize_row(cfg, tok, _rows(1, long_prompts=1)[0])
    assert (item, status) == (None, "no_room")

    lines, stats = format_rows(cfg, tok, _rows(20, long_prompts=1), "train")  # 1/20 = 0.05: at the limit
    out = [json.loads(line) for line in lines]
    assert len(out) == stats["kept"] == 19
    assert stats["rows"] == 20 and stats["dropped_no_room_for_reply"] == 1 and stats["reply_truncated"] == 0
    assert stats["tokens"] == sum(len(r["input_ids"]) for r in out)
    assert stats["trained_tokens"] == sum(sum(r["completion_mask"]) for r in out)
    assert max(len(r["input_ids"]) for r in out) <= 256


def test_too_many_dropped_rows_is_a_config_error_naming_max_seq_length(tiny_model_dir, tok):
    cfg = settings(tiny_model_dir, MAX_SEQ_LENGTH=256, MAX_DROPPED_FRACTION=0.05)
    with pytest.raises(ConfigError) as err:
        format_rows(cfg, tok, _rows(20, long_prompts=2), "train")  # 2/20 = 0.10
    msg = str(err.value)
    assert "MAX_SEQ_LENGTH=256" in msg and "MAX_DROPPED_FRACTION=0.05" in msg and "2 of 20" in msg


def test_a_tokenizer_without_chat_template_is_a_config_error(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, plain)
    tok = AutoTokenizer.from_pretrained(plain)
    tok.chat_template = None
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(plain)
    assert not (plain / "chat_template.jinja").exists()

    with pytest.raises(ConfigError) as err:
        load_tokenizer(settings(plain))
    assert f"BASE_MODEL={str(plain)!r}" in str(err.value) and "chat template" in str(err.value)
