"""CUDA graphs for training: each decoder layer's forward and backward captured once, then replayed.

Why: an eager QLoRA step launches ~2,600 small kernels through PEFT, Liger and Transformers, and on an H200
the host takes longer to launch them than the GPU takes to run them (make bench's profile). A replayed graph
launches a layer's kernels in one call. We capture per layer, as PyTorch's `make_graphed_callables` does (so
the embedding, the loss and the optimizer stay eager; `_chain` says why not that function itself), rather than
use `torch.compile`, whose compile costs a minute per process: capturing costs a few steps.

A graph replays fixed shapes, so each packed micro-batch is padded to BATCH_SIZE x MAX_SEQ_LENGTH tokens
(FixedShape below): the padding is conversations of its own, attended only by themselves and masked from the
loss, so the loss and the gradients are those of the unpadded batch (tests/test_cuda_graphs.py). A micro-batch
that does not fit the captured shape runs the eager layers.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from typing import Any

from job import attention
from job.config import Settings
from job.errors import JobError
from job.model import decoder_layers

log = logging.getLogger(__name__)


def why_not(cfg: Settings, compiled: bool, attn: str | None = None) -> str | None:
    """Why the step cannot be captured, or None where CUDA_GRAPHS apply: packed rows through job/attention.py's
    varlen kernel (the graph passes conversation boundaries, no mask) on a GPU that has the flash kernel, no
    compile, no gradient checkpointing. `attn`: the attention the model was loaded with, when it is not
    ATTN_IMPLEMENTATION (job/attention.py attention_for; Gemma 2 is loaded eager_varlen)."""
    import torch

    attn = attn or cfg.ATTN_IMPLEMENTATION
    unmasked = (  # why only NAME's packed rows can be captured
        "its loop over the conversations reads their bounds on the host"
        if attn == attention.EAGER_NAME
        else "packed rows need a mask"
    )
    reasons = (
        (not cfg.CUDA_GRAPHS, "CUDA_GRAPHS=false"),
        (not torch.cuda.is_available(), "no CUDA GPU"),
        (not attention.flash_varlen(), "this GPU has no flash varlen kernel"),
        (not cfg.PACKING, "PACKING=false (padded rows need a mask, which the graphs do not pass)"),
        (attn != attention.NAME, f"the model attends with {attn}, not {attention.NAME} ({unmasked})"),
        (compiled, "the layers are compiled (TORCH_COMPILE)"),
        (cfg.GRADIENT_CHECKPOINTING, "GRADIENT_CHECKPOINTING=true"),
    )
    return next((why for failed, why in reasons if failed), None)


def use_graphs(cfg: Settings, compiled: bool, attn: str | None = None) -> bool:
    return why_not(cfg, compiled, attn) is None


def attach(trainer: Any, cfg: Settings) -> None:
    """Pad the trainer's packed micro-batches to BATCH_SIZE x MAX_SEQ_LENGTH tokens, capture its decoder layers when
    training begins (after the Trainer has applied Liger, whose kernels the graphs must hold) and give them back
    when it ends. A capture that fails stops the job with the way out: after a failed capture CUDA's random-number
    state is unusable, so training cannot go on eager."""
    import torch
    from transformers import TrainerCallback

    tokens = cfg.BATCH_SIZE * cfg.MAX_SEQ_LENGTH
    slots = slots_for(tokens, cfg.MAX_SEQ_LENGTH)
    fixed = FixedShape(trainer.data_collator, tokens, cfg.MAX_SEQ_LENGTH, slots, trainer.processing_class.pad_token_id)

    class Graphs(TrainerCallback):
        release = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            t0 = time.perf_counter()
            # the Trainer's mixed precision, which the capture repeats
            dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
            try:
                self.release = capture_layers(
                    model, tokens, cfg.MAX_SEQ_LENGTH, slots, dtype, autocast=args.bf16 or args.fp16
                )
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # a kernel or library that a CUDA graph cannot hold
                raise JobError(
                    f"capturing the decoder layers as CUDA graphs failed ({type(e).__name__}: {str(e)[:300]}). "
                    "Set CUDA_GRAPHS=false to train without them (slower, same results)."
                ) from None
            log.info("CUDA graphs: decoder layers captured in %.1f s", time.perf_counter() - t0)

        def on_train_end(self, args, state, control, **kwargs):
            if self.release:
                self.release()
                log.info("CUDA graphs: decoder layer calls %s", self.release.calls)

    trainer.data_collator = fixed
    trainer.add_callback(Graphs())


class FixedShape:
    """Collator wrapper: TRL's padding-free micro-batch padded to `tokens` tokens and `slots` conversations.

    The padding is cut into conversations of at most `max_length` tokens (the varlen kernel's longest),
    and the conversation boundaries (cu_seq_lens) are filled up with empty conversations at the end.
    TRL's logged `num_tokens` counts a micro-batch's length, so it includes this padding; the loss does not.
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
    return tokens // 16 + math.ceil(tokens / max_length) + 1


def capture_layers(model: Any, tokens: int, max_length: int, slots: int, dtype, autocast: bool):
    """Replace each decoder layer's training forward by a replayed graph; returns a function that undoes it.

    The layers keep their module tree and state-dict keys (PEFT saves by them): each layer's `forward` is
    set on the instance and falls back to the class's forward whenever a call does not match the capture
    (evaluation, no gradients, another shape). `autocast`: whether the Trainer's forward runs under autocast
    to `dtype` (its mixed precision), which the capture must repeat.
    """
    import torch

    layers = decoder_layers(model)
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    device = next(model.parameters()).device
    hidden = inner.config.hidden_size
    model.train()  # dropout as in training: a graph replays what was captured

    # Gemma 3 rotates its sliding-window and its global layers by different bases: its rotary embedding takes
    # the layer type, and each layer gets its type's (cos, sin). Llama-like models have one for every layer.
    by_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
    types = list(inner.config.layer_types) if by_type else [None] * len(layers)
    with torch.no_grad():  # the graphs' inputs besides the hidden states, shared by every layer of a type
        x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
        positions = torch.arange(tokens, device=device)[None] % max_length
        rope = {
            t: inner.rotary_emb(x, positions, t) if by_type else inner.rotary_emb(x, position_ids=positions)
            for t in dict.fromkeys(types)
        }
        cu = torch.arange(0, tokens + 1, max_length, device=device)
        cu = torch.cat([cu, cu.new_full((slots + 1 - len(cu),), tokens)]).to(torch.int32)
    layer_type = {id(layer): t for layer, t in zip(layers, types)}

    def run(layer, h, weights):
        # The layer's trainable weights replaced by `weights` for this call (see _chain on why).
        kwargs = dict(
            attention_mask=None,
            position_embeddings=rope[layer_type[id(layer)]],
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max_length,
            max_length_k=max_length,
        )
        return torch.func.functional_call(layer, weights, (h,), kwargs)

    # As the Trainer's step runs, but without autocast's weight-cast cache, whose casts a graph would outlive.
    with torch.autocast(device.type, dtype=dtype, enabled=autocast, cache_enabled=False):
        graphed = _chain(layers, run, x)

    calls = {"graph": 0, "eager": 0}  # layer calls each way, for the log and the bench

    first_of_type = {t: types.index(t) for t in rope}  # the layer that copies in its type's (cos, sin)
    for i, (layer, step) in enumerate(zip(layers, graphed)):
        own = i == first_of_type[types[i]]

        def forward(h, *args, _step=step, _layer=layer, _first=i == 0, _rope=own, _cs=rope[types[i]], **kwargs):
            cu_now, emb = kwargs.get("cu_seq_lens_q"), kwargs.get("position_embeddings")
            if (
                _layer.training
                and torch.is_grad_enabled()
                and not args
                and h.shape == (1, tokens, hidden)
                # captured with a frozen embedding: the first layer's input carries no gradient, later ones do;
                # with trained turn-token rows (job/turn_tokens.py) the first layer runs eager, the rest replay
                and h.requires_grad != _first
                and cu_now is not None
                and cu_now.shape == cu.shape
                and emb is not None
            ):
                if _rope:  # this step's positions, once for every layer of this type
                    _cs[0].copy_(emb[0])
                    _cs[1].copy_(emb[1])
                if _first:  # this step's conversation bounds, once for every layer
                    cu.copy_(cu_now)
                calls["graph"] += 1
                return _step(h)
            calls["eager"] += 1
            return type(_layer).forward(_layer, h, *args, **kwargs)

        layer.forward = forward
    # A graphed backward hands out its static gradient buffers; autograd could keep one as a parameter's .grad,
    # which the next replay would overwrite (with GRAD_ACCUM > 1, before it is added to). A copy prevents it.
    hooks = [p.register_hook(torch.clone) for p in model.parameters() if p.requires_grad]

    def release() -> None:
        for layer in layers:
            vars(layer).pop("forward", None)
        for hook in hooks:
            hook.remove()

    release.calls = calls
    return release


def _chain(layers: list, run, x) -> list:
    """Each layer's forward and backward captured as CUDA graphs, chained: one callable per layer, h -> run(h),
    where run(layer, h, weights) runs a layer with its trainable weights replaced by `weights`.

    Our own capture rather than torch.cuda.make_graphed_callables, whose order of capture and memory pool we
    follow (forward graphs in layer order, backward graphs in reverse, one pool): it gives every layer an input
    buffer and a gradient buffer of its own and copies into them on every call, 2 x 24 MiB per layer at
    4,096 tokens of a 3B model. Chained, a layer's graph reads the previous layer's output, and writes the
    gradient of its input where the previous layer's backward reads it: nothing is copied between layers.
    Only the first layer's input (the embeddings) is copied in.
    """
    import torch
    from torch.autograd.function import once_differentiable

    named = [[(n, p) for n, p in layer.named_parameters() if p.requires_grad] for layer in layers]
    params = [tuple(p for _, p in layer_named) for layer_named in named]

    def views(i: int) -> dict:
        return {n: p.view_as(p) for n, p in named[i]}

    # Warm-up outside any graph (cuBLAS handles, Triton's autotuning, the allocator), on a side stream.
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for i, layer in enumerate(layers):
                h, w = x.detach().requires_grad_(i > 0), views(i)
                out = run(layer, h, w)
                wanted = ((h,) if i > 0 else ()) + tuple(w.values())
                torch.autograd.grad(out, wanted, torch.empty_like(out), allow_unused=True)
    torch.cuda.synchronize()

    # The graphs differentiate with respect to views of the weights made inside the capture, not the weights:
    # autograd synchronises with the stream of the node where it collects a gradient, and a weight's node (its
    # gradient accumulator) can belong to the default stream, which a capture may not touch. DDP makes them
    # there when it wraps the model, so differentiating with respect to the weights fails under DDP. A view
    # made inside the capture belongs to the capture's stream. Outside the graphs, autograd then adds the
    # replayed gradients to the weights (and DDP reduces them) as for any layer.
    pool = torch.cuda.graph_pool_handle()
    fwd = [torch.cuda.CUDAGraph() for _ in layers]
    bwd = [torch.cuda.CUDAGraph() for _ in layers]
    inputs, outputs, weights = [x], [], []
    for i, layer in enumerate(layers):
        with torch.cuda.graph(fwd[i], pool=pool):
            weights.append(views(i))
            outputs.append(run(layer, inputs[i], weights[i]))
        inputs.append(outputs[i])  # the next layer reads this layer's output where it lies
    grads: list = [None] * len(layers)
    grad_out = torch.empty_like(outputs[-1])  # the last layer's: copied in from the loss's backward
    for i in reversed(range(len(layers))):
        wanted = ((inputs[i],) if i > 0 else ()) + tuple(weights[i].values())
        with torch.cuda.graph(bwd[i], pool=pool):
            got = torch.autograd.grad(outputs[i], wanted, grad_out, allow_unused=True)
        grad_in, grad_params = (got[0], got[1:]) if i > 0 else (None, got)
        grads[i] = (grad_out, grad_in, grad_params)
        grad_out = grad_in  # the previous layer's output gradient is this layer's input gradient
    # The buffers stay; the autograd graph recorded during capture goes. It holds the weights' gradient
    # accumulators, made on the capture's stream, and eager backward would synchronise with that stream.
    inputs, outputs = [t.detach() for t in inputs], [t.detach() for t in outputs]
    del weights

    def graphed(i: int):
        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, *layer_params):
                if h.data_ptr() != inputs[i].data_ptr():
                    inputs[i].copy_(h)
                fwd[i].replay()
                return outputs[i].detach()

            @staticmethod
            @once_differentiable
            def backward(ctx, g):
                g_out, g_in, g_params = grads[i]
                if g.data_ptr() != g_out.data_ptr():
                    g_out.copy_(g)
                bwd[i].replay()
                return (None if g_in is None else g_in.detach(), *(None if t is None else t.detach() for t in g_params))

        return lambda h: Graphed.apply(h, *params[i])

    return [graphed(i) for i in range(len(layers))]
