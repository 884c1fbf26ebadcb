"""The model shapes the bench trains with random weights (`python -m bench.throughput --shape NAME`).

A random model of a real model's shape costs the real model's compute and memory per token, and needs no download
(the Hub is not reachable everywhere the bench runs). Each shape is the real model's config.json, as its Hugging
Face repository gives it, reduced to what sets the compute (vocabulary, widths, layers, heads) and what changes
the code path (tied embeddings, biases, sliding windows, logit soft-capping); `params` is the parameter count its
model card states, which tests/test_bench.py checks each shape against on the meta device.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Shape(NamedTuple):
    config: str  # the Transformers config class
    fields: dict  # its fields
    params: float  # parameters, as published (billions)


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES = {
    # DESIGN.md's reference model: the job's default BASE_MODEL
    "llama-3.2-3b": Shape(
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        ),
        3.21,
    ),
    "llama-3.1-8b": Shape(
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA3_ROPE,
        ),
        8.03,
    ),
    "llama-3.1-70b": Shape(
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA3_ROPE,
        ),
        70.6,
    ),
    "qwen2.5-3b": Shape(  # biased q/k/v projections
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        ),
        3.09,
    ),
    "qwen3-4b": Shape(  # RMSNorm on q and k per head
        "Qwen3Config",
        dict(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
        ),
        4.02,
    ),
    "mistral-7b-v0.3": Shape(
        "MistralConfig",
        dict(
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            max_position_embeddings=32768,
            sliding_window=None,
        ),
        7.25,
    ),
    "phi-3-mini": Shape(  # q, k and v in one fused projection; gate and up too
        "Phi3Config",
        dict(
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
            sliding_window=2047,
        ),
        3.82,
    ),
    "gemma-2-2b": Shape(  # capped attention logits: eager attention (job/attention.py)
        "Gemma2Config",
        dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
        2.61,
    ),
}


def model_config(name: str, **ids: int):
    """The Transformers config of shape `name`, with a tokenizer's special token ids (bos_token_id=..., ...)."""
    import transformers

    shape = SHAPES[name]
    return getattr(transformers, shape.config)(**shape.fields, **ids)


# A shape whose 16-bit weights take more than this is built packed in NF4 (build_random's nf4): 70B's 141 GB fit
# neither one 80 GB card nor the lent machine's 64 GiB disk; packed, about 39 GB.
NF4_ABOVE_BILLIONS = 20


def build_random(name: str, out: Path, tokenizer, device: str = "cuda", config=None) -> None:
    """Random weights of shape `name` (or `config`) drawn on `device` (a GPU: slow on a CPU) and saved with
    `tokenizer` to `out`: in bf16, or for a shape above NF4_ABOVE_BILLIONS already packed in NF4, as
    Transformers saves a bitsandbytes model, so the job loads it like any pre-quantized checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    if config is None:
        ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        config = model_config(name, **ids)
        config.vocab_size = max(config.vocab_size, len(tokenizer))  # keep the shape's vocabulary
    torch.manual_seed(0)
    if name in SHAPES and SHAPES[name].params <= NF4_ABOVE_BILLIONS:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        model = random_nf4(config, device)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def random_nf4(config, device: str):
    """The model of `config` with random weights, its decoder's linear layers packed in NF4 one at a time (the 16-bit
    weights of the whole model never exist), the rest in bf16: what from_pretrained with the job's
    BitsAndBytesConfig makes of a checkpoint (double quantization, bf16 compute; lm_head kept 16-bit)."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with init_empty_weights(include_buffers=False):  # parameters on the meta device; buffers (rotary, scales) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for module in model.modules():
        module._buffers = {k: v if v is None else v.to(device) for k, v in module._buffers.items()}
    head, std = model.get_output_embeddings(), config.initializer_range
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                weight = torch.empty(child.out_features, child.in_features, dtype=torch.bfloat16, device=device)
                packed = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                packed.weight = bnb.nn.Params4bit(
                    weight.normal_(0, std), requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(device)  # packs it
                if child.bias is not None:
                    packed.bias = torch.nn.Parameter(torch.zeros_like(child.bias, device=device), requires_grad=False)
                setattr(module, child_name, packed)
    for name, param in list(model.named_parameters()):
        if param.is_meta:  # embeddings, norms (1 + weight for Gemma's: zeros), lm_head
            value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
            if "norm" in name:  # Gemma's norms scale by 1 + weight
                value.fill_(0.0 if config.model_type.startswith("gemma") else 1.0)
            else:
                value.normal_(0, std)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))
    model.tie_weights()  # a tied output layer takes the embeddings just drawn
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return model
