"""Stage 3, train: QLoRA with TRL's SFTTrainer; checkpoints that survive SIGKILL and SIGTERM; the adapter.

Checkpoints: Transformers writes checkpoint-N/ file by file, so a kill can leave a partial
folder. Ours count only once `COMPLETE` (written last, fsynced) exists; we delete the
unmarked ones on resume and do retention ourselves after the marker is written, because the
Trainer's own rotation runs before a new checkpoint is marked and could leave none complete.
On SIGTERM (job/stop.py) the running step finishes, the Trainer saves that step's checkpoint through
the same path (so it is marked), and the stage raises Stopped: a preemption notice costs no steps.
Each checkpoint carries the fingerprint it was trained under (FINGERPRINT, written before the marker: the
settings, the data and the base model, job/provenance.py); a run resumes only from a checkpoint with its own
fingerprint, and moves the others aside (paths.stale_checkpoints), so changed settings or data train afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job import attention, errors, graphs, provenance, stop, turn_tokens
from job.config import Settings, with_overrides
from job.errors import JobError, OutOfMemory, Stopped
from job.files import atomic_write_text, read_jsonl
from job.model import (
    decoder_layers,
    dequantize_for_training,
    four_bit_layers,
    is_main_process,
    load_model,
    load_tokenizer,
    lora_config,
    model_code_restored,
    resolve_precision,
    torch_dtype,
    world_size,
)
from job.paths import RunPaths

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
# The CPU thread count a checkpoint was trained with (see pin_cpu_threads), written before the marker.
THREADS = "cpu_threads.json"
# The fingerprint the checkpoint was trained under (job/provenance.py), written before the marker.
FINGERPRINT = "fingerprint.json"
# What resuming reads: without any of these the Trainer would crash or silently restart the schedule.
REQUIRED = ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt")


# --- checkpoints ------------------------------------------------------------------------------
def _step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints with a completeness marker, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if (p / MARKER).is_file() and _step(p) >= 0]
    return sorted(found, key=_step, reverse=True)


def checkpoint_loads(path: Path) -> bool:
    """Cheap integrity check: every tensor file opens and the trainer state parses."""
    import torch
    from safetensors import safe_open

    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        log.warning("checkpoint %s lacks %s; trying an older one", path.name, ", ".join(missing))
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
        for f in [*path.glob("*.pt"), *path.glob("*.pth")]:  # optimizer, scheduler, scaler, RNG states
            torch.load(f, map_location="cpu", weights_only=False)
        return any(path.glob("adapter_model.safetensors"))
    except Exception as e:  # any failure means: do not resume from this one
        log.warning("checkpoint %s cannot be loaded (%s: %s); trying an older one", path.name, type(e).__name__, e)
        return False


def resume_point(ckpt_dir: Path, fingerprint: str | None = None, stale_dir: Path | None = None) -> Path | None:
    """Newest complete checkpoint that loads; partial folders are removed first. With `fingerprint`, only a
    checkpoint trained under that one counts: the others (other settings or data, or none recorded) are moved
    into `stale_dir`, never resumed and never deleted."""
    if not ckpt_dir.is_dir():
        return None
    if is_main_process():
        for p in ckpt_dir.glob("checkpoint-*"):
            if not (p / MARKER).is_file():
                log.info("removing incomplete checkpoint %s (the job was stopped while writing it)", p.name)
                shutil.rmtree(p, ignore_errors=True)
    candidates = complete_checkpoints(ckpt_dir)
    if fingerprint is not None:
        stale = [p for p in candidates if provenance.checkpoint_fingerprint(p) != fingerprint]
        candidates = [p for p in candidates if p not in stale]
        if stale and is_main_process():
            _move_aside(stale, fingerprint, stale_dir or ckpt_dir.with_name(ckpt_dir.name + "-stale"))
    for p in candidates:
        if checkpoint_loads(p):
            return p
        if is_main_process():
            # Training redoes this step and writes its checkpoint here again: unmark it first, so a kill
            # during that write cannot leave new files behind an old marker.
            (p / MARKER).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
    return None


def _move_aside(stale: list[Path], fingerprint: str, stale_dir: Path) -> None:
    """Move checkpoints of another fingerprint into stale_dir (a new folder beside checkpoints/)."""
    stale_dir.mkdir(parents=True, exist_ok=False)
    for p in stale:
        os.replace(p, stale_dir / p.name)
    names = ", ".join(p.name for p in stale)
    log.warning(
        "%s trained under other settings or data (fingerprint %s; this run's is %s): moved to %s, not resumed",
        names,
        ", ".join(sorted({(provenance.checkpoint_fingerprint(stale_dir / p.name) or "none")[:12] for p in stale})),
        fingerprint[:12],
        stale_dir.name,
    )


def _completeness_callback(keep: int, fingerprint: dict | None = None):
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        """Write the marker after the Trainer has written everything, then apply retention."""

        def on_step_end(self, args, state, control, **kwargs):
            if stop_agreed():  # SIGTERM (job/stop.py) on any rank: every rank saves this step, then stops
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its RNG state file
            if state.is_world_process_zero:
                import torch

                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                atomic_write_text(path / THREADS, json.dumps({"torch_threads": torch.get_num_threads()}) + "\n")
                if fingerprint is not None:  # what this checkpoint was trained under: settings, data, base model
                    atomic_write_text(path / FINGERPRINT, json.dumps(fingerprint, indent=1, default=str) + "\n")
                atomic_write_text(path / MARKER, f"step {state.global_step}\n")
                for old in complete_checkpoints(Path(args.output_dir))[keep:]:
                    # Unmark first: a kill during the delete then leaves a folder resume removes,
                    # never a "complete" one with files missing.
                    (old / MARKER).unlink(missing_ok=True)
                    shutil.rmtree(old, ignore_errors=True)
            return control

    return CheckpointMarker()


_control_group: Any = None  # torch.distributed's gloo group for the stop flag (stop_agreed), made once


def stop_agreed() -> bool:
    """Whether any rank has been asked to stop (SIGTERM, job/stop.py), agreed by every rank at the same optimizer
    step: a SIGTERM can reach one rank only (one node's notice, a kill of one process), and a rank that saved and
    stopped alone would leave the others waiting in the next step's gradient all-reduce.

    One all-reduce of a flag per optimizer step, on a gloo (CPU) group of its own: on the NCCL group the flag
    would be a GPU tensor whose read waits for the step's kernels, idling the GPU while the host queues the next
    step. A rank that learns of another's SIGTERM notes it as its own (stop.request), so it exits STOPPED too."""
    global _control_group
    import torch
    import torch.distributed as dist

    mine = stop.requested()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return mine
    if _control_group is None:  # every rank reaches its first step end: new_group is collective
        _control_group = dist.new_group(backend="gloo")
    flag = torch.tensor([int(mine)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control_group)
    if flag.item() and not mine:
        log.warning("another rank received SIGTERM: saving this step's checkpoint with it, then stopping")
        stop.request()
    return bool(flag.item())


def pin_cpu_threads(resume: Path | None) -> None:
    """Use the intra-op thread count the checkpoint was trained with.

    CPU kernels (MKL/oneDNN matmuls, ATen reductions) split their float sums by thread count, and
    PyTorch takes its default count from the process's CPU affinity or OMP_NUM_THREADS, which can
    differ between the first process and a resumed one (another machine after a preemption, a
    different cpuset). One resumed stretch at another count changes the last bits of the gradients
    (the 12-step test run at 1 thread instead of 2: 2.1e-7 in the final adapter), so the resumed run
    is no longer the uninterrupted one. Checkpoints from before this file existed keep the default.
    """
    import torch

    try:
        saved = int(json.loads((resume / THREADS).read_text())["torch_threads"]) if resume else 0
    except (OSError, ValueError, KeyError, TypeError):
        saved = 0
    if saved > 0 and saved != torch.get_num_threads():
        log.info(
            "using %d CPU threads as the checkpoint did (this process defaulted to %d), so the resumed run "
            "sums floats in the same order as the uninterrupted one",
            saved,
            torch.get_num_threads(),
        )
        torch.set_num_threads(saved)


# --- training ---------------------------------------------------------------------------------
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
    if not _cuda() or cfg.TORCH_COMPILE == "false":
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


def use_liger(cfg: Settings, compiled: bool) -> bool:
    import importlib.util

    # torch.compile cannot trace Liger's kernels, and Inductor fuses the same operations anyway. Liger
    # patches Transformers' model code for the whole process; run() puts it back after training
    # (model.model_code_restored).
    return cfg.LIGER_KERNEL and not compiled and _cuda() and importlib.util.find_spec("liger_kernel") is not None


def use_graphs(cfg: Settings, compiled: bool, attn: str | None = None) -> bool:
    """CUDA_GRAPHS where the step can be captured: packed rows through job/attention.py's varlen kernel (the
    graph passes conversation boundaries, no mask) on a GPU that has the flash kernel, no compile, no gradient
    checkpointing. `attn`: the attention the model was loaded with, when it is not ATTN_IMPLEMENTATION
    (job/attention.py attention_for)."""
    return (
        cfg.CUDA_GRAPHS
        and _cuda()
        and attention.flash_varlen()
        and cfg.PACKING
        and (attn or cfg.ATTN_IMPLEMENTATION) == attention.NAME
        and not compiled
        and not cfg.GRADIENT_CHECKPOINTING
    )


def _graphs_callback(fixed: Any, precision: str):
    """Captures the decoder layers when training begins (after the Trainer has applied Liger, whose kernels
    the graphs must hold) and gives them back when it ends. A capture that fails stops the job with the way
    out: after a failed capture CUDA's random-number state is unusable, so training cannot go on eager."""
    import time

    import torch
    from transformers import TrainerCallback

    class Graphs(TrainerCallback):
        release = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            t0 = time.perf_counter()
            try:
                self.release = graphs.capture_layers(
                    model,
                    fixed.tokens,
                    fixed.max_length,
                    fixed.slots,
                    torch_dtype(precision),
                    autocast=args.bf16 or args.fp16,
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

    return Graphs()


def compile_layers(model: Any) -> int:
    """Regional compilation (https://pytorch.org/tutorials/recipes/regional_compilation.html).

    A QLoRA step in eager mode is bound by Python launching thousands of small kernels through PEFT,
    bitsandbytes, Liger and Transformers' modules, not by the GPU's arithmetic. We compile each decoder
    layer in place: the layers share compiled code, so the cost is about one layer's compile (layer 0,
    whose input carries no gradient, gets a graph of its own), and Inductor fuses the norms, RoPE and SwiGLU.
    Accelerate's compile_regions would wrap the layers and rename their state-dict keys, which
    PEFT's checkpoints depend on; Module.compile() keeps them. dynamic=True: packed rows differ in
    length every step, and one graph serves them all.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def lean_micro_batches(cfg: Settings, model: Any) -> Settings:
    """The memory-lean path: where the base stays packed in 4 bits on a GPU (DEQUANTIZE_BASE, a card short of
    memory), each micro-batch is split in two, GRAD_ACCUM doubled. An optimizer step then takes the same
    sequences in the same order, and its loss is normalised by the tokens of all its micro-batches (TRL's
    num_items_in_batch), so training is the same; the activations kept for backward, most of the step's memory
    on a 3B model, halve. Smaller micro-batches cost some speed (make bench: job-nf4)."""
    if not (_cuda() and four_bit_layers(model) and cfg.BATCH_SIZE % 2 == 0):
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


def sft_config(cfg: Settings, paths: RunPaths, precision: str, compiled: bool = False, **overrides: Any) -> Any:
    """TRL's configuration for our settings (`compiled`: the decoder layers are compiled); `overrides` lets
    the benchmark set other recipes."""
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
        use_cpu=precision == "fp32" and not _cuda(),
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
        use_liger_kernel=use_liger(cfg, compiled),
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trainer_class() -> type:
    """TRL's SFTTrainer, with its training metrics read from the GPU once per log line instead of every
    micro-batch.

    TRL's compute_loss reads the entropy, the token accuracy and the token count back to the host after each
    micro-batch (`.item()`). Each read waits for every kernel queued so far, so the GPU idles while the host
    queues the next step. This subclass computes the same loss and the same metrics, keeps the metrics as GPU
    tensors, and hands them to TRL's log() in one read. Any other loss (evaluation, label smoothing, DFT, a
    mixture-of-experts aux loss, a custom loss, sequence parallelism) is TRL's own. It repeats TRL's code, so
    tests/test_equivalence.py trains with both and compares loss, logged metrics and weights: a TRL upgrade
    that changes either fails there.
    """
    import torch
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pending: list = []  # one [entropy, accuracy] GPU tensor per micro-batch since the last log
            self._pending_tokens: Any = 0  # a GPU tensor once counting starts

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            plain = (
                self.model.training
                and not return_outputs
                and self.compute_loss_func is None
                and self.label_smoother is None
                and self.args.loss_type == "nll"
                and not self.aux_loss_enabled
                and self.accelerator.parallelism_config is None
            )
            if not plain:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            out = model(**inputs, fused_lm_head=True)  # TRL's chunked LM head: log-probs without the logits
            count = out.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -out.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
            gather = self.accelerator.gather_for_metrics
            valid = gather(out.label_mask.sum()).sum().clamp(min=1)  # both sums are 0 where nothing is valid
            entropy = gather(out.entropy.detach().sum()).sum() / valid
            accuracy = gather(out.is_top1.sum()).sum() / valid
            self._pending.append(torch.stack([entropy, accuracy]))
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum()
            else:  # padding-free packing: one row of tokens
                # a fill kernel: torch.tensor(n, device=...) would copy n from the host and wait for the GPU
                tokens = gather(torch.full((), inputs["position_ids"].size(1), device=loss.device)).sum()
            self._pending_tokens = self._pending_tokens + tokens // self._tp_size
            return loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self._pending:
                metrics = self._metrics["train"]
                for entropy, accuracy in torch.stack(self._pending).tolist():  # the one read
                    metrics["entropy"].append(entropy)
                    metrics["mean_token_accuracy"].append(accuracy)
                self._total_train_tokens += int(self._pending_tokens)
                metrics["num_tokens"] = [self._total_train_tokens]
                self._pending, self._pending_tokens = [], 0
            super().log(logs, start_time)

    return Trainer


def build_trainer(
    cfg: Settings,
    paths: RunPaths,
    precision: str,
    lean: bool = True,
    *,
    fingerprint: dict | None = None,
    **overrides: Any,
) -> Any:
    """SFTTrainer for our settings. `lean`: the job's own economies, split micro-batches on the memory-lean
    path (lean_micro_batches) and training metrics read once per log line (trainer_class); the bench turns
    them off for the plain-TRL recipes it compares against. `fingerprint`: written into every checkpoint.
    `overrides`: SFTConfig fields."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTTrainer

    tokenizer = load_tokenizer(cfg)
    rows = read_jsonl(paths.train_tokens)
    model = load_model(cfg, precision)
    dequantize_for_training(cfg, model)  # DEQUANTIZE_BASE: same weights, no 4-bit kernels in the step
    packed_base = bool(four_bit_layers(model))  # read before PEFT wraps the layers
    if lean:
        cfg = lean_micro_batches(cfg, model)
    if cfg.GRADIENT_CHECKPOINTING:
        model.enable_input_require_grads()  # frozen embeddings: let the checkpointed blocks get gradients
    # We wrap with PEFT ourselves rather than passing peft_config to TRL, so the LoRA weights are
    # created in fp32 whatever the base dtype (see job/model.py on fp16).
    turn_ids = turn_tokens.choose(cfg, model, tokenizer, rows)  # TRAIN_TURN_TOKENS: a base that cannot stop
    set_seed(cfg.SEED)  # LoRA A matrices are drawn here: same seed, same initial adapter
    lora = lora_config(cfg, model, turn_tokens.peft_targets(model, turn_ids))
    model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    turn_tokens.output_weight_follows_adapter(model)
    compiled = use_compile(cfg, rows, packed_base)
    if compiled:
        log.info("compiling %d decoder layers (one compile, in the first step)", compile_layers(model))
    args = sft_config(cfg, paths, precision, compiled, **overrides)
    trainer = (trainer_class() if lean else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_completeness_callback(cfg.SAVE_TOTAL_LIMIT, fingerprint)],
    )
    if use_graphs(cfg, compiled, attn=model.config._attn_implementation):
        tokens = cfg.BATCH_SIZE * cfg.MAX_SEQ_LENGTH
        fixed = graphs.FixedShape(
            trainer.data_collator,
            tokens,
            cfg.MAX_SEQ_LENGTH,
            graphs.slots_for(tokens, cfg.MAX_SEQ_LENGTH),
            tokenizer.pad_token_id,
        )
        trainer.data_collator = fixed
        trainer.add_callback(_graphs_callback(fixed, precision))
    # TRL casts LoRA weights of a quantized model to bf16. We keep them in fp32: fp16's gradient
    # scaler cannot unscale bf16 gradients, and a resumed run loads the adapter back in fp32
    # (PEFT's load_adapter), so bf16 here would make a resumed run differ from an uninterrupted one.
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return trainer


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
    steps = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    batch, accum = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    per_step = batch * accum * world
    if steps is None:
        steps = math.ceil(n_seq / per_step) * math.ceil(cfg.EPOCHS)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    info = {
        "precision": precision,
        "precision_reason": why,
        "world_size": world,
        "sequences": n_seq,
        "sequences_per_step": per_step,
        "trainable_params": trainable,
        "total_params": total,
        "base_weights": base_weights(cfg, trainer.model),
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


@contextlib.contextmanager
def _disk_checked(folder: Path, trainer: Any):
    """Within: an error that is not ours, not GPU memory and not classified by type (torch.save's RuntimeError,
    safetensors' SafetensorError: neither carries an errno) is a LocalFailure (exit 6) when `folder`'s disk
    cannot take a checkpoint now (errors.disk_failure); otherwise it stays what it was."""
    import torch

    try:
        yield
    except (JobError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        if errors.classify(e, "train") is not None:
            raise  # typed (an OSError's errno, the Hub's errors): __main__ classifies it
        err = errors.disk_failure(folder, _checkpoint_bytes(trainer), f"train: writing {folder}", e)
        if err is None:
            raise
        raise err from e


def _checkpoint_bytes(trainer: Any) -> int:
    """About what one checkpoint takes on disk, rounded up: the trainable weights and Adam's two moments, 4 bytes
    each, plus 64 MiB for the tokenizer the Trainer saves beside them (Llama 3's tokenizer.json alone is 9 MB)
    and its small files (state, scheduler, RNG)."""
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return 3 * 4 * trainable + 64 * 2**20


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
    resume = resume_point(paths.checkpoints, digest, paths.stale_checkpoints(stamp))
    pin_cpu_threads(resume)  # before any computation: model load, quantization, every step
    trainer = build_trainer(cfg, paths, precision, fingerprint=fingerprint)
    info = describe(cfg, trainer, precision, why)
    if resume:
        log.info("resuming from %s", resume.name)
    elif digest:
        log.info("training from step 0 (fingerprint %s)", digest[:12])
    try:
        with stop.during_training(), model_code_restored(trainer.model), _disk_checked(paths.checkpoints, trainer):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory(
            f"GPU out of memory at step {trainer.state.global_step} with BATCH_SIZE={cfg.BATCH_SIZE}, "
            f"MAX_SEQ_LENGTH={cfg.MAX_SEQ_LENGTH}, PACKING={cfg.PACKING}. Lower BATCH_SIZE (raise GRAD_ACCUM to "
            "keep the same tokens per step), lower MAX_SEQ_LENGTH, or set GRADIENT_CHECKPOINTING=true."
        ) from None
    if stop.requested():
        raise Stopped(
            f"stopped by SIGTERM after saving checkpoint-{trainer.state.global_step}: run the same command again "
            "to resume from it"
        )

    if trainer.is_world_process_zero():
        tmp = paths.adapter.with_name(paths.adapter.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with _disk_checked(tmp, trainer):
            trainer.model.save_pretrained(tmp)
            trainer.processing_class.save_pretrained(tmp)
        shutil.rmtree(paths.adapter, ignore_errors=True)
        os.replace(tmp, paths.adapter)
        history = {
            # What trained this adapter, as the card and `python -m job provenance` show it.
            "provenance": {**(fingerprint or {}), "resumed_from": resume.name if resume else None},
            "train": info,
            "metrics": result.metrics,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if _cuda() else None,
            "log_history": trainer.state.log_history,
        }
        atomic_write_text(paths.train_log, json.dumps(history, indent=2))
    return [paths.adapter, paths.train_log]
