"""job/decode.py's greedy loop (static cache; on CUDA a replayed graph) gives Transformers' greedy tokens."""

import pytest
import torch

from job import decode
from job.config import load_settings
from job.decode import greedy
from job.model import build_messages, load_model, load_tokenizer

PROMPTS = [
    "Hi",
    "I have a headache since this morning.",
    "My child has a fever of 39 degrees since yesterday evening, what should I do now?",
    "Rash on arm",
]


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none"}, env_file=None)
    tok = load_tokenizer(cfg)
    tok.padding_side = "left"
    model = load_model(cfg, "fp32")
    torch.manual_seed(0)
    for p in model.parameters():  # the tiny model's own weights repeat one token; larger ones vary
        if p.ndim == 2:
            p.data.normal_(0, 0.2)
    model.set_attn_implementation("sdpa")
    batch = tok.apply_chat_template(
        [build_messages(cfg, p) for p in PROMPTS],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding=True,
        return_tensors="pt",
    )
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1, "prompts of different lengths: left padding"
    return model.eval(), tok, batch


def _transformers(model, batch, new_tokens, eos, pad):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize(
    "attn,prefill", [("sdpa", decode.PREFILL_TOKENS), ("eager", decode.PREFILL_TOKENS), ("sdpa", 7)]
)
def test_greedy_gives_transformers_tokens(model_and_batch, attn, prefill, monkeypatch):
    model, tok, batch = model_and_batch
    monkeypatch.setattr(decode, "PREFILL_TOKENS", prefill)  # 7: the prompts' prefill in several pieces
    assert prefill == decode.PREFILL_TOKENS or batch["input_ids"].shape[1] > 2 * prefill
    model.set_attn_implementation(attn)
    try:
        # An end-of-turn id that no row produces: every row runs all 20 steps.
        free = _transformers(model, batch, 20, tok.eos_token_id, tok.pad_token_id)
        ours = greedy(model, batch["input_ids"], batch["attention_mask"], 20, tok.eos_token_id, tok.pad_token_id)
        assert ours.tolist() == free.tolist()
        assert len({tuple(r) for r in free.tolist()}) > 1, "rows must differ, or padding could go unnoticed"

        # Stop on a token one row produces midway: that row pads after it, the others go on.
        stop = free[0, 5].item()
        assert stop not in free[0, :5].tolist()
        expected = _transformers(model, batch, 20, stop, tok.pad_token_id)
        ours = greedy(model, batch["input_ids"], batch["attention_mask"], 20, stop, tok.pad_token_id)
        width = expected.shape[1]  # Transformers stops when every row has; ours pads to the full width
        assert ours[:, :width].tolist() == expected.tolist()
        assert (ours[:, width:] == tok.pad_token_id).all()
        assert (ours[0, 6:] == tok.pad_token_id).all() and ours[0, 5] == stop
    finally:
        model.set_attn_implementation("sdpa")


def test_greedy_stops_when_every_row_has_finished(model_and_batch):
    model, tok, batch = model_and_batch
    first = _transformers(model, batch, 1, tok.eos_token_id, tok.pad_token_id)[:, 0]
    # Rows whose first token is the end: nothing after it, and the loop needs no step at all.
    rows = (first == first[0]).nonzero().flatten()
    ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
    out = greedy(model, ids, mask, 50, eos_id=first[0].item(), pad_id=tok.pad_token_id)
    assert out.shape == (len(rows), 50)
    assert (out[:, 0] == first[0]).all() and (out[:, 1:] == tok.pad_token_id).all()


def test_bench_compares_the_decoders_on_the_same_rows(model_and_batch):
    """The bench's decoder comparison (on CPU without the graph): in fp32 every row's answer is the same."""
    from bench.equivalence import compare_decoders

    model, tok, _ = model_and_batch
    cfg = load_settings({}, env_file=None)
    out = compare_decoders(model, tok, [build_messages(cfg, p) for p in PROMPTS], 10, cfg.TEMPLATE_DATE)
    assert set(out) == {"eager_loop", "transformers_generate"}
    assert out["transformers_generate"]["rows_equal_to_eager_loop"] == f"{len(PROMPTS)}/{len(PROMPTS)}"
    assert out["eager_loop"]["new_tokens"] == out["transformers_generate"]["new_tokens"] > 0


@pytest.mark.parametrize("penalty", [1.15, 1.5])
def test_the_repetition_penalty_gives_transformers_tokens(model_and_batch, penalty):
    """REPETITION_PENALTY: the loop's penalised greedy tokens are Transformers' generate(repetition_penalty=...)'s,
    prompt and padding counted as Transformers counts them; and the penalty changes the answers (1.0 would not)."""
    model, tok, batch = model_and_batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    expected = expected[:, ids.shape[1] :]
    ours = greedy(model, ids, mask, 20, tok.eos_token_id, tok.pad_token_id, repetition_penalty=penalty)
    assert ours[:, : expected.shape[1]].tolist() == expected.tolist()
    plain = greedy(model, ids, mask, 20, tok.eos_token_id, tok.pad_token_id)
    assert plain.tolist() != ours.tolist()
