"""The training step's speed features, chosen in one place (`choose`) and switched on in one place (`Speedups.apply`).

Each changes how a step is computed, not what it trains, and its test compares it with the plain step:

  nf4_base.py        DEQUANTIZE_BASE: the NF4 base held in 16-bit, no 4-bit kernels in the step; where it stays
                     in 4 bits on a GPU, micro-batches split to fit (the same optimizer step, less memory)
  torch_compile.py   TORCH_COMPILE: regional compilation of the decoder layers
  liger.py           LIGER_KERNEL: Liger's fused kernels, applied by the Trainer
  cuda_graphs.py     CUDA_GRAPHS: each decoder layer's forward and backward replayed as CUDA graphs
  lazy_metrics.py    TRL's training metrics read from the GPU once per log line, not every micro-batch
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from job.config import Settings
from job.model import four_bit_layers
from job.speedups import cuda_graphs, lazy_metrics, liger, nf4_base, torch_compile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speedups:
    cfg: Settings  # BATCH_SIZE and GRAD_ACCUM as the trainer runs them (nf4_base.lean_micro_batches)
    trainer_class: type  # the SFTTrainer to build
    liger: bool  # SFTConfig's use_liger_kernel
    compiled: bool
    graphs: bool

    def apply(self, trainer: Any) -> None:
        """What needs the built trainer: the decoder layers compiled, or captured as CUDA graphs when it starts."""
        if self.compiled:
            n = torch_compile.compile_layers(trainer.model)
            log.info("compiling %d decoder layers (one compile, in the first step)", n)
        if self.graphs:
            cuda_graphs.attach(trainer, self.cfg)


def choose(cfg: Settings, model: Any, rows: list[dict], lean: bool = True) -> Speedups:
    """What speeds up training `rows` on the base `model`, decided before LoRA wraps it; DEQUANTIZE_BASE is done
    here. `lean`: the job's own economies (lean_micro_batches, lazy_metrics); the bench turns them off for the plain-TRL
    recipes it compares against."""
    import torch
    from trl import SFTTrainer

    nf4_base.dequantize_for_training(cfg, model)
    if lean:
        cfg = nf4_base.lean_micro_batches(cfg, model)
    compiled = torch_compile.use_compile(cfg, rows, packed_base=bool(four_bit_layers(model)))
    no_graphs = cuda_graphs.why_not(cfg, compiled, attn=model.config._attn_implementation)
    if no_graphs and cfg.CUDA_GRAPHS and torch.cuda.is_available():  # asked for on a GPU, and not taken: say why
        log.info("CUDA graphs: not used: %s; the layers run eager", no_graphs)
    return Speedups(
        cfg=cfg,
        trainer_class=lazy_metrics.trainer_class() if lean else SFTTrainer,
        liger=liger.use_liger(cfg, compiled),
        compiled=compiled,
        graphs=no_graphs is None,
    )
