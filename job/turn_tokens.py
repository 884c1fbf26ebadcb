"""TRAIN_TURN_TOKENS: teach a base model the turn tokens of its chat template.

A base model (not an instruct one) never saw the tokens a chat template writes around a turn (Gemma's
<start_of_turn> and <end_of_turn>). It gives the end-of-turn token almost no probability where a reply ends,
and LoRA on the attention projections cannot raise it: a token's score is its output row (for a tied model,
its frozen embedding) against the last hidden state, and that row gets no gradient. The tuned model's answers
then never stop (Gemma 3 270M: bench/parity.py's p(end of turn) column, README "Same model?"). PEFT's
trainable tokens train those rows alone, on the input side and the output side, and keep them in the adapter
(a few vectors of the hidden size).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from job.config import Settings
from job.evaluate import unpack_cpu_layout
from job.model import _PROBE, _PROBE_REPLY, end_of_turn_ids

log = logging.getLogger(__name__)

# Below this mean probability of the end-of-turn token where replies end, the base has not learned its
# template's turn end. An instruct model gives it most of the probability there; a base model about none.
KNOWN = 0.05
PROBE_ROWS = 8  # training rows measured: enough to tell 0.0001 from 0.5, a second of forward passes


def template_tokens(tokenizer) -> list[int]:
    """The added tokens that the chat template writes around a turn, in id order. Not the text's own: bos and pad
    (unless they also end a turn), nor whitespace that a tokenizer lists as added (Gemma's "\n"), which the base
    has learned as text."""
    rendered = tokenizer.apply_chat_template(
        _PROBE + [{"role": "assistant", "content": _PROBE_REPLY}], tokenize=True, return_dict=True
    )
    ends = set(end_of_turn_ids(tokenizer))
    skip = {tokenizer.bos_token_id, tokenizer.pad_token_id} - ends
    added = tokenizer.added_tokens_decoder
    return sorted(
        {t for t in rendered["input_ids"] if t in added and t not in skip and (t in ends or added[t].content.strip())}
    )


def end_of_turn_probability(model: Any, rows: list[dict], stop: set[int], n: int = PROBE_ROWS) -> float | None:
    """Mean probability that `model` gives the first end-of-turn token of each reply (the first trained token
    in `stop`), over the first `n` training rows that have one; None when none has."""
    import torch

    device = next(model.parameters()).device
    ps = []
    with torch.no_grad():
        for row in rows[:n]:
            ids, mask = row["input_ids"], row["completion_mask"]
            at = next((k for k in range(1, len(ids)) if mask[k] and ids[k] in stop), None)
            if at is None:  # the reply was cut before its end
                continue
            logits = model(input_ids=torch.tensor([ids[:at]], device=device), logits_to_keep=1).logits
            ps.append(logits[0, -1].float().softmax(-1)[ids[at]].item())
    # A forward without gradients in eval mode repacks bitsandbytes' 4-bit weights on a CPU with AVX512-BF16 into
    # an inference layout whose kernel has no backward: training would then get no gradient through the frozen
    # layers (torch warns "bitsandbytes::gemv_4bit: an autograd kernel was not registered").
    unpack_cpu_layout(model)
    return statistics.fmean(ps) if ps else None


def choose(cfg: Settings, model: Any, tokenizer, rows: list[dict]) -> list[int]:
    """The token ids whose embedding rows train with the adapter (empty: none), logging why."""
    if cfg.TRAIN_TURN_TOKENS == "false":
        return []
    ids = template_tokens(tokenizer)
    names = ", ".join(tokenizer.convert_ids_to_tokens(ids))
    if not ids:
        log.info("turn tokens: the chat template writes no tokens of its own around a turn; none to train")
        return []
    if cfg.TRAIN_TURN_TOKENS == "true":
        log.info("turn tokens: training %s with the adapter (TRAIN_TURN_TOKENS=true)", names)
        return ids
    p = end_of_turn_probability(model, rows, set(end_of_turn_ids(tokenizer)))
    if p is None or p >= KNOWN:
        log.info(
            "turn tokens: the base gives its end-of-turn token p=%s where training replies end; not trained",
            "n/a (no reply ends within MAX_SEQ_LENGTH)" if p is None else f"{p:.3f}",
        )
        return []
    log.warning(
        "turn tokens: the base gives its end-of-turn token p=%.4f where the first training replies end (below %s): "
        "it never learned this chat template's turn end, and LoRA alone cannot teach it to stop. Training %s "
        "with the adapter (TRAIN_TURN_TOKENS=auto; false keeps LoRA only)",
        p,
        KNOWN,
        names,
    )
    return ids


def peft_targets(model: Any, ids: list[int]) -> dict[str, list[int]] | None:
    """LoraConfig.trainable_token_indices for `ids`: the input embedding's rows, and the output layer's when it
    is a matrix of its own (PEFT ties the two itself when the model shares one)."""
    if not ids:
        return None
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[inp]: ids}
    if out is not None and out.weight is not inp.weight:
        targets[names[out]] = ids
    return targets


def output_weight_follows_adapter(model: Any) -> bool:
    """Make the output layer's `.weight` the adapted matrix. Why: TRL's fused LM head (SFTTrainer's loss) reads
    `get_output_embeddings().weight` and `.bias`, which PEFT's TrainableTokensWrapper does not hand on to
    the adapted matrix (PEFT 0.21: an AttributeError), and which must be the adapted matrix: the base matrix
    would leave the trained rows out of the loss on the output side, and the saved adapter would score tokens
    differently from how it was trained. tests/test_turn_tokens.py fails when an upgrade of TRL or PEFT
    changes either side of this. True when the layer was patched."""
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper):
        return False

    def weight(self):
        adapter = self.token_adapter
        if adapter.disable_adapters or not adapter.active_adapters:
            return adapter.base_layer.weight
        return adapter.get_merged_weights(adapter.active_adapters)

    def bias(self):  # not found through the wrapper either; the trained rows have none
        return getattr(self.token_adapter.base_layer, "bias", None)

    patched = {"weight": property(weight), "bias": property(bias)}
    head.__class__ = type("AdaptedWeightTrainableTokensWrapper", (type(head),), patched)
    return True


def trained(model: Any, tokenizer) -> list[str]:
    """The tokens whose rows train with `model`'s adapter (for the train log and the card)."""
    config = next(iter(getattr(model, "peft_config", {}).values()), None)
    indices = getattr(config, "trainable_token_indices", None) or {}
    ids = sorted({i for rows in (indices.values() if isinstance(indices, dict) else [indices]) for i in rows})
    return tokenizer.convert_ids_to_tokens(ids)
