"""The demo's model: a tiny Llama-architecture model and tokenizer built on disk, offline.

`python -m job demo` (`make demo`, and the image's `demo`) and the tests load it through exactly the same
`from_pretrained` path as `meta-llama/Llama-3.2-3B-Instruct`; only the size differs.
The tokenizer is a byte-level BPE trained on the text given (no download), with
Llama-3's special tokens and a Llama-3-style chat template. The template wraps the
assistant turn in `{% generation %}` markers so Transformers can report which tokens
the assistant produced; our own loss mask does not depend on them (the real Llama 3.2
template has none).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Llama-3 chat template, cut down: no tool calling, no date header. The end-of-turn
# token sits inside the generation block because the model must learn to emit it.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

_BASE_TEXT = (
    "system user assistant You are a careful medical assistant. Hello doctor, I have a "
    "headache, fever, cough, pain in my chest and stomach since two days. Please advise "
    "what medicine to take. Hi, thanks for the query. It could be an infection; consult "
    "your physician, drink fluids, rest, and get a blood test. Take care."
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BASE_TEXT, *texts], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,  # no warning for the fixture's deliberately long rows,
    )


# 2 layers, hidden 64: a model that trains and answers (badly) in seconds on a CPU.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)


def build(out_dir: str | Path, texts: Iterable[str] = ()) -> Path:
    """Write the tiny Llama model, random weights in fp32, plus its tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        **TINY,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
