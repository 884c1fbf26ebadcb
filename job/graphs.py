"""CUDA graphs for training: each decoder layer's forward and backward captured once, then replayed.

Why: an eager QLoRA step launches ~2,600 small kernels through PEFT, Liger and Transformers, and on an H200
the host takes longer to launch them than the GPU takes to run them (bench.py's profile). A replayed graph
launches a layer's kernels in one call. We use PyTorch's own `torch.cuda.make_graphed_callables` (per layer,
so the embedding, the loss and the optimizer stay eager) rather than `torch.compile`, whose compile costs a
minute per process: capturing costs a few steps.

A graph replays fixed shapes, so each packed micro-batch is padded to BATCH_SIZE x MAX_SEQ_LENGTH tokens
(FixedShape below): the padding is conversations of its own, attended only by themselves and masked from the
loss, so the loss and the gradients are those of the unpadded batch (tests/test_graphs.py). A micro-batch
that does not fit the captured shape runs the eager layers.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class FixedShape:
    """Collator wrapper: TRL's padding-free micro-batch padded to `tokens` tokens and `slots` conversations.

    The padding is cut into conversations of at most `max_length` tokens (the varlen kernel's longest),
    and the conversation boundaries (cu_seq_lens) are filled up with empty conversations at the end.
    """

    def __init__(self, inner, tokens: int, max_length: int, slots: int, pad_id: int):
        self.inner, self.tokens, self.max_length, self.slots, self.pad_id = inner, tokens, max_length, slots, pad_id

    def __call__(self, examples):
        import torch

        batch = self.inner(examples)
        cu = batch.get("cu_seq_lens_q")
        n = batch["input_ids"].shape[1]
        pad = self.tokens - n
        pieces = [min(self.max_length, pad - start) for start in range(0, max(pad, 0), self.max_length)]
        if cu is None or pad < 0 or len(cu) - 1 + len(pieces) > self.slots:
            return batch  # does not fit the captured shape: this micro-batch runs eager
        pieces_t = torch.tensor(pieces, dtype=torch.long)
        ends = n + pieces_t.cumsum(0)
        cu = torch.cat([cu.long(), ends, torch.full((self.slots + 1 - len(cu) - len(pieces),), self.tokens)])
        batch["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_full((1, pad), self.pad_id)], 1)
        batch["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, pad), -100)], 1)
        positions = [torch.arange(p) for p in pieces]
        batch["position_ids"] = torch.cat(
            [batch["position_ids"], *(p[None].to(batch["position_ids"]) for p in positions)], 1
        )
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu.to(torch.int32)
        batch["max_length_q"] = batch["max_length_k"] = self.max_length
        if "seq_idx" in batch:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(self.slots, dtype=torch.int32), cu.diff())[None]
        return batch


def slots_for(tokens: int, max_length: int) -> int:
    """Conversations a captured micro-batch holds: the padding's pieces plus one real conversation per 16
    tokens (shorter ones are rare; a micro-batch with more of them runs eager)."""
    return tokens // 16 + -(-tokens // max_length) + 1


def capture_layers(model: Any, tokens: int, max_length: int, slots: int, dtype, autocast: bool):
    """Replace each decoder layer's training forward by a replayed graph; returns a function that undoes it.

    The layers keep their module tree and state-dict keys (PEFT saves by them): each layer's `forward` is
    set on the instance and falls back to the class's forward whenever a call does not match the capture
    (evaluation, no gradients, another shape). `autocast`: whether the Trainer's forward runs under autocast
    to `dtype` (its mixed precision), which the capture must repeat.
    """
    import torch
    from torch import nn

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    device = next(model.parameters()).device
    hidden = inner.config.hidden_size
    model.train()  # dropout as in training: a graph replays what was captured

    class Step(nn.Module):  # the graph's inputs: tensors only
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x, cos, sin, cu):
            return type(self.layer).forward(
                self.layer,
                x,
                attention_mask=None,
                position_embeddings=(cos, sin),
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=max_length,
                max_length_k=max_length,
            )

    with torch.no_grad():
        x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
        cos, sin = inner.rotary_emb(x, position_ids=torch.arange(tokens, device=device)[None] % max_length)
        cu = torch.arange(0, tokens + 1, max_length, device=device)
        cu = torch.cat([cu, cu.new_full((slots + 1 - len(cu),), tokens)]).to(torch.int32)
    # The first layer's input (frozen embeddings) carries no gradient; every later layer's does.
    samples = tuple((x.clone().requires_grad_(i > 0), cos, sin, cu) for i in range(len(layers)))
    steps = tuple(Step(layer) for layer in layers)
    # As the Trainer's step runs, but without autocast's weight-cast cache, which the graph API rules out.
    with torch.autocast(device.type, dtype=dtype, enabled=autocast, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(steps, samples, allow_unused_input=True)

    calls = {"graph": 0, "eager": 0}  # layer calls each way, for the log and the bench

    for i, (layer, step) in enumerate(zip(layers, graphed)):

        def forward(x, *args, _step=step, _layer=layer, _grad=i > 0, **kwargs):
            cu, emb = kwargs.get("cu_seq_lens_q"), kwargs.get("position_embeddings")
            if (
                _layer.training
                and torch.is_grad_enabled()
                and not args
                and x.shape == (1, tokens, hidden)
                and x.requires_grad == _grad
                and cu is not None
                and cu.shape == (slots + 1,)
                and emb is not None
            ):
                calls["graph"] += 1
                return _step(x, emb[0], emb[1], cu.to(device))
            calls["eager"] += 1
            return type(_layer).forward(_layer, x, *args, **kwargs)

        layer.forward = forward
    # Graphed backward hands out its static gradient buffers; autograd could keep one as a parameter's .grad,
    # which the next replay would overwrite (with GRAD_ACCUM > 1, before it is added to). A copy prevents it.
    hooks = [p.register_hook(torch.clone) for p in model.parameters() if p.requires_grad]

    def release() -> None:
        for layer in layers:
            vars(layer).pop("forward", None)
        for hook in hooks:
            hook.remove()

    release.calls = calls
    return release
