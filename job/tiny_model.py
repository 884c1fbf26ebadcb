"""Build a tiny Llama-architecture model and tokenizer on disk, offline.

`make demo`, the tests and CPU development runs load this through exactly the same
`from_pretrained` path as `meta-llama/Llama-3.2-3B-Instruct`; only the size differs.
The tokenizer is a byte-level BPE trained on the text given (no download), with
Llama-3's special tokens and a Llama-3-style chat template. The template wraps the
assistant turn in `{% generation %}` markers so Transformers can report which tokens
the assistant produced; our own loss mask does not depend on them (the real Llama 3.2
template has none).
"""

from __future__ import annotations

import argparse
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


# Llama-3.2-3B's exact shape (DESIGN.md, "Reference facts"): random weights with the real model's
# compute per token, for GPU runs and benchmarks where the Hub (and the real weights) is out of reach.
LLAMA_3_2_3B = dict(
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
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
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


def build_random_llama(out_dir: str | Path, texts: Iterable[str] = (), seed: int = 0, shape: str = "tiny") -> Path:
    """Write a Llama model with random weights plus tokenizer to `out_dir`; return the path.

    shape="tiny": 2 layers, hidden 64, fp32 (tests, demo). shape="llama-3.2-3b": the real 3B
    shape in bf16, built on the GPU when there is one (random 3B weights are slow to draw on a CPU),
    with a 32k-token BPE so that tokens per conversation are close to Llama 3's tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    big = shape == "llama-3.2-3b"
    tokenizer = build_tokenizer(texts, vocab_size=32000 if big else 1024)
    dims = LLAMA_3_2_3B if big else {**TINY, "vocab_size": len(tokenizer)}
    config = LlamaConfig(
        **dims,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if big else torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--texts", help="a .jsonl file whose string values train the tokenizer")
    parser.add_argument("--shape", choices=("tiny", "llama-3.2-3b"), default="tiny")
    args = parser.parse_args()
    texts: list[str] = []
    if args.texts:
        import json

        with open(args.texts, encoding="utf-8") as f:
            for line in f:
                texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    print(f"{args.shape} model written to {build_random_llama(args.out_dir, texts, shape=args.shape)}")


if __name__ == "__main__":
    main()
