"""TRAIN_TURN_TOKENS (job/turn_tokens.py): which tokens, when auto turns it on, and that training scores the
output side with the trained rows, as the saved adapter does."""

from __future__ import annotations

import pytest

from job import turn_tokens
from job.config import load_settings


def _tiny(tiny_model_dir, tied: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, tie_word_embeddings=tied)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_template_tokens_are_those_around_a_turn_and_include_its_end(tiny_model_dir):
    from job.model import end_of_turn_ids

    _, tok = _tiny(tiny_model_dir, tied=True)
    ids = turn_tokens.template_tokens(tok)
    names = tok.convert_ids_to_tokens(ids)
    assert set(end_of_turn_ids(tok)) - {tok.eos_token_id} <= set(ids), names
    assert tok.bos_token_id not in ids and all(t in tok.added_tokens_decoder for t in ids), names


def test_whitespace_listed_as_an_added_token_is_text_not_a_turn_token(tiny_model_dir):
    """Gemma's tokenizer lists "\n" among its added tokens, and its template writes one after each turn marker;
    the base knows it as text, so its row is not trained."""
    _, tok = _tiny(tiny_model_dir, tied=True)
    tok.add_tokens(["\n"])
    newline = tok.convert_tokens_to_ids("\n")
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=True)
    assert newline in rendered["input_ids"]  # the template does write it as that token
    assert newline not in turn_tokens.template_tokens(tok)
    assert turn_tokens.template_tokens(tok)  # the turn markers still are


@pytest.mark.parametrize(
    ("setting", "p", "trained"),
    [("auto", 0.0001, True), ("auto", 0.4, False), ("true", 0.4, True), ("false", 0.0, False)],
)
def test_auto_trains_them_only_when_the_base_cannot_end_a_turn(tiny_model_dir, monkeypatch, setting, p, trained):
    model, tok = _tiny(tiny_model_dir, tied=True)
    monkeypatch.setattr(turn_tokens, "end_of_turn_probability", lambda *a, **k: p)
    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "TRAIN_TURN_TOKENS": setting}, env_file=None)
    assert bool(turn_tokens.choose(cfg, model, tok, [])) is trained


def test_end_of_turn_probability_is_the_softmax_at_the_first_trained_end(tiny_model_dir):
    import torch

    model, tok = _tiny(tiny_model_dir, tied=True)
    end = turn_tokens.template_tokens(tok)[-1]
    rows = [
        {"input_ids": [5, 6, 7, end, 8], "completion_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [5, 6], "completion_mask": [0, 1]},
    ]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].softmax(-1)[end].item()
    assert turn_tokens.end_of_turn_probability(model, rows, {end}) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_trls_fused_head_scores_with_the_trained_rows_as_the_saved_adapter_does(tiny_model_dir, tmp_path, tied):
    """The loss SFTTrainer trains on (TRL's fused LM head reads the output layer's .weight) must equal the
    adapted model's own forward, on the trained token too. Fails when a TRL or PEFT upgrade changes how the
    head's weight is read (then output_weight_follows_adapter needs a new way)."""
    import torch
    from peft import PeftModel, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from job.model import lora_config

    model, tok = _tiny(tiny_model_dir, tied=tied)
    ids = turn_tokens.template_tokens(tok)
    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir)}, env_file=None)
    peft = get_peft_model(model, lora_config(cfg, model, turn_tokens.peft_targets(model, ids)))
    assert turn_tokens.output_weight_follows_adapter(peft)
    assert turn_tokens.trained(peft, tok) == tok.convert_ids_to_tokens(ids)  # what the train log and card name
    with torch.no_grad():  # trained rows far from the base's: the two paths would differ at those tokens
        for name, p in peft.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 3)
    add_fused_lm_head(peft.get_base_model(), outputs=("log_probs",))
    x = torch.tensor([[5, 6, ids[-1], 7, ids[-1], ids[0], 9]])
    fused = peft(input_ids=x, labels=x, fused_lm_head=True)
    fused = getattr(fused, "log_probs", None) if not isinstance(fused, tuple) else fused[0]
    with torch.no_grad():
        want = peft(input_ids=x).logits[0, :-1].float().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
    assert fused[0, : want.numel()].detach() == pytest.approx(want, abs=1e-4)
    # and the saved adapter, loaded as evaluation loads it, scores as training did
    peft.save_pretrained(tmp_path / "a")
    base, _ = _tiny(tiny_model_dir, tied=tied)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    with torch.no_grad():
        again = loaded(input_ids=x).logits[0, :-1].float().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
    assert again == pytest.approx(want, abs=1e-5)


def test_measuring_leaves_the_4bit_weights_in_the_layout_training_differentiates(tiny_model_dir):
    """On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference on an eval-mode forward without
    gradients; that layout's kernel has no backward. The measurement must leave none repacked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from job.model import four_bit_layers

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = turn_tokens.template_tokens(tok)[-1]
    turn_tokens.end_of_turn_probability(model, [{"input_ids": [5, 6, 7, end], "completion_mask": [0, 0, 1, 1]}], {end})
    assert four_bit_layers(model)
    assert not [m for m in four_bit_layers(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
