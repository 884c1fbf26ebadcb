"""Load the base model and tokenizer the same way for training, evaluation and chat.

Precision is chosen from the hardware. Why fp16 needs care: Transformers 5 loads a Llama
checkpoint in its config dtype (bf16) by default, PEFT then creates bf16 LoRA weights, and
fp16 mixed precision's gradient scaler cannot unscale bf16 gradients
(`_amp_foreach_non_finite_check_and_unscale_cuda not implemented for 'BFloat16'`). We load the
base explicitly in the compute dtype and keep the trainable LoRA weights in fp32 (PEFT's
`autocast_adapter_dtype`), which is what the scaler expects.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from job import attention, formats, gguf_base
from job.config import ALL_LINEAR, AUTO_TARGETS, CHAT_TEMPLATE_NAMES, Settings
from job.errors import ConfigError, classify

log = logging.getLogger(__name__)
# PEFT 0.21 reads Transformers' deprecated `is_gradient_checkpointing` alias whenever it wraps a model; our own
# code uses the current names (activation_checkpointing). Silence only that message, so every other
# deprecation still shows.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# PEFT looks for config.json at the adapter's base_model_name_or_path at every save, to tell whether the
# vocabulary was resized; for a GGUF base that is the .gguf file (what the adapter records), offline a Hub id
# cannot be asked, and this job never resizes the vocabulary: the warning that it found none says nothing.
warnings.filterwarnings("ignore", message="Could not find a config file in ", category=UserWarning)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes training together (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def decoder_layers(model: Any) -> list:
    """The model's decoder layers (LlamaDecoderLayer ...): the blocks Transformers names in _no_split_modules."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in blocks]


def resolve_precision(cfg: Settings) -> tuple[str, str]:
    """Return (precision, reason): one of bf16, fp16, fp32."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    name = torch.cuda.get_device_name(local_rank()) if cuda else "CPU"
    if cfg.PRECISION == "auto":
        if bf16_ok:
            return "bf16", f"{name} supports bf16"
        if cuda:
            return "fp16", f"{name} has no bf16; fp16 with loss scaling"
        return "fp32", "no CUDA GPU: CPU runs in fp32"
    if cfg.PRECISION in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"PRECISION={cfg.PRECISION!r} needs a CUDA GPU; none was found. Use PRECISION=auto.")
    if cfg.PRECISION == "bf16" and not bf16_ok:
        raise ConfigError(f"PRECISION='bf16': {name} has no bf16 support. Use PRECISION=fp16 or auto.")
    return cfg.PRECISION, "set by PRECISION"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def check_one_process_per_gpu() -> None:
    """Training runs one process per GPU. With several GPUs visible to a single process, Transformers'
    Trainer would wrap the model in DataParallel, which TRL's SFTTrainer refuses once the model has loaded:
    say so before anything loads."""
    import torch

    visible = torch.cuda.device_count()
    if visible > 1 and world_size() == 1:
        raise ConfigError(
            f"{visible} GPUs are visible to this one process. Train on all of them with "
            f"`torchrun --nproc_per_node={visible} -m job` (DDP: sky/train-multinode.yaml launches it so), "
            "or on one with CUDA_VISIBLE_DEVICES=0."
        )


def check_quantization(cfg: Settings) -> None:
    """Fail before any model is loaded if 4-bit was asked for and bitsandbytes cannot provide it."""
    if cfg.QUANTIZATION != "nf4":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a missing native library (OSError/RuntimeError)
        raise ConfigError(
            f"QUANTIZATION='nf4' needs bitsandbytes, which failed to load here ({type(e).__name__}: {e}). "
            "Install bitsandbytes>=0.46 or set QUANTIZATION=none."
        ) from None


def _hub_call(what: str, fn, *args, **kwargs):
    """Run a from_pretrained call; Hub, network and disk failures become errors that say what to do
    (classified by exception type: job/errors.py). Anything else names the setting as a bad input."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = classify(e, what)
        if err is not None:
            raise err from None
        if isinstance(e, (OSError, ValueError)):
            raise ConfigError(f"{what}: could not be loaded: {e}") from None
        raise


