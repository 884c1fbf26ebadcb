"""The throughput bench's `axolotl` recipe (bench/throughput.py): Axolotl's fastest documented QLoRA path on the
conversations the job trains on, timed as every recipe is (bench/timing.py).

It runs in a process of its own with Axolotl's own package stack first on the path (`--axolotl-site`: Axolotl 0.19
pins Transformers 5.16.1, PEFT 0.20.0, TRL 1.9.0, datasets 4.8.4, which differ from the job's). Axolotl is built
through its Python API, as its CLI's `train` does it (axolotl.cli.config.load_cfg, axolotl.common.datasets
.load_datasets, axolotl.train.setup_model_and_trainer), from a config dict written here (`axolotl_config`): the
job's base in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute), LoRA with the job's r, alpha and target
modules and no dropout (its LoRA kernels' fast path), multipack sample packing, its Triton LoRA kernels, the Liger
plugin (RMSNorm, SwiGLU, RoPE, fused linear cross entropy), no gradient checkpointing, the job's learning rate,
schedule, optimizer and seed, and the loss on the assistant replies only, tokenized by Axolotl itself
(`chat_template` with the tokenizer's own template).

Attention: Axolotl packs varlen (one row per micro-batch, documents kept apart by position_ids) only with
flash-attn, xformers, sage or flex attention; flash-attn, xformers and sage are not installed on the bench's GPU
machine (torch 2.11), and the Hub's kernels cannot be fetched there. Its other packing path is `sdpa` with
`multipack_real_batches` (8 rows of up to 512 tokens, each packed), where 0.19 routes packed rows through torch's
own varlen flash kernel (torch.nn.attention.varlen.varlen_attn, torch >= 2.10, `sdpa_varlen`: cu_seqlens from
position_ids, no cross-document blocks computed, no mask tensor). That is the flash-attention-2 kernel that
`flash_attention_2` would call, shipped inside torch, so we choose it over flex attention (a Triton kernel
compiled by torch.compile over a block mask rebuilt every step, which is slower than flash attention's on
H100-class cards). The job's own default (ATTN_IMPLEMENTATION=sdpa_varlen, job/attention.py) is the same kernel.

On a machine without CUDA (the CPU check of this module) Liger, the Triton LoRA kernels and varlen attention cannot
run: they are switched off, with a log line, so that the wiring, the data path, the loss mask and the timing still
run for real; stock SDPA then isolates the packed documents with a block-diagonal mask.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bench.timing import timed_train
from job.files import read_jsonl, write_jsonl
from job.formats import conversation
from job.paths import RunPaths

log = logging.getLogger("bench.axolotl")

LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
# Rows per micro-batch, each packed with conversations up to MAX_SEQ_LENGTH tokens: the job recipe's 8 packed rows
# of 512 tokens (4,096 tokens per optimizer step, no accumulation).
MICRO_BATCH = 8
# Axolotl's patches that need CUDA (Triton kernels, torch's varlen flash kernel).
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
LIGER_FLAGS = ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_fused_linear_cross_entropy")


def axolotl_config(cfg, targets: list[str] | str, data_file: Path, out_dir: Path, max_steps: int, cuda: bool) -> dict:
    """Axolotl's config (the keys of its YAML files) for the job's settings `cfg`: `targets` are the LoRA target
    modules (job.model.lora_targets' answer: names, or "all-linear"); `data_file` the conversations as JSONL of
    {"messages": [...]}; `out_dir` its output folder (the prepared dataset goes inside); `max_steps` optimizer
    steps; `cuda` False switches off what cannot run without a GPU (the module docstring)."""
    config: dict[str, Any] = {
        "base_model": str(cfg.BASE_MODEL),
        # QLoRA: 4-bit NF4 base with double quantization; compute in bf16 (Axolotl passes torch_dtype).
        "adapter": "qlora",
        "load_in_4bit": True,
        "bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "bf16": cuda,  # fp32 on a CPU, as the job trains there
        "lora_r": cfg.LORA_R,
        "lora_alpha": cfg.LORA_ALPHA,
        "lora_dropout": 0.0,  # the LoRA kernels' fast path has no dropout
        # Each kernel fuses a group of projections and applies only where every one of them has an adapter:
        # q,k,v (qkv), o_proj (o), gate,up,down (mlp). With the default q_proj,v_proj none applies (Axolotl logs
        # "Cannot patch ..."); measure_axolotl reports the layers each one patched.
        **dict.fromkeys(LORA_KERNELS, cuda),
        "lora_embedding_kernel": False,  # the embeddings get no adapter
        "gradient_checkpointing": False,  # memory is plentiful at 8 x 512 tokens; the job's default is off too
        # Packing: multipack bins of up to sequence_len tokens, MICRO_BATCH of them per micro-batch, padded to
        # sequence_len (fixed shapes; padding is not counted as tokens, see _RealTokens).
        "sequence_len": cfg.MAX_SEQ_LENGTH,
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "excess_length_strategy": "truncate",  # a longer conversation is cut at MAX_SEQ_LENGTH, as the job cuts it
        "attn_implementation": "sdpa",
        "sdpa_varlen": cuda,  # torch's varlen flash kernel for packed rows (the module docstring says why)
        "micro_batch_size": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        # The job's conversations, tokenized by Axolotl with the tokenizer's own chat template; the loss on the
        # assistant turns and the end-of-turn token that closes each.
        "datasets": [
            {
                "path": str(data_file),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
                "train_on_eos": "turn",
            }
        ],
        "chat_template": "tokenizer_default",
        "chat_template_kwargs": {"date_string": cfg.TEMPLATE_DATE},  # Llama 3.x writes today's date otherwise
        "dataset_prepared_path": str(out_dir / "prepared"),
        "val_set_size": 0,
        "output_dir": str(out_dir),
        # The job's optimizer and schedule (job/train.py sft_config).
        "learning_rate": cfg.LEARNING_RATE,
        "lr_scheduler": cfg.LR_SCHEDULER,
        "warmup_ratio": cfg.WARMUP_RATIO,
        "optimizer": cfg.OPTIMIZER,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": cfg.SEED,
        "max_steps": max_steps,
        "logging_steps": 10,
        "save_strategy": "no",
        # No trackers (Axolotl reports to none of them unless one is switched on).
        "use_wandb": False,
        "use_mlflow": False,
        "use_tensorboard": False,
    }
    if targets == "all-linear":
        config["lora_target_linear"] = True
    else:
        config["lora_target_modules"] = list(targets)
    if cuda:
        config["plugins"] = [LIGER_PLUGIN]
        config |= dict.fromkeys(LIGER_FLAGS, True)
    return config


def measure_axolotl(cfg, args) -> dict:
    """Axolotl's fastest QLoRA path (axolotl_config) on the job's training conversations, timed by
    bench/timing.py's timed_train; {"skipped": why} when Axolotl does not import in this process."""
    # No usage statistics, no Hub: the base is a local folder and the data a local file.
    for name in ("AXOLOTL_DO_NOT_TRACK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    try:
        import axolotl
        from axolotl.cli.config import load_cfg
        from axolotl.common.datasets import load_datasets
        from axolotl.train import setup_model_and_trainer
        from axolotl.utils.dict import DictDefault
    except ImportError as e:
        return {"skipped": f"Axolotl does not import here ({type(e).__name__}: {e})"}
    import torch

    from bench.equivalence import liger_modules

    cuda = torch.cuda.is_available()
    if not cuda:
        log.warning("no CUDA: Axolotl's LoRA kernels, Liger and varlen attention are off (a check of the wiring)")
    out_dir = cfg.run_dir / "axolotl"
    data_file = out_dir / "train.jsonl"
    # The rows the job's sample stage wrote, as the model sees them (SYSTEM_PROMPT first, job/formats.py).
    write_jsonl(data_file, [{"messages": conversation(cfg, r)} for r in read_jsonl(RunPaths(cfg.run_dir).train_rows)])
    targets = _lora_targets(cfg)
    config = axolotl_config(cfg, targets, data_file, out_dir, args.warmup_cap + args.steps, cuda)
    acfg = load_cfg(DictDefault(config))  # validated and normalized as the CLI does it
    trainer, model, *_ = setup_model_and_trainer(acfg, load_datasets(cfg=acfg))
    trainer.data_collator = collator = _RealTokens(trainer.data_collator)
    try:
        out = timed_train(trainer, 1, args)
    finally:
        collator.close()
    from axolotl.monkeypatch.attention import sdpa_varlen

    return {
        **out,
        "settings": {
            "axolotl": axolotl.__version__,
            "attn_implementation": acfg.attn_implementation,
            "sdpa_varlen": sdpa_varlen._PATCH_APPLIED,  # torch's varlen kernel registered for packed rows
            "sample_packing": bool(acfg.sample_packing),
            "micro_batch_size": acfg.micro_batch_size,
            "sequence_len": acfg.sequence_len,
            "lora_r": acfg.lora_r,
            "lora_alpha": acfg.lora_alpha,
            "lora_dropout": acfg.lora_dropout,
            "lora_targets": targets,
            "lora_kernels": _lora_kernel_layers(model),  # layers each fused LoRA kernel patched
            "liger_modules": liger_modules(model),
            "optimizer": trainer.args.optim,
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        },
    }


def _lora_targets(cfg) -> list[str] | str:
    """The job's LoRA targets for this base (job.model.lora_targets), found on the architecture built on the meta
    device (no weights read, no memory used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from job.model import lora_targets

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.BASE_MODEL))
    return lora_targets(cfg, skeleton)


def _lora_kernel_layers(model) -> dict[str, int]:
    """How many layers each of Axolotl's fused LoRA kernels replaced the stock forward in."""
    counts = {"qkv": 0, "o": 0, "mlp": 0}
    for m in model.modules():
        qkv, o, forward = (getattr(getattr(m, a, None), "__name__", "") for a in ("apply_qkv", "apply_o", "forward"))
        counts["qkv"] += qkv.startswith("apply_lora_qk")  # apply_lora_qkv, or apply_lora_qk where v_proj is None
        counts["o"] += o == "apply_lora_o"
        counts["mlp"] += forward.startswith("apply_lora_mlp")  # apply_lora_mlp_swiglu, _geglu
    return counts


class _RealTokens:
    """Axolotl's packed micro-batches for timed_train's token count: with `sdpa` packing they hold no attention
    mask (each row is padded to sequence_len, and the padding would count as tokens), and with varlen backends
    the mask numbers the documents (1, 2, 3, ...), so its sum is not a count either. timed_train counts the batch
    that `inner` returns: here Axolotl's, with a 0/1 mask of its real tokens; the outer call then puts Axolotl's
    own mask back (or none), so the model gets Axolotl's batch unchanged.

    Axolotl collates in a data-loader worker process (its default: one per GPU, 256 micro-batches ahead), so the
    counter that timed_train puts in as `inner` gets a list shared with that worker (a multiprocessing manager's:
    the worker's appends reach the training process, in order, as there is one worker)."""

    def __init__(self, collator):
        self._inner = _WithRealMask(collator)
        self._manager = None  # started when timed_train's counter comes in

    @property
    def inner(self):
        return self._inner

    @inner.setter
    def inner(self, counter):
        if isinstance(getattr(counter, "tokens", None), list):
            import multiprocessing

            self._manager = self._manager or multiprocessing.Manager()
            counter.tokens = self._manager.list(counter.tokens)
        self._inner = counter

    def close(self) -> None:
        """Stop the manager's process (left running, it outlives the recipe in a test process)."""
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None

    def __getstate__(self):  # a worker gets the counter (its list a proxy), not the manager
        return {**self.__dict__, "_manager": None}

    def __call__(self, features):
        batch = self.inner(features)
        original = batch.pop(_WithRealMask.ORIGINAL, None)
        if original is None:
            del batch["attention_mask"]
        else:
            batch["attention_mask"] = original
        return batch


class _WithRealMask:
    ORIGINAL = "_axolotl_attention_mask"

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        import torch

        batch = self.collator(features)
        if "attention_mask" in batch:
            batch[self.ORIGINAL] = batch["attention_mask"]
        # A micro-batch is a list of rows, each a list of conversations (multipack's bins); one bin on its own
        # is a single row. Padding goes after the real tokens of each row (or before, on a left-padding tokenizer).
        rows = features if isinstance(features[0], list) else [features]
        real = torch.tensor([sum(len(f["input_ids"]) for f in row) for row in rows])
        width = batch["input_ids"].shape[1]
        positions = torch.arange(width)
        if getattr(self.collator.tokenizer, "padding_side", "right") == "left":
            positions = positions.flip(0)
        batch["attention_mask"] = (positions[None, :] < real[:, None]).long()
        return batch
