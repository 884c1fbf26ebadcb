"""The memory-lean path: where the base stays packed in 4 bits, micro-batches split in two."""

from __future__ import annotations

import logging
from typing import Any

from job.config import Settings, with_overrides
from job.model import four_bit_layers

log = logging.getLogger(__name__)


def lean_micro_batches(cfg: Settings, model: Any) -> Settings:
    """The memory-lean path: where the base stays packed in 4 bits on a GPU (DEQUANTIZE_BASE, a card short of
    memory), each micro-batch is split in two, GRAD_ACCUM doubled. An optimizer step then takes the same
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