def _revision(source: str) -> dict[str, str]:
    """`revision=` for loading BASE_MODEL `source`: the commit the run pinned it to (job/provenance.py), so every
    load of a run, resumed on another machine too, reads the same files; nothing for a local folder."""
    from job.provenance import pinned

    revision = pinned("BASE_MODEL", source)
    return {"revision": revision} if revision else {}


def base_source(cfg: Settings, precision: str | None = None) -> str:
    """What `from_pretrained` loads for BASE_MODEL: the Hub id or folder itself, or, for a GGUF file, the folder of
    its dequantized weights and tokenizer (job/gguf_base.py; converted on first use, in `precision`'s dtype)."""
    if not gguf_base.is_gguf(cfg):
        return cfg.BASE_MODEL
    return str(gguf_base.prepare(cfg, torch_dtype(precision or resolve_precision(cfg)[0])))


CHAT_TEMPLATES = Path(__file__).parent / "templates" / "chat"  # CHAT_TEMPLATE's named templates, <name>.jinja
# A conversation that every chat template renders: the turn that follows the reply shows how a turn ends.
_PROBE = [{"role": "user", "content": "Is it serious?"}]
_PROBE_REPLY = "Probably not."


def chat_template_text(cfg: Settings) -> str | None:
    """The template CHAT_TEMPLATE names (a shipped one by name, or a Jinja file), or None to keep the model's own."""
    name = cfg.CHAT_TEMPLATE.strip()
    if not name:
        return None
    path = CHAT_TEMPLATES / f"{name}.jinja" if name in CHAT_TEMPLATE_NAMES else Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"CHAT_TEMPLATE={name!r}: cannot read {path} ({e}).") from None


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end an assistant turn, for generation to stop at: eos, and the token the chat template
    writes right after a reply (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, ChatML's <|im_end|>) when that is a
    token of its own (an added or special token: plain text after a reply could also be part of the reply)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = _turn_end(tokenizer)
    return ids + [end] if end is not None and end not in ids else ids


def _turn_end(tokenizer) -> int | None:
    """The first token after the probe reply in the rendered conversation, if it is an added token; else None."""
    prompt = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(
        _PROBE + [{"role": "assistant", "content": _PROBE_REPLY}], tokenize=True, return_dict=True
    )
    tail = list(full["input_ids"])[len(prompt["input_ids"]) :]
    for k in range(1, len(tail)):  # the reply is the shortest start of the tail that reads as it
        if tokenizer.decode(tail[:k]).strip() == _PROBE_REPLY:
            nxt = tail[k]
            return nxt if nxt in tokenizer.added_tokens_decoder or nxt == tokenizer.eos_token_id else None
    return None


def load_tokenizer(cfg: Settings, source: str | None = None):
    """The tokenizer of BASE_MODEL (or of `source`, e.g. a trained adapter's folder), with CHAT_TEMPLATE applied."""
    from transformers import AutoTokenizer

    source = source or base_source(cfg)
    what = gguf_base.describe(cfg) if source != cfg.BASE_MODEL and gguf_base.is_gguf(cfg) else f"BASE_MODEL={source!r}"
    tok = _hub_call(what, AutoTokenizer.from_pretrained, source, token=cfg.HF_TOKEN or None, **_revision(source))
    template = chat_template_text(cfg)
    if template is not None:
        tok.chat_template = template
        _check_template(cfg, tok)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"{what} has no chat template, so conversations cannot be formatted the way the model expects. "
            "Use an instruct/chat model (e.g. meta-llama/Llama-3.2-3B-Instruct), or set CHAT_TEMPLATE to the "
            "model family's turn format (gemma, llama3, chatml) or to a Jinja file."
        )
    if tok.pad_token is None:
        # Llama 3 reserves this token for padding; falling back to EOS is safe because padded
        # positions are masked out of both attention and loss.
        pad = "<|finetune_right_pad_id|>"
        tok.pad_token = pad if pad in tok.get_vocab() else tok.eos_token
    return tok


