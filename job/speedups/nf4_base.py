"""The NF4 base: held in 16-bit for training where the GPU has room (DEQUANTIZE_BASE), else kept in 4 bits with
its micro-batches split to fit the memory left (the memory-lean path). Either way a step trains what the 4-bit base
trains."""

from __future__ import annotations

import logging
from typing import Any

from job import attention
from job.config import Settings, with_overrides
from job.model import four_bit_layers, local_rank

log = logging.getLogger(__name__)


def dequantize_for_training(cfg: Settings, model: Any) -> bool:
    """Swap the 4-bit linear layers for 16-bit ones holding the same NF4-rounded weights; returns whether it did.

    bitsandbytes' 4-bit layer dequantizes its weight to the compute dtype on every forward and
    backward call and multiplies with that: the math is a 16-bit matmul with the NF4 values. A QLoRA
    step on the 3B model makes ~400 such calls (196 layers, forward and backward), each ~300 us of
    Python and launches, and the step is bound by the CPU (job/speedups/torch_compile.py). Dequantizing
    once (Transformers' own `dequantize`) keeps the weights, losses and gradients and drops that work
    (make bench measures both paths and checks they agree). The cost is memory, 2 bytes per base
    weight, so "auto" does it only where the 16-bit copy takes at most a quarter of the GPU (a 24 GB card
    for 3B, not for 8B).
    """
    if cfg.QUANTIZATION != "nf4" or cfg.DEQUANTIZE_BASE == "false":
        return False
    size = sum(m.in_features * m.out_features for m in four_bit_layers(model)) * model.dtype.itemsize
    auto, room = cfg.DEQUANTIZE_BASE == "auto", usable_gpu_memory()  # room: None without a GPU
    if auto and room is None:
        return False
    quarter = f"a quarter of the {room / 2**30:.1f} GiB of GPU memory this process may use" if auto else ""
    if auto and size > room / 4:
        log.info(
            "keeping the base weights packed in 4 bits: a 16-bit copy (%.1f GiB) would take more than %s "
            "(DEQUANTIZE_BASE=auto)",
            size / 2**30,
            quarter,
        )
        return False
    model.dequantize(dtype=model.dtype)
    log.info(
        "base weights: NF4-rounded, held in %s for training (+%.1f GiB; DEQUANTIZE_BASE=%s%s)",
        str(model.dtype).removeprefix("torch."),
        size / 2**30,
        cfg.DEQUANTIZE_BASE,
        f": at most {quarter}" if auto else "",
    )
    return True


