"""Write the tests' tiny Llama model (job/tiny_model.py) as a GGUF file, the way llama.cpp's converter does.

What Transformers' GGUF loader reads back (transformers/modeling_gguf_pytorch_utils.py and integrations/ggml.py):
`llama.*` shape keys, the tokenizer as `tokenizer.ggml.*` arrays (a byte-level BPE is the "gpt2" tokenizer model,
its special tokens typed CONTROL), and tensors under GGUF's names (`blk.N.attn_q.weight` ...), with the query
and key rows permuted as llama.cpp permutes them for its rotary embedding (the loader undoes it). The output
head is left out when it is tied to the embeddings, as the converter does. 2-D weights are stored Q8_0 (blocks of
32 int8 values and an fp16 scale), so loading them really dequantizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Transformers' Llama parameter -> GGUF tensor name, per layer and for the whole model.
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: rotary halves interleaved within each head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, out: Path, chat_template: str | None = None, metadata: dict | None = None):
    """`model_dir` (a Llama folder written by save_pretrained, with tokenizer.json) as the GGUF file `out`.

    chat_template: stored as tokenizer.chat_template (None: the file has none, like Gemma's base GGUFs).
    metadata: extra general.* string keys, e.g. {"general.source.url": "https://huggingface.co/owner/name"}.
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_name("Tiny Llama for tests")
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])

    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(vocab["<|begin_of_text|>"])
    writer.add_eos_token_id(vocab["<|eot_id|>"])
    writer.add_pad_token_id(vocab["<|finetune_right_pad_id|>"])
    writer.add_add_bos_token(False)  # the chat template writes it
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    for name, w in weights.items():
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            _, _, n, rest = stem.split(".", 3)
            gguf_name = f"blk.{n}.{LAYER[rest]}.weight"
            if rest == "self_attn.q_proj":
                w = _permute(w, heads)
            elif rest == "self_attn.k_proj":
                w = _permute(w, kv_heads)
        elif stem == "lm_head" and config.get("tie_word_embeddings"):
            continue
        else:
            gguf_name = f"{TOP[stem]}.weight"
        w = w.astype(np.float32)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            quantized = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, w)  # norms stay F32, as in llama.cpp's files
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