def _check_template(cfg: Settings, tok) -> None:
    """CHAT_TEMPLATE renders a conversation, and ends the reply with a token of the model's own vocabulary (which
    generation can stop at): ChatML's <|im_end|> on a Gemma vocabulary would be cut into pieces of text."""
    try:
        end = _turn_end(tok)
    except Exception as e:  # jinja2's TemplateError and what a template raises itself (raise_exception)
        raise ConfigError(f"CHAT_TEMPLATE={cfg.CHAT_TEMPLATE!r}: the template does not render ({e}).") from None
    if end is None:
        raise ConfigError(
            f"CHAT_TEMPLATE={cfg.CHAT_TEMPLATE!r}: the template ends an assistant turn with text that is not one "
            f"token of the vocabulary of {gguf_base.describe(cfg)}, so generation could not stop there. Use the "
            "template of the model's family (gemma for Gemma, llama3 for Llama 3, chatml for Qwen)."
        )


def build_messages(cfg: Settings, patient: str, description: str = "", reply: str | None = None) -> list[dict]:
    """One message (and its reply) as the model sees it, in training, evaluation and chat alike (job/formats.py)."""
    row = formats.single_turn(patient, reply or "", description)
    return formats.conversation(cfg, row)[: None if reply is not None else -1]


def load_model(cfg: Settings, precision: str, quantization: str | None = None) -> Any:
    """The frozen base model on this process's device, 4-bit NF4 when QUANTIZATION=nf4."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    attention.register()  # ATTN_IMPLEMENTATION="sdpa_varlen"
    quantization = quantization or cfg.QUANTIZATION
    dtype = torch_dtype(precision)
    source = base_source(cfg, precision)
    hub = {"token": cfg.HF_TOKEN or None, **_revision(cfg.BASE_MODEL)}
    # Chosen from config.json before the weights load: Transformers refuses sdpa for some models (Gemma 2) at load
    config = _hub_call(f"BASE_MODEL={cfg.BASE_MODEL!r}", AutoConfig.from_pretrained, source, **hub)
    implementation, why = attention.attention_for(config, cfg.ATTN_IMPLEMENTATION)
    if why:
        log.info("ATTN_IMPLEMENTATION: %s", why)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": implementation}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": local_rank()}  # under DDP each rank holds a whole copy
    if quantization == "nf4":
        check_quantization(cfg)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # quantizes the scales too: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=dtype,
        )
    model = _hub_call(
        f"BASE_MODEL={cfg.BASE_MODEL!r}", AutoModelForCausalLM.from_pretrained, source, config=config, **hub, **kwargs
    )  # the config read above, not read again
    if gguf_base.is_gguf(cfg):  # what PEFT records as the adapter's base: the GGUF, not this machine's cache
        model.name_or_path = gguf_base.hub_repo(cfg) or cfg.BASE_MODEL
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextmanager
def model_code_restored(model: Any):
    """Within this block a library may patch the modeling module of `model`; leaving it, every module-level
    name and class method there is Transformers' own again. Yields nothing; logs how many names it put back.

    Why: with LIGER_KERNEL the Trainer's train() applies Liger to the model it trains, through
    apply_liger_kernel_to_llama(model=...). That binds Liger's RMSNorm and SwiGLU forwards to the model's
    own modules (what training needs), and also replaces the modeling module's RMSNorm and MLP classes and
    its rotary embedding for the whole process, which would reach every model built later in it:
    evaluation's and the benchmark's (Liger's kernels save training memory, bench/throughput.py, and slow
    decoding down). The train stage wraps train() in this block, so no later stage sees the patch.
    (Training in a child process would avoid the patch too, at the cost of re-importing the stack, ~10 s
    per run, and of a second process group under torchrun.) tests/test_liger.py patches the way Liger
    does; the bench's checks count Liger's modules in the trained and in the evaluated model.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(inner).__module__]  # e.g. transformers.models.llama.modeling_llama
    saved: dict[tuple[Any, str], Any] = {(module, k): v for k, v in vars(module).items()}
    for cls in list(vars(module).values()):
        if isinstance(cls, type) and cls.__module__ == module.__name__:
            saved |= {(cls, k): v for k, v in vars(cls).items() if callable(v)}
    try:
        yield
    finally:
        restored = 0
        for (owner, key), value in saved.items():
            if vars(owner).get(key) is not value:
                setattr(owner, key, value)
                restored += 1
        if restored:
            log.info("put back %d names of %s that training patched (Liger)", restored, module.__name__)


