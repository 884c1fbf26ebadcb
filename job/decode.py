"""Greedy decoding for evaluation: a static KV cache, and on CUDA one decoding step replayed as a CUDA graph.

Why our own loop rather than `model.generate`: an eager decoding step of a 3B model launches ~1,000 small
kernels, and at evaluation's batch sizes the GPU finishes them faster than Python issues them (bench.py
measures it), so the step is bound by the host. Transformers' route to CUDA graphs is `torch.compile` of the
forward, whose one-off compile costs more than the whole eager generation of one evaluation. Capturing the
step as it is costs one step. The loop gives the same tokens as `generate(do_sample=False)` with the same
padding, positions and stopping (tests/test_decode.py checks it against Transformers on CPU).
"""

from __future__ import annotations

import inspect
import logging

log = logging.getLogger(__name__)

CHECK_EVERY = 8  # decoding steps between checks whether every row has finished (each check syncs the host)
WARMUP_STEPS = 2  # eager steps on a side stream before capture: cuBLAS and the allocator set up outside it
# Prompt positions per prefill forward. The static cache takes its full size before the prefill, so a whole
# batch's prompt activations at once (166 rows x ~400 tokens x the MLP's 8,192 features) would come on top of it.
PREFILL_TOKENS = 128


def greedy(
    model,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    eos_id: int | list[int],
    pad_id: int,
    graph: bool | None = None,
    repetition_penalty: float = 1.0,
):
    """New tokens (rows, up to max_new_tokens) for left-padded `input_ids`; pad_id after a row's end token.

    eos_id: the token or tokens that end a row (job/model.py end_of_turn_ids: eos and the chat template's
    end-of-turn token, which a chat model writes instead of eos). graph: capture the step as a CUDA graph
    (default: when the model is on CUDA). repetition_penalty: as Transformers' (RepetitionPenaltyLogitsProcessor):
    each token already in the row, prompt and padding included, has its score divided by it where positive and
    multiplied where negative.
    """
    import torch
    from transformers import StaticCache

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = input_ids.device
    rows, prompt = input_ids.shape
    length = prompt + max_new_tokens
    window = sliding_window(lm.config)
    if window is not None and length > window:
        return _generate(lm, input_ids, attention_mask, max_new_tokens, eos_id, pad_id, window, repetition_penalty)
    cache = StaticCache(config=lm.config, max_cache_len=length)
    # Transformers 5.x renames past_key_values to cache (the old name is deprecated, then removed).
    cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    valid = torch.zeros(rows, length, dtype=torch.bool, device=device)  # keys a query may see: no padding
    valid[:, :prompt] = attention_mask.bool()
    # Positions as Transformers' generate counts them: real tokens from 0, left padding ignored.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(prompt, length, dtype=torch.bool, device=device).tril()
    # A padding query sees only itself (an all-masked row would be NaN); no real query attends to it.
    own = torch.eye(prompt, length, dtype=torch.bool, device=device)
    prefill_mask = ((causal & valid[:, None, :]) | own)[:, None]
    # Additive masks in the model's dtype (0: attend), which sdpa and eager attention both take as they are.
    blocked = torch.finfo(lm.dtype).min

    def additive(allowed):
        return torch.zeros(allowed.shape, dtype=lm.dtype, device=device).masked_fill_(~allowed, blocked)

    penalty = _Penalty(repetition_penalty, input_ids)

    def forward(ids, mask, pos):
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                 **{cache_arg: cache})  # fmt: skip
        return penalty(out.logits[:, -1]).argmax(-1)

    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, prompt, PREFILL_TOKENS):  # the cache fills in order; the last chunk's token counts
            end = min(start + PREFILL_TOKENS, prompt)
            first = forward(input_ids[:, start:end], additive(prefill_mask[:, :, start:end]), positions[:, start:end])
        new[:, 0] = first
        penalty.add(first)
        done = torch.isin(first, eos)
        token = first[:, None].clone()
        pos = positions[:, -1:] + 1
        step = torch.tensor([prompt], device=device)  # cache slot of the token fed in
        mask = additive(valid[:, None, None, :])

        def decode_step():
            mask.index_fill_(3, step, 0.0)
            nxt = torch.where(done, pad_id, forward(token, mask, pos))
            new.index_copy_(1, step - prompt + 1, nxt[:, None])
            done.logical_or_(torch.isin(nxt, eos))
            penalty.add(nxt)
            token.copy_(nxt[:, None])
            pos.add_(1)
            step.add_(1)

        steps = max_new_tokens - 1
        use_graph = device.type == "cuda" if graph is None else graph
        replay, taken = decode_step, 0
        if use_graph and steps > WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # real steps: their tokens count
                for _ in range(WARMUP_STEPS):
                    decode_step()
            torch.cuda.current_stream().wait_stream(side)
            taken = WARMUP_STEPS
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):  # records the step; runs nothing
                decode_step()
            replay = cuda_graph.replay
        while taken < steps:
            if taken % CHECK_EVERY == 0 and bool(done.all()):
                break
            replay()
            taken += 1
    return new


class _Penalty:
    """Transformers' repetition penalty (RepetitionPenaltyLogitsProcessor) on the loop's scores: each token a row
    holds, prompt and padding included, scores / penalty where positive, x penalty where not. Its flags, one per
    row and token of the vocabulary, are made at the first forward (the prefill, before any graph capture) and
    updated in place, so a captured step reads and writes the same tensor."""

    def __init__(self, value: float, input_ids):
        self.value, self.input_ids, self.seen = value, input_ids, None

    def __call__(self, scores):
        import torch

        if self.value == 1.0:
            return scores
        if self.seen is None:
            self.seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            self.seen.scatter_(1, self.input_ids, True)
        scores = scores.float()  # as Transformers' processors see them
        return torch.where(self.seen, torch.where(scores > 0, scores / self.value, scores * self.value), scores)

    def add(self, tokens) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)


def sliding_window(config) -> int | None:
    """The span of the model's sliding-window layers (Gemma 2 and 3, Mistral), or None when it has none."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    return window if window and (types is None or "sliding_attention" in types) else None


def _generate(lm, input_ids, attention_mask, max_new_tokens: int, eos_id, pad_id: int, window: int, penalty: float):
    """Transformers' greedy `generate`, padded to max_new_tokens as greedy() pads: for rows longer than a sliding
    window. greedy()'s masks cover every cached position, while a sliding-window layer's static cache keeps only
    its last `window` positions, and its queries must not see past them; Transformers builds those masks itself."""
    import torch

    log.info(
        "prompt + MAX_NEW_TOKENS = %d tokens exceeds the %d-token span of the model's sliding-window layers: "
        "decoding with Transformers' generate, which masks those layers itself",
        input_ids.shape[1] + max_new_tokens,
        window,
    )
    stops = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    with torch.no_grad():
        out = lm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=stops,
            pad_token_id=pad_id,
        )[:, input_ids.shape[1] :]
    new = torch.full((out.shape[0], max_new_tokens), pad_id, dtype=torch.long, device=out.device)
    new[:, : out.shape[1]] = out
    return new
