"""LORA_TARGET_MODULES: named modules, checked against the base; or all-linear, PEFT's every linear layer."""

from __future__ import annotations

import pytest

from job.config import load_settings
from job.errors import ConfigError
from job.model import lora_config


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