def four_bit_layers(model: Any) -> list:
    """bitsandbytes' 4-bit linear layers in `model` (none once dequantized)."""
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit"]


# LORA_TARGET_MODULES=auto, first match: the seed recipe's q_proj,v_proj, or the fused q/k/v projection (Phi-3)
AUTO_CHOICES = (["q_proj", "v_proj"], ["qkv_proj"])


def lora_targets(cfg: Settings, model: Any) -> list[str] | str:
    """The modules of `model` that get adapters: the LORA_TARGET_MODULES names, auto's choice (the first of
    AUTO_CHOICES that `model` has all of), or "all-linear". Refused, naming the base's linear modules, when it
    lacks one."""
    wanted = cfg.target_modules
    if wanted == ALL_LINEAR:  # PEFT finds them; every causal LM has some
        return wanted
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if wanted == AUTO_TARGETS:
        chosen = next((names for names in AUTO_CHOICES if set(names) <= present), None)
        missing = None if chosen else "neither " + " nor ".join(",".join(names) for names in AUTO_CHOICES) + " is"
    else:
        chosen = wanted
        absent = [m for m in wanted if m not in present]
        missing = f"{', '.join(absent)} not" if absent else None
    if missing:
        kinds = ("Linear", "Conv1D")  # torch's and bitsandbytes' Linear*, GPT-2's Conv1D: PEFT adapts each
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith(kinds)})
        raise ConfigError(
            f"LORA_TARGET_MODULES={cfg.LORA_TARGET_MODULES!r}: {missing} found in BASE_MODEL. Its linear modules "
            f"are: {', '.join(linear)}. Name the ones to adapt, or set LORA_TARGET_MODULES=all-linear."
        )
    return chosen


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def check_base_model(cfg: Settings, lora: bool) -> None:
    """Before any weights load: BASE_MODEL exists, has a chat template (its own or CHAT_TEMPLATE), and (when
    training) has the LORA_TARGET_MODULES. The architecture is built from config.json on the meta device: no
    memory used. A GGUF file is converted here, once (job/gguf_base.py), after the checks its header allows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(cfg.BASE_MODEL).expanduser()
    if gguf_base.is_gguf(cfg):
        gguf_base.check(cfg)  # the file's header first: seconds, where converting it takes minutes
        source = base_source(cfg)
    elif path.exists() and not (path / "config.json").is_file():
        raise ConfigError(
            f"BASE_MODEL={cfg.BASE_MODEL!r}: {path} has no config.json. Give a folder written by "
            "save_pretrained, or a Hub id such as meta-llama/Llama-3.2-3B-Instruct."
        )
    elif not path.exists() and (cfg.BASE_MODEL.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(cfg.BASE_MODEL)):
        raise ConfigError(
            f"BASE_MODEL={cfg.BASE_MODEL!r}: no such folder, and not a Hub id (owner/name). Fix the path, "
            "or use a Hub id such as meta-llama/Llama-3.2-3B-Instruct."
        )
    else:
        source = cfg.BASE_MODEL
    load_tokenizer(cfg)  # raises when there is no chat template
    if lora:
        config = _hub_call(
            f"BASE_MODEL={cfg.BASE_MODEL!r}",
            AutoConfig.from_pretrained,
            source,
            token=cfg.HF_TOKEN or None,
            **_revision(source),
        )
        with torch.device("meta"):
            lora_targets(cfg, AutoModelForCausalLM.from_config(config))


def lora_config(cfg: Settings, model: Any, trainable_tokens: dict[str, list[int]] | None = None):
    """`trainable_tokens`: embedding rows that train with the adapter (job/turn_tokens.py)."""
    from peft import LoraConfig

    return LoraConfig(
        trainable_token_indices=trainable_tokens,
        r=cfg.LORA_R,
        lora_alpha=cfg.LORA_ALPHA,
        lora_dropout=cfg.LORA_DROPOUT,
        target_modules=lora_targets(cfg, model),
        bias="none",
        task_type="CAUSAL_LM",
    )
