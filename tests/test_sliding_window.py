"""Sliding-window layers (Gemma 3: five of every six layers see only the last 512 tokens): the packed training path
and evaluation's decoder give what Transformers' own masks give. A tiny Gemma 3 with a window of 8 tokens, so the
fixture's conversations are many windows long."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gemma3_config

from bench.equivalence import equivalence
from job import attention, decode
from job.config import load_settings
from job.files import read_jsonl
from job.formats import single_turn
from job.formatting import tokenize_row
from job.model import build_messages, load_tokenizer

WINDOW = 8


@pytest.fixture(scope="module")
def tiny_gemma(tiny_model_dir):
    from transformers import Gemma3ForCausalLM

    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "MAX_SEQ_LENGTH": "512"}, env_file=None)
    tok = load_tokenizer(cfg)
    config = tiny_gemma3_config(tok, WINDOW)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    for p in model.parameters():  # larger weights than the init's, so answers vary from token to token
        if p.ndim == 2:
            p.data.normal_(0, 0.2)
    return cfg, tok, model


def test_packed_rows_keep_the_sliding_window(tiny_gemma, monkeypatch):
    """The padded pass uses Transformers' sliding masks; the packed pass goes through job/attention.py's varlen
    path, which must cut each sliding layer's attention to the window as well."""
    from peft import LoraConfig, get_peft_model

    from job.__main__ import FIXTURE

    cfg, tok, model = tiny_gemma
    attention.register()
    windows = []
    reference = attention._per_conversation
    monkeypatch.setattr(attention, "_per_conversation", lambda *a: windows.append(a[5]) or reference(*a))
    model.set_attn_implementation(attention.NAME)
    rows = [tokenize_row(cfg, tok, single_turn(r["Patient"], r["Doctor"]))[0] for r in read_jsonl(FIXTURE)[:4]]
    assert min(len(r["input_ids"]) for r in rows) > 4 * WINDOW
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    try:
        e = equivalence(peft, rows, tok.pad_token_id)
    finally:
        peft.unload()
        model.set_attn_implementation("sdpa")
    assert sorted(windows, key=str) == sorted([WINDOW, None], key=str), windows  # one sliding, one full layer
    assert e["loss_rel_diff"] < 1e-5 and e["grad_cosine"] > 0.99999, e


def test_decoding_past_the_window_gives_transformers_tokens(tiny_gemma):
    cfg, tok, model = tiny_gemma
    tok.padding_side = "left"
    batch = tok.apply_chat_template(
        [build_messages(cfg, "My child has a fever."), build_messages(cfg, "Rash on arm")],
        add_generation_prompt=True,
        return_dict=True,
        padding=True,
        return_tensors="pt",
    )
    assert batch["input_ids"].shape[1] > WINDOW
    with torch.no_grad():
        expected = model.generate(
            **batch, max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id
        )[:, batch["input_ids"].shape[1] :]
    ours = decode.greedy(model, batch["input_ids"], batch["attention_mask"], 12, [-1], tok.pad_token_id)
    assert ours.tolist() == expected.tolist()
    assert decode.sliding_window(model.config) == WINDOW
