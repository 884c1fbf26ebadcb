"""`python -m job chat`: talk to a fine-tuned adapter with the same template and system prompt as training.

The base model is the one recorded in the adapter's config (what it was trained on); the
system prompt and quantization come from the settings, as in training.
"""

from __future__ import annotations

import dataclasses
import sys

from job import chat_tokens
from job.config import Settings, load_settings
from job.errors import ConfigError
from job.model import build_messages, end_of_turn_ids, load_model, load_tokenizer, resolve_precision
from job.paths import RunPaths


def load(adapter: str, cfg):
    from peft import PeftConfig, PeftModel

    try:
        base_id = PeftConfig.from_pretrained(adapter, token=cfg.HF_TOKEN or None).base_model_name_or_path
    except Exception as e:
        raise ConfigError(f"--adapter {adapter!r}: not a PEFT adapter folder or Hub id ({e})") from None
    cfg = dataclasses.replace(cfg, BASE_MODEL=base_id)
    precision, _ = resolve_precision(cfg)
    tokenizer = load_tokenizer(cfg, adapter)
    model = PeftModel.from_pretrained(load_model(cfg, precision), adapter)
    model.eval()
    model.config.use_cache = True
    return model, tokenizer


def reply(model, tokenizer, messages: list[dict], cfg: Settings, stream: bool = True) -> str:
    """The model's greedy answer to `messages` (MAX_NEW_TOKENS, REPETITION_PENALTY, TEMPLATE_DATE of `cfg`)."""
    import torch
    from transformers import TextStreamer

    # The prompt is built as training built it: typed text never becomes a control token (job/chat_tokens.py).
    ids = chat_tokens.encode(tokenizer, messages, add_generation_prompt=True, date_string=cfg.TEMPLATE_DATE)
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=cfg.MAX_NEW_TOKENS,
            do_sample=False,
            repetition_penalty=cfg.REPETITION_PENALTY,
            streamer=streamer,
            eos_token_id=end_of_turn_ids(tokenizer),  # stop at the template's end of turn, not only at eos
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def main(args) -> int:
    cfg = load_settings()
    adapter = args.adapter or str(RunPaths(cfg.run_dir).adapter)
    model, tokenizer = load(adapter, cfg)
    if args.prompt is not None:
        messages = build_messages(cfg, args.prompt)
        print(reply(model, tokenizer, messages, cfg, stream=False))
        return 0
    print("Not medical advice. In an emergency call your local emergency number. Ctrl-D to quit.", file=sys.stderr)
    history = build_messages(cfg, "")[:-1]  # the system prompt only
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            return 0
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = reply(model, tokenizer, history, cfg)
        history.append({"role": "assistant", "content": answer})
