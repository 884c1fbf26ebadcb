"""TORCH_COMPILE: regional compilation of the decoder layers (https://pytorch.org/tutorials/recipes/regional_compilation.html).

A QLoRA step in eager mode is bound by Python launching thousands of small kernels through PEFT, bitsandbytes,
Liger and Transformers' modules, not by the GPU's arithmetic. Compiled, Inductor fuses the norms, RoPE and SwiGLU.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from job.config import Settings
from job.model import decoder_layers, world_size

log = logging.getLogger(__name__)

# TORCH_COMPILE=auto compiles from this many planned optimizer steps on. The compile is paid once, in the
# first step, and each later step is faster by a few hundredths of a second: the break-even is the first
# step of make bench's `job-compile` row over the per-step saving against `job` (s/step columns, bench.json
# step_seconds), with the compile cache empty, as on a new machine. This sits above the largest break-even
# measured on an H200, so auto never makes a run slower there; the default 1,000 conversations are far below it.
COMPILE_AFTER_STEPS = 6000


def planned_steps(cfg: Settings, rows: list[dict]) -> int:
    """Optimizer steps this run takes: the rows as TRL will pack them (its own packer, same strategy), split
    over the GPUs, in micro-batches, GRAD_ACCUM of them a step, EPOCHS times."""
    n = len(rows)
    if cfg.PACKING:
        from datasets import Dataset
        from trl.data_utils import pack_dataset

        ids = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]})
        n = len(pack_dataset(ids, cfg.MAX_SEQ_LENGTH, strategy="bfd"))
    world = world_size()
    micro_batches = math.ceil(math.ceil(n / world) / cfg.BATCH_SIZE)
    return math.ceil(math.ceil(micro_batches / cfg.GRAD_ACCUM) * cfg.EPOCHS)


def use_compile(cfg: Settings, rows: list[dict], packed_base: bool = False) -> bool:
    """TORCH_COMPILE: true, false, or auto; CUDA only. auto compiles when the planned steps reach
    COMPILE_AFTER_STEPS and the base is held in 16-bit: with the base packed in 4 bits (`packed_base`), the
    compiled step is slower than the eager one (make bench: job-compile-nf4 against job-nf4)."""
    import torch

    if not torch.cuda.is_available() or cfg.TORCH_COMPILE == "false":
        return False
    if cfg.TORCH_COMPILE == "true":
        return True
    if packed_base:
        log.info("TORCH_COMPILE=auto: not compiling, the base is packed in 4 bits")
        return False
    steps = planned_steps(cfg, rows)
    log.info(
        "TORCH_COMPILE=auto: %d optimizer steps planned; compiling from %d on: %s",
        steps,
        COMPILE_AFTER_STEPS,
        "compiling" if steps >= COMPILE_AFTER_STEPS else "not compiling",
    )
    return steps >= COMPILE_AFTER_STEPS


def compile_layers(model: Any) -> int:
    """Compile each decoder layer in place; returns how many. The layers share compiled code, so the cost is about
    one layer's compile (layer 0, whose input carries no gradient, gets a graph of its own). Accelerate's
    compile_regions would wrap the layers and rename their state-dict keys, which PEFT's checkpoints depend on;
    Module.compile() keeps them. dynamic=True: packed rows differ in length every step, and one graph serves them
    all."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
