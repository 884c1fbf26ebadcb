"""The NF4 base: held in 16-bit for training where the GPU has room (DEQUANTIZE_BASE), else kept in 4 bits with
its micro-batches split in two (the memory-lean path). Either way a step trains what the 4-bit base trains."""

from __future__ import annotations

import logging
from typing import Any

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


def lean_micro_batches(cfg: Settings, model: Any) -> Settings:
    """Where the base stays packed in 4 bits on a GPU (DEQUANTIZE_BASE, a card short of memory), each micro-batch
    is split in two, GRAD_ACCUM doubled. An optimizer step then takes the same
    sequences in the same order, and its loss is normalised by the tokens of all its micro-batches (TRL's
    num_items_in_batch), so training is the same; the activations kept for backward, most of the step's memory
    on a 3B model, halve. Smaller micro-batches cost some speed (make bench: job-nf4)."""
    import torch

    if not (torch.cuda.is_available() and four_bit_layers(model) and cfg.BATCH_SIZE % 2 == 0):
        return cfg
    lean = with_overrides(cfg, BATCH_SIZE=cfg.BATCH_SIZE // 2, GRAD_ACCUM=cfg.GRAD_ACCUM * 2)
    log.info(
        "base in 4 bits, so memory is short: micro-batches of %d sequences, %d per optimizer step "
        "(BATCH_SIZE=%d x GRAD_ACCUM=%d split in two; the same sequences per step)",
        lean.BATCH_SIZE,
        lean.GRAD_ACCUM,
        cfg.BATCH_SIZE,
        cfg.GRAD_ACCUM,
    )
    return lean
