"""Model families beyond Llama (issue 28): Qwen 2.5, Qwen 3, Mistral, Phi-3 and Gemma 2, each as a tiny random model
with the tiny tokenizer, loaded by the job's own code. Each takes the packed training path and gets the plain
padded path's loss and LoRA gradients (the check Llama and Gemma 3 pass in test_equivalence.py and
test_sliding_window.py), with the LoRA targets the job picks for it by default, or falls back with the reason
logged (Gemma 2's capped attention logits need eager attention, which then attends each conversation of a packed
row alone). Three of them then run the whole job."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, WINDOW, tiny_family

from bench.equivalence import equivalence
from bench.kept import kept_for_backward
from job import attention
from job.config import load_settings
from job.files import read_jsonl
from job.formats import single_turn
from job.formatting import tokenize_row
from job.model import load_model, load_tokenizer, lora_config, lora_targets


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("families")
    return {family: tiny_family(family, tok, root / family) for family in FAMILIES}


def _rows(cfg, tok, n):
    from job.__main__ import FIXTURE

    return [tokenize_row(cfg, tok, single_turn(r["Patient"], r["Doctor"]))[0] for r in read_jsonl(FIXTURE)[:n]]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_packs_like_the_padded_path(family_dirs, family, monkeypatch, caplog):
    from peft import get_peft_model

    cfg = load_settings(
        {"BASE_MODEL": str(family_dirs[family]), "QUANTIZATION": "none", "LORA_DROPOUT": "0", "MAX_SEQ_LENGTH": "2048"},
        env_file=None,
    )
    calls, eager_lengths = [], []
    reference = attention._per_conversation
    monkeypatch.setattr(attention, "_per_conversation", lambda *a: calls.append(a[5]) or reference(*a))
    if family == "gemma2":  # the model's own eager attention: the lengths of the rows it is given
        from transformers.models.gemma2 import modeling_gemma2

        eager = modeling_gemma2.eager_attention_forward
        record = lambda m, q, *a, **k: eager_lengths.append(q.shape[2]) or eager(m, q, *a, **k)  # noqa: E731
        monkeypatch.setattr(modeling_gemma2, "eager_attention_forward", record)
    tok = load_tokenizer(cfg)
    rows = _rows(cfg, tok, 6)
    with caplog.at_level(logging.INFO, logger="job.model"):
        base = load_model(cfg, "fp32")
    assert lora_targets(cfg, base) == FAMILIES[family][2]
    torch.manual_seed(0)  # before get_peft_model, which draws the LoRA A matrices
    model = get_peft_model(base, lora_config(cfg, base))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(FAMILIES[family][2])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make it non-zero so A gets gradients too
            p.data.normal_(0, 0.02)
    e = equivalence(model, rows, tok.pad_token_id)
    if family == "gemma2":  # its own eager attention on each conversation of the packed row, and a line saying why
        assert base.config._attn_implementation == attention.EAGER_NAME and not calls
        assert any("attn_logit_softcapping" in r.getMessage() for r in caplog.records)
        # packed: each conversation alone, never the whole row; padded: the longest row's length
        packed = [len(r["input_ids"]) for r in rows]
        assert sum(packed) not in eager_lengths and max(eager_lengths) == max(packed), (packed, eager_lengths)
        assert set(packed) <= set(eager_lengths)
    else:  # the packed rows went through the job's varlen path, each layer with its window (Mistral's)
        assert base.config._attn_implementation == attention.NAME
        assert len(calls) == base.config.num_hidden_layers
        assert set(calls) == ({WINDOW} if family == "mistral" else {None}), calls
    # fp32 throughout: the two paths differ only in summation order (a mean over ~2k tokens)
    assert e["loss_rel_diff"] < 1e-5, e
    assert e["grad_cosine"] > 0.99999, e
    assert e["grad_rel_l2"] < 1e-3, e
    # and the check can fail: other rows give another loss
    assert abs(equivalence(model, rows[:3], tok.pad_token_id)["loss_padded"] - e["loss_padded"]) > 1e-4


def test_gemma2_packed_rows_keep_no_more_for_backward_than_padded_ones(family_dirs):
    """Gemma 2's capped attention is eager attention; given a packed micro-batch as one flat row it keeps its scores
    over the whole row (the square of the micro-batch's tokens: 2.3x the padded path's peak memory on an H100),
    one conversation at a time (eager_varlen, the job's choice) no more than the padded rows keep (bench/kept.py counts
    the bytes; `python -m bench.kept` does it for the real shape)."""
    from peft import get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg = load_settings(
        {"BASE_MODEL": str(family_dirs["gemma2"]), "QUANTIZATION": "none", "MAX_SEQ_LENGTH": "2048"}, env_file=None
    )
    tok = load_tokenizer(cfg)
    examples = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in _rows(cfg, tok, 8)]
    base = load_model(cfg, "fp32")
    model = get_peft_model(base, lora_config(cfg, base))

    def kept(padding_free: bool) -> int:
        return kept_for_backward(model, DataCollatorForLanguageModeling(tok.pad_token_id, padding_free)(examples))

    per_conversation, padded = kept(True), kept(False)
    base.set_attn_implementation("eager")  # Transformers' own, given the packed row whole
    whole_row = kept(True)
    assert per_conversation <= padded < whole_row, (per_conversation, padded, whole_row)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2"])
def test_the_whole_job_runs_on_each_family(family_dirs, family, demo_env, run_job, tmp_path):
    """Sample to push on the family's tiny model (NF4, the job's defaults): evaluation decodes with it, the benchmark
    scores it, and the card names the modules that got adapters (Phi-3's fused qkv_proj) and Gemma 2's eager
    attention (per conversation in training, plain in decoding) stays the log's reason, not a failure."""
    env = demo_env(tmp_path / "outputs", BASE_MODEL=str(family_dirs[family]), NUM_SAMPLES="24", EVAL_SAMPLES="6")
    env |= {"EVAL_PROMPTS": "4", "BENCHMARK_TASKS": "mmlu_anatomy", "HUB_REPO_ID": ""}  # files staged in push/
    result = run_job(env)
    assert result.exit_code == 0, result.output[-3000:]
    card = (tmp_path / "outputs" / env["RUN_NAME"] / "report" / "README.md").read_text()
    assert f"| modules with adapters | {', '.join(FAMILIES[family][2])} |" in card
    assert "| **mean of" in card  # the benchmark ran on it
    assert ("using eager_varlen instead of sdpa_varlen" in result.output) is (family == "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_puts_an_adapter_on_every_linear_layer_of_each_family(family_dirs, family):
    """LORA_TARGET_MODULES=all-linear on each family: every linear layer but the output gets an adapter (Phi-3's
    fused qkv_proj and gate_up_proj included), whatever the family names them."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_settings({"BASE_MODEL": str(family_dirs[family]), "LORA_TARGET_MODULES": "all-linear"}, env_file=None)
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"} - {"lm_head"}
    peft = get_peft_model(model, lora_config(cfg, model))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft.named_parameters() if ".lora_A." in n}
    assert adapted == linear and set(FAMILIES[family][2]) <= adapted, (sorted(adapted), sorted(linear))
