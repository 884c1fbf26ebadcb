"""Stage 3, train: QLoRA with TRL's SFTTrainer, the recipe in `build_trainer` and `run`.

The base model (4-bit NF4 with QUANTIZATION=nf4) -> LoRA -> the tokenized rows -> the trainer -> train, resumed
from the newest complete checkpoint made under this run's fingerprint (job/checkpoints.py) -> the adapter and
the train log. The speed features are chosen and switched on in one place (job/speedups/).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job import checkpoints, errors, speedups, stop, turn_tokens
from job.config import Settings
from job.errors import JobError, OutOfMemory, Stopped
from job.files import atomic_write_text, read_jsonl
from job.model import (
    four_bit_layers,
    load_model,
    load_tokenizer,
    lora_config,
    model_code_restored,
    resolve_precision,
    world_size,
)
from job.paths import RunPaths

log = logging.getLogger(__name__)


def build_trainer(
    cfg: Settings,
    paths: RunPaths,
    precision: str,
    lean: bool = True,
    *,
    fingerprint: dict | None = None,
    **overrides: Any,
) -> Any:
    """TRL's SFTTrainer for our settings, ready to train. `lean`: see speedups.choose. `fingerprint`: written into
    every checkpoint. `overrides`: SFTConfig fields."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed

    tokenizer = load_tokenizer(cfg)
    rows = read_jsonl(paths.train_tokens)
    model = load_model(cfg, precision)  # frozen, NF4 4-bit with QUANTIZATION=nf4
    speed = speedups.choose(cfg, model, rows, lean)  # on the base before LoRA wraps its layers
    turn_ids = turn_tokens.choose(cfg, model, tokenizer, rows)  # TRAIN_TURN_TOKENS: a base that cannot end a turn
    if speed.cfg.GRADIENT_CHECKPOINTING:  # asked for, or turned on by the memory-lean path
        model.enable_input_require_grads()  # frozen embeddings: let the checkpointed blocks get gradients
    # We wrap with PEFT ourselves rather than passing peft_config to TRL, so the LoRA weights are
    # created in fp32 whatever the base dtype (see job/model.py on fp16).
    set_seed(cfg.SEED)  # LoRA A matrices are drawn here: same seed, same initial adapter
    lora = lora_config(cfg, model, turn_tokens.peft_targets(model, turn_ids))
    model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    turn_tokens.output_weight_follows_adapter(model)  # TRL's loss reads the output layer's weight
    trainer = speed.trainer_class(
        model=model,
        args=sft_config(speed.cfg, paths, precision, use_liger_kernel=speed.liger, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[checkpoints.callback(cfg.SAVE_TOTAL_LIMIT, fingerprint)],
    )
    speed.apply(trainer)
    # TRL casts LoRA weights of a quantized model to bf16. We keep them in fp32: fp16's gradient
    # scaler cannot unscale bf16 gradients, and a resumed run loads the adapter back in fp32
    # (PEFT's load_adapter), so bf16 here would make a resumed run differ from an uninterrupted one.
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return trainer


def run(cfg: Settings, paths: RunPaths, fingerprint: dict | None = None) -> list[Path]:
    """Train, resuming from the newest complete checkpoint made under `fingerprint` (the pipeline's record of
    this stage: settings, inputs, digest, code; job/provenance.py), which every new checkpoint and the train
    log carry. Without it (tools, tests) any complete checkpoint is resumed and none is fingerprinted."""
    import torch

    precision, why = resolve_precision(cfg)
    # Transformers 5 takes the TensorBoard folder from the environment only.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(paths.tensorboard))
    digest = fingerprint["digest"] if fingerprint else None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    resume = checkpoints.resume_point(paths.checkpoints, digest, paths.stale_checkpoints(stamp))
    checkpoints.pin_cpu_threads(resume)  # before any computation: model load, quantization, every step
    trainer = build_trainer(cfg, paths, precision, fingerprint=fingerprint)
    info = describe(cfg, trainer, precision, why)
    if resume:
        log.info("resuming from %s", resume.name)
    elif digest:
        log.info("training from step 0 (fingerprint %s)", digest[:12])
    # A SIGTERM waits for the step's end and its checkpoint; Liger's process-wide patch of the model code is undone;
    # running out of GPU memory or disk becomes an exit code that says what to change.
    with (
        stop.during_training(),
        model_code_restored(trainer.model),
        _failures_explained(paths.checkpoints, trainer, cfg),
    ):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.requested():
        raise Stopped(
            f"stopped by SIGTERM after saving checkpoint-{trainer.state.global_step}: run the same command again "
            "to resume from it"
        )
    if trainer.is_world_process_zero():
        _save_adapter(trainer, paths.adapter)
        history = {
            # What trained this adapter, as the card and `python -m job provenance` show it.
            "provenance": {**(fingerprint or {}), "resumed_from": resume.name if resume else None},
            "train": info,
            "metrics": result.metrics,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None,
            "log_history": trainer.state.log_history,
        }
        atomic_write_text(paths.train_log, json.dumps(history, indent=2))
    return [paths.adapter, paths.train_log]


def sft_config(cfg: Settings, paths: RunPaths, precision: str, **overrides: Any) -> Any:
    """TRL's configuration for our settings; `overrides`: other SFTConfig fields (the speed features', the bench's)."""
    import torch
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(paths.checkpoints),
        num_train_epochs=cfg.EPOCHS,
        learning_rate=cfg.LEARNING_RATE,
        lr_scheduler_type=cfg.LR_SCHEDULER,
        warmup_steps=cfg.WARMUP_RATIO,  # below 1 (config checks it): a share of the total steps
        per_device_train_batch_size=cfg.BATCH_SIZE,
        gradient_accumulation_steps=cfg.GRAD_ACCUM,
        optim=cfg.OPTIMIZER,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=precision == "fp32" and not torch.cuda.is_available(),
        activation_checkpointing=cfg.GRADIENT_CHECKPOINTING,
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Data: pre-tokenized {input_ids, completion_mask}; loss on the reply only.
        max_length=cfg.MAX_SEQ_LENGTH,
        packing=cfg.PACKING,
        packing_strategy="bfd",  # best-fit packing, padding-free: no conversation is split
        completion_only_loss=True,
        dataset_num_proc=None,
        seed=cfg.SEED,
        data_seed=cfg.SEED,
        # Checkpoints: our callback marks and rotates them (see module docstring).
        save_strategy="steps",
        save_steps=cfg.SAVE_STEPS,
        save_total_limit=None,
        save_only_model=False,  # optimizer + scheduler + RNG too, so a resumed run equals an uninterrupted one
        logging_steps=cfg.LOGGING_STEPS,
        logging_first_step=True,
        # Transformers' default filter replaces a nan/inf loss in the logged mean, and to find one it reads every
        # micro-batch's loss on the host, which waits for the GPU each step. Off: a nan loss shows in the log.
        logging_nan_inf_filter=False,
        report_to=[] if cfg.REPORT_TO == "none" else [cfg.REPORT_TO],
        run_name=cfg.RUN_NAME,
        ddp_find_unused_parameters=False,
        # DDP would broadcast the model's buffers from rank 0 before every forward; Llama's are the rotary
        # frequencies, the same on every rank.
        ddp_broadcast_buffers=False,
        dataloader_num_workers=0,
        # Copy each batch to the GPU from pinned memory (Transformers' default) without waiting for the copy:
        # a blocking copy waits for every kernel queued before it, leaving the GPU idle at each step's start.
        accelerator_config={"non_blocking": True},
        disable_tqdm=False,
        push_to_hub=False,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def base_weights(cfg: Settings, model: Any) -> str:
    if cfg.QUANTIZATION != "nf4":
        return "16-bit"
    if four_bit_layers(model):
        return "nf4, packed in 4 bits"
    return "nf4-rounded, held in 16-bit (DEQUANTIZE_BASE)"


def describe(cfg: Settings, trainer: Any, precision: str, why: str) -> dict:
    """The derived numbers printed at start: what will actually run."""
    world = world_size()
    n_seq = len(trainer.train_dataset)
    batch, accum = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    per_step = batch * accum * world
    trainable, total = trainer.model.get_nb_trainable_parameters()
    info = {
        "precision": precision,
        "precision_reason": why,
        "world_size": world,
        "sequences": n_seq,
        "sequences_per_step": per_step,
        "micro_batch": batch,  # the memory-lean path may split BATCH_SIZE (job/speedups/nf4_base.py)
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "trainable_params": trainable,
        "total_params": total,
        "base_weights": base_weights(cfg, trainer.model),
        "turn_tokens": turn_tokens.trained(trainer.model, trainer.processing_class),  # TRAIN_TURN_TOKENS's choice
        # LORA_TARGET_MODULES as PEFT resolved it on this base (auto, all-linear): the card names these
        "lora_target_modules": sorted(trainer.model.peft_config["default"].target_modules),
    }
    log.info(
        "training: %d %s of up to %d tokens, %d per optimizer step (batch %d x accum %d x %d GPU), "
        "precision %s (%s), %s trainable of %s parameters",
        n_seq,
        "packed rows" if cfg.PACKING else "conversations",
        cfg.MAX_SEQ_LENGTH,
        per_step,
        batch,
        accum,
        world,
        precision,
        why,
        f"{trainable:,}",
        f"{total:,}",
    )
    return info


def _save_adapter(trainer: Any, folder: Path) -> None:
    """The adapter and its tokenizer into `folder`, whole or not at all: written beside it, then swapped in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _failures_explained(tmp, trainer):
        trainer.model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


@contextlib.contextmanager
def _failures_explained(folder: Path, trainer: Any, cfg: Settings | None = None):
    """Within: an error that is not ours, not GPU memory and not classified by type (torch.save's RuntimeError,
    safetensors' SafetensorError: neither carries an errno) is a LocalFailure (exit 6) when `folder`'s disk
    cannot take a checkpoint now (errors.disk_failure); otherwise it stays what it was. With `cfg` (training),
    running out of GPU memory is an OutOfMemory (exit 3) that says what to lower."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if cfg is None:
            raise
        raise OutOfMemory(
            f"GPU out of memory at step {trainer.state.global_step} with BATCH_SIZE={cfg.BATCH_SIZE}, "
            f"MAX_SEQ_LENGTH={cfg.MAX_SEQ_LENGTH}, PACKING={cfg.PACKING}. Lower BATCH_SIZE (raise GRAD_ACCUM to "
            "keep the same tokens per step), lower MAX_SEQ_LENGTH, or set GRADIENT_CHECKPOINTING=true."
        ) from None
    except JobError:
        raise
    except Exception as e:
        if errors.classify(e, "train") is not None:
            raise  # typed (an OSError's errno, the Hub's errors): __main__ classifies it
        # What a checkpoint takes, rounded up: the trainable weights and Adam's two moments, 4 bytes each, plus
        # 64 MiB for the tokenizer saved beside them (Llama 3's tokenizer.json alone is 9 MB) and the small files.
        need = 3 * 4 * sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) + 64 * 2**20
        err = errors.disk_failure(folder, need, f"train: writing {folder}", e)
        if err is None:
            raise
        raise err from e