def usable_gpu_memory() -> int | None:
    """Bytes of GPU memory this process may use (None without a GPU): the card's, times the share that
    torch.cuda.set_per_process_memory_fraction allows, which is how a bench makes an 80 GB card act as a 24 GB
    one (issue 30's small cards); under DDP each rank has a card of its own."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = local_rank()
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(device))


# Activation memory kept for backward, per token and decoder layer, in 2-byte values of the layer's widths: fitted
# to the bench's measured peaks on the 4-bit path with Liger (README, "Model families, bigger models and smaller
# cards"): Llama-3.2-3B (hidden 3,072, MLP 8,192, 28 layers) kept ~4.9 GiB and Llama-3.1-8B (4,096, 14,336, 32)
# ~8.4 GiB above their weights for micro-batches of 2,048 tokens: about 11 hidden-wide and 2 MLP-wide values.
ACT_HIDDEN, ACT_MLP = 11, 2
# Left free beside the activations (bytes): LoRA weights, their gradients and AdamW state, the loss's logit chunks,
# the allocator's fragmentation.
RESERVE = 1 << 30


def activation_bytes(cfg: Settings, config: Any, sequences: int, checkpointing: bool = False) -> int:
    """Estimated bytes kept for backward by a micro-batch of `sequences` rows of MAX_SEQ_LENGTH tokens of the model
    with `config` (a Transformers config). With `checkpointing`, each layer keeps only its input and one layer's
    activations exist at a time (recomputed in backward)."""
    text = getattr(config, "text_config", None) or config
    hidden, mlp, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    per_layer = 2 * (ACT_HIDDEN * hidden + ACT_MLP * mlp)
    attn = getattr(text, "_attn_implementation", None)
    if attn in ("eager", attention.EAGER_NAME):  # eager attention keeps its probabilities per head, over every key
        # of a row: at most MAX_SEQ_LENGTH of them, one conversation at a time (EAGER_NAME), but packed rows reach
        # plain eager attention as one flat row of the whole micro-batch
        keys = cfg.MAX_SEQ_LENGTH * (sequences if cfg.PACKING and attn == "eager" else 1)
        per_layer += 2 * text.num_attention_heads * keys
    per_token = (2 * hidden * layers + per_layer) if checkpointing else per_layer * layers
    if not cfg.LIGER_KERNEL:  # the output layer's logits, bf16 and the loss's fp32 copy and gradient
        per_token += 10 * text.vocab_size
    return per_token * sequences * cfg.MAX_SEQ_LENGTH


def free_gpu_memory() -> int:
    """Bytes this process may still allocate on its GPU: its share (usable_gpu_memory) less what is allocated."""
    import torch

    return usable_gpu_memory() - torch.cuda.memory_allocated(local_rank())


def lean_micro_batches(cfg: Settings, model: Any, free: int | None = None) -> Settings:
    """Where the base stays packed in 4 bits on a GPU (DEQUANTIZE_BASE, a card short of memory), each micro-batch
    is split, GRAD_ACCUM multiplied alike: in two, or further until a micro-batch's estimated activations
    (activation_bytes) fit the memory left after loading the model (`free`, bytes; measured when None), and where
    even one sequence would not fit, GRADIENT_CHECKPOINTING is turned on. An optimizer step then takes the same
    sequences in the same order, and its loss is normalised by the tokens of all its micro-batches (TRL's
    num_items_in_batch), so training is the same; the activations kept for backward, most of the step's memory
    on a 3B model, shrink. Smaller micro-batches cost some speed (make bench: job-nf4). The log gives the figures."""
    import torch

    if not (torch.cuda.is_available() and four_bit_layers(model)):
        return cfg
    free = free_gpu_memory() if free is None else free
    room = free - RESERVE
    batch = cfg.BATCH_SIZE
    sizes = [d for d in range(batch, 0, -1) if batch % d == 0]  # micro-batch sizes that split it evenly
    if batch % 2 == 0:
        sizes = sizes[1:]  # at least in two: measured faster than one whole micro-batch with the 4-bit kernels
    micro = next((d for d in sizes if activation_bytes(cfg, model.config, d) <= room), 1)
    checkpointing = cfg.GRADIENT_CHECKPOINTING or activation_bytes(cfg, model.config, 1) > room
    need = activation_bytes(cfg, model.config, micro, checkpointing)
    lean = with_overrides(
        cfg, BATCH_SIZE=micro, GRAD_ACCUM=cfg.GRAD_ACCUM * (batch // micro), GRADIENT_CHECKPOINTING=checkpointing
    )
    if lean == cfg:
        return cfg
    log.info(
        "base in 4 bits, so memory is short: micro-batches of %d sequences, %d per optimizer step (BATCH_SIZE=%d "
        "x GRAD_ACCUM=%d split; the same sequences per step)%s: an estimated %.1f GiB of activations per "
        "micro-batch of %d tokens, %.1f GiB free after loading the model",
        lean.BATCH_SIZE,
        lean.GRAD_ACCUM,
        cfg.BATCH_SIZE,
        cfg.GRAD_ACCUM,
        ", gradient checkpointing on (one sequence's activations would not fit)"
        if checkpointing and not cfg.GRADIENT_CHECKPOINTING
        else "",
        need / 2**30,
        micro * cfg.MAX_SEQ_LENGTH,
        free / 2**30,
    )
    return lean
