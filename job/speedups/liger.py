"""Liger's fused RMSNorm, RoPE and SwiGLU kernels in training (LIGER_KERNEL): less activation memory, faster steps.

The Trainer applies them when training starts (SFTConfig's use_liger_kernel). Liger also patches Transformers'
modeling module for the whole process; the train stage puts it back after training (model.model_code_restored).
"""

from __future__ import annotations

import importlib.util

from job.config import Settings


def use_liger(cfg: Settings, compiled: bool) -> bool:
    """On CUDA with liger-kernel installed, when not compiling: torch.compile cannot trace Liger's kernels, and
    Inductor fuses the same operations anyway."""
    import torch

    return (
        cfg.LIGER_KERNEL
        and not compiled
        and torch.cuda.is_available()
        and importlib.util.find_spec("liger_kernel") is not None
    )
