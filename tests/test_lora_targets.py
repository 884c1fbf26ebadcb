"""LORA_TARGET_MODULES: auto (q_proj,v_proj, or a fused qkv_proj), named modules checked against the base, or
all-linear, PEFT's every linear layer. Each family's auto choice is checked in test_families.py."""

from __future__ import annotations

import pytest

from job.config import load_settings
from job.errors import ConfigError
from job.model import lora_config, lora_targets


def _model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_all_linear_puts_an_adapter_on_every_linear_layer_but_the_output(tiny_model_dir):
    from peft import get_peft_model

    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "LORA_TARGET_MODULES": " all-linear "}, env_file=None)
    model = _model(tiny_model_dir)
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"} - {"lm_head"}
    peft = get_peft_model(model, lora_config(cfg, model))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft.named_parameters() if ".lora_A." in n}
    assert adapted == linear and {"gate_proj", "down_proj", "q_proj"} <= adapted


def test_a_named_module_the_base_lacks_is_refused_with_its_linear_modules(tiny_model_dir):
    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "LORA_TARGET_MODULES": "qkv_proj"}, env_file=None)
    with pytest.raises(ConfigError, match=r"qkv_proj not found in BASE_MODEL\. Its linear modules are: .*q_proj"):
        lora_config(cfg, _model(tiny_model_dir))


def test_auto_on_a_base_without_q_v_or_qkv_proj_names_its_linear_modules(tiny_model_dir):
    """GPT-2 computes q, k and v in one Conv1D, c_attn: auto has nothing to pick, so the message lists what there is."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir)}, env_file=None)
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError) as e:
        lora_targets(cfg, model)
    assert str(e.value).startswith("LORA_TARGET_MODULES='auto': neither q_proj,v_proj nor qkv_proj is found")
    assert "c_attn" in str(e.value) and "LORA_TARGET_MODULES=all-linear" in str(e.value)
