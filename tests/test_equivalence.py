"""The optimized training path (padding-free packing) computes the same loss and gradients as
the plain padded path on the same rows. The GPU benchmark repeats this check in bf16."""

import pytest
import torch

from bench.equivalence import equivalence
from bench.shapes import model_config
from bench.throughput import flops_per_token
from job import attention
from job.config import load_settings
from job.files import read_jsonl
from job.formats import single_turn
from job.formatting import tokenize_row
from job.model import load_model, load_tokenizer, lora_config


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa"])
def test_packed_equals_padded(tiny_model_dir, attn, monkeypatch):
    from peft import get_peft_model

    from job.__main__ import FIXTURE

    cfg = load_settings(
        {
            "BASE_MODEL": str(tiny_model_dir),
            "QUANTIZATION": "none",
            "LORA_DROPOUT": "0",
            "MAX_SEQ_LENGTH": "2048",
            "ATTN_IMPLEMENTATION": attn,
        },
        env_file=None,
    )
    calls = []
    reference = attention._per_conversation
    monkeypatch.setattr(attention, "_per_conversation", lambda *a: calls.append(a[3]) or reference(*a))
    tok = load_tokenizer(cfg)
    rows = [tokenize_row(cfg, tok, single_turn(r["Patient"], r["Doctor"]))[0] for r in read_jsonl(FIXTURE)[:6]]
    assert len({len(r["input_ids"]) for r in rows}) > 1, "rows of different lengths make padding matter"
    base = load_model(cfg, "fp32")
    torch.manual_seed(0)  # before get_peft_model, which draws the LoRA A matrices: no dependence on test order
    model = get_peft_model(base, lora_config(cfg, base))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make it non-zero so A gets gradients too
            p.data.normal_(0, 0.02)
    e = equivalence(model, rows, tok.pad_token_id)
    if attn == "sdpa_varlen":  # the packed pass went through our varlen path, once per layer, with all 6 rows
        assert len(calls) == model.config.num_hidden_layers and all(len(cu) == 7 for cu in calls), calls
    else:
        assert not calls
    assert e["loss_rel_diff"] < 1e-5, e
    assert e["grad_cosine"] > 0.99999, e
    assert e["grad_rel_l2"] < 1e-3, e
    # and the check can fail: different rows give a different loss
    other = equivalence(model, rows[:3], tok.pad_token_id)
    assert abs(other["loss_padded"] - e["loss_padded"]) > 1e-4

    # DESIGN.md: about 13.3 GFLOP per trained token for Llama-3.2-3B
    f = flops_per_token(model_config("llama-3.2-3b"), mean_seq_len=300, lora_params=2_293_760)
    assert 12.8e9 < f < 13.8e9, f


def _lora_with_weights(cfg, base, weights=None):
    from peft import get_peft_model

    torch.manual_seed(0)  # before get_peft_model, which draws the LoRA A matrices: no dependence on test order
    model = get_peft_model(base, lora_config(cfg, base))
    if weights is None:
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make it non-zero so A gets gradients too
                p.data.normal_(0, 0.02)
    else:
        assert not model.load_state_dict(weights, strict=False).unexpected_keys
    return model


def test_dequantized_base_trains_like_the_4bit_kernels(tiny_model_dir):
    """DEQUANTIZE_BASE: the NF4 base held in 16-bit (here fp32, on CPU) gives the loss and LoRA gradients
    of bitsandbytes' 4-bit layers; the unquantized base, with other weights, does not."""
    from job.__main__ import FIXTURE
    from job.speedups.nf4_base import dequantize_for_training

    env = {"BASE_MODEL": str(tiny_model_dir), "LORA_DROPOUT": "0", "MAX_SEQ_LENGTH": "2048"}
    cfg = load_settings({**env, "DEQUANTIZE_BASE": "true"}, env_file=None)
    tok = load_tokenizer(cfg)
    rows = [tokenize_row(cfg, tok, single_turn(r["Patient"], r["Doctor"]))[0] for r in read_jsonl(FIXTURE)[:6]]
    plain = _lora_with_weights(cfg, load_model(cfg, "fp32"))
    assert any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    lora = {k: v for k, v in plain.state_dict().items() if "lora_" in k}

    base = load_model(cfg, "fp32")
    assert dequantize_for_training(cfg, base)
    assert not any(type(m).__name__ == "Linear4bit" for m in base.modules())
    e = equivalence(_lora_with_weights(cfg, base, lora), rows, tok.pad_token_id, plain_model=plain)
    # Same NF4 weights (bitsandbytes' own dequantize_4bit, in fp32). bitsandbytes' CPU 4-bit matmul does not
    # reach fp32 accuracy: its results sit at bf16 level, whose rounding is 2^-9 (2.0e-3) relative per
    # element; seen: gradients 9.8e-4 apart (rel. L2), losses 1.5e-6 (a mean over ~2k tokens, so errors
    # cancel). So: gradients within 2^-9, the loss within 1e-5. The unquantized base, with other weights,
    # is far outside both (below: gradients 0.12 apart, losses 1.8e-4).
    assert e["loss_rel_diff"] < 1e-5, e
    assert e["grad_cosine"] > 0.99999, e
    assert e["grad_rel_l2"] < 2**-9, e

    unquantized = load_model(load_settings({**env, "QUANTIZATION": "none"}, env_file=None), "fp32")
    other = equivalence(_lora_with_weights(cfg, unquantized, lora), rows, tok.pad_token_id, plain_model=plain)
    assert other["loss_rel_diff"] > 1e-4 and other["grad_rel_l2"] > 2e-2, other


def test_shared_batches_answer_like_the_base_and_the_tuned_model_apart(tiny_model_dir, tmp_path):
    """The evaluate stage's default: base and tuned answers decoded as rows of the same batches, the
    adapter switched per row. Each answer must be the one its model gives on its own."""
    from peft import PeftModel, get_peft_model

    from job.evaluate import generate, shared_model_for_generation
    from job.model import build_messages

    cfg = load_settings(
        {"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none", "EVAL_BATCH_SIZE": "4", "MAX_NEW_TOKENS": "12"},
        env_file=None,
    )
    tok = load_tokenizer(cfg)
    base = load_model(cfg, "fp32")
    torch.manual_seed(0)
    for p in base.parameters():  # the tiny model repeats one blank token; larger random weights vary
        if p.ndim == 2:
            p.data.normal_(0, 0.2)
    lora = lora_config(cfg, base)
    lora.init_lora_weights = False  # a non-zero lora_B, as after training
    trained = get_peft_model(base, lora)
    trained.save_pretrained(tmp_path / "adapter")
    tuned = PeftModel.from_pretrained(trained.unload(), tmp_path / "adapter")  # as load_tuned does

    prompts = ["I have a headache.", "My child has a fever of 39 degrees since yesterday evening, what now?", "Hi"]
    prompts += ["Can I take ibuprofen with paracetamol?", "Rash on arm", "I feel dizzy when I stand up quickly."]
    prompts += ["My knee hurts after running five kilometres."]  # 14 rows: batches of 4, 4, 4 and 2
    conversations = [build_messages(cfg, p) for p in prompts]
    n = len(conversations)
    shared = shared_model_for_generation(tuned, tmp_path / "adapter")
    both, speed = generate(shared, tok, conversations * 2, cfg, [False] * n + [True] * n)
    with shared.disable_adapter():
        alone_base, _ = generate(shared, tok, conversations, cfg)
    alone_tuned, _ = generate(shared, tok, conversations, cfg)

    assert both[:n] == alone_base and both[n:] == alone_tuned
    assert sum(a != b for a, b in zip(alone_base, alone_tuned)) >= n // 2, "the adapter must change the answers"
    assert len(set(alone_base)) > 1 and all(alone_base), alone_base  # real, distinct answers
    assert speed["answers"] == 2 * n and speed["new_tokens"] > 0
    scales = [m.scaling["default"] for m in shared.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert scales and all(s == lora.lora_alpha / lora.r for s in scales), "per-row scales must be put back"


def test_packed_rows_take_the_flash_kernel_only_on_a_gpu_that_has_it(monkeypatch):
    """FlashAttention-2 needs compute capability 8.0 (Ampere); a T4 (7.5) or V100 (7.0) takes the reference loop."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert attention.flash_varlen() is expected, capability


def test_models_that_cap_attention_logits_load_with_eager_attention():
    """Packed rows (sdpa_varlen) get eager attention per conversation; any other non-eager choice plain eager."""
    from transformers import Gemma2Config, LlamaConfig

    assert attention.attention_for(LlamaConfig(), "sdpa_varlen") == ("sdpa_varlen", None)
    capped = Gemma2Config(attn_logit_softcapping=50.0)
    chosen, why = attention.attention_for(capped, "sdpa_varlen")
    assert chosen == attention.EAGER_NAME and "attn_logit_softcapping=50.0" in why
    assert attention.attention_for(capped, "sdpa")[0] == "eager"
    assert attention.attention_for(capped, "eager") == ("eager", None)
    assert attention.attention_for(Gemma2Config(attn_logit_softcapping=None), "sdpa")[0] == "sdpa"
    # rows never packed (decoding, padded batches): the same capped eager attention; sdpa for the varlen kernels
    unpacked = {name: attention.unpacked(name) for name in ("eager_varlen", "eager", "sdpa_varlen", "sdpa")}
    assert unpacked == {"eager_varlen": "eager", "eager": "eager", "sdpa_varlen": "sdpa", "sdpa": "sdpa"}
