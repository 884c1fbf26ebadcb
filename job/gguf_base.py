"""A base model from a GGUF file: BASE_MODEL=path/to/model.gguf, or BASE_MODEL=<Hub repo or folder> + GGUF_FILE.

The file is loaded through Transformers' own GGUF support, dequantized (`GgufConfig(dequantize=True)`), and
written once as an ordinary model folder (safetensors, config, tokenizer); every stage then loads that folder
through the same `from_pretrained` path as any other base, NF4 quantization included (job/model.py). A GGUF's
packed blocks cannot be quantized to NF4 by bitsandbytes, nor saved by Transformers as they are: 16-bit (or
fp32 on CPU) weights are the common ground.

Where the folder lives: `$HF_HOME/hippocratically/gguf/<sha256 of the file>/transformers-<version>/<dtype>/`,
not the run directory. Converting takes minutes for a 262k-token vocabulary on a few CPU cores (the tokenizer's
merges are rebuilt from the vocabulary, every tensor is dequantized), so train, evaluate, benchmark, push and
chat must not each redo it; the Hugging Face cache is the machine's local, writable store that the container
mounts (`/cache`) and keeps across runs and run names, where the run directory may be a bucket mount (slow,
billed, and 2-4 bytes per parameter per run). The key is the file's bytes, the Transformers version that
converted them (its GGUF conversion changes between versions) and the dtype the job computes in (the
dequantized values are exact in fp32; a bf16 folder holds what a bf16 load of the file holds). Processes on
one machine (DDP ranks) take a file lock: one converts, the others wait for it and reuse its folder.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from job.config import Settings
from job.errors import ConfigError, classify

log = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"  # inside a prepared folder: the file it came from and its general.* metadata
_HF_REPO_URL = re.compile(r"https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")


def is_gguf(cfg: Settings) -> bool:
    return bool(cfg.GGUF_FILE.strip()) or cfg.BASE_MODEL.strip().lower().endswith(".gguf")


def describe(cfg: Settings) -> str:
    """The setting(s) that name the file, for messages."""
    if cfg.GGUF_FILE.strip():
        return f"BASE_MODEL={cfg.BASE_MODEL!r} with GGUF_FILE={cfg.GGUF_FILE!r}"
    return f"BASE_MODEL={cfg.BASE_MODEL!r}"


def hub_repo(cfg: Settings) -> str | None:
    """The Hub repo the GGUF comes from, when BASE_MODEL is one (not a local folder)."""
    if cfg.GGUF_FILE.strip() and not Path(cfg.BASE_MODEL).expanduser().exists():
        return cfg.BASE_MODEL.strip()
    return None


def locate(cfg: Settings) -> Path:
    """The .gguf file on this machine; a Hub one is downloaded into the Hugging Face cache first."""
    name = cfg.GGUF_FILE.strip()
    base = Path(cfg.BASE_MODEL.strip()).expanduser()
    if not name:
        if not base.is_file():
            raise ConfigError(
                f"BASE_MODEL={cfg.BASE_MODEL!r}: no such .gguf file. Fix the path, or name a Hub repo in BASE_MODEL "
                "and the file inside it in GGUF_FILE."
            )
        return base
    if base.is_dir():
        path = base / name
        if not path.is_file():
            found = sorted(p.name for p in base.glob("*.gguf"))
            raise ConfigError(
                f"GGUF_FILE={name!r}: not in the folder BASE_MODEL={cfg.BASE_MODEL!r} "
                f"(its .gguf files: {', '.join(found) or 'none'})."
            )
        return path
    if base.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.BASE_MODEL.strip()):
        raise ConfigError(
            f"BASE_MODEL={cfg.BASE_MODEL!r} with GGUF_FILE={name!r}: BASE_MODEL must be the Hub repo (owner/name) "
            "or the folder that holds GGUF_FILE."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(cfg.BASE_MODEL.strip(), name, token=cfg.HF_TOKEN or None))
    except EntryNotFoundError:
        raise ConfigError(f"GGUF_FILE={name!r}: the Hub repo {cfg.BASE_MODEL!r} has no such file.") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"BASE_MODEL={cfg.BASE_MODEL!r}: no such Hub repo, or HF_TOKEN has no access to it."
        ) from None
    except Exception as e:
        err = classify(e, describe(cfg))  # network, Hub 5xx, disk: job/errors.py
        if err is None:
            raise
        raise err from None


# --- the file's metadata -----------------------------------------------------------------------------------
# GGUF's metadata value types (the spec's gguf_metadata_value_type) and their struct formats; 8 is a string,
# 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: Path) -> dict[str, Any]:
    """The file's metadata keys: numbers, booleans and strings as they are, short string arrays (64 entries at
    most) as lists, every other array as its length. Raises
    ValueError for a file that is not GGUF or is damaged.

    Our own reader of the header rather than gguf's GGUFReader or Transformers' reader: both turn every array
    into Python objects, and a Gemma file's vocabulary is three arrays of 262,144 entries (tens of seconds on a
    busy 2-core machine); this one steps over them.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise ValueError("not a GGUF file (it does not start with the bytes 'GGUF')")
        version, _tensors, count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; Transformers reads versions 2 and 3")
        pos, out = 24, {}

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", blob, at)
            return blob[at + 8 : at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

        def value(kind: int, at: int, keep: bool) -> tuple[Any, int]:
            if kind in _SCALARS:
                return struct.unpack_from(_SCALARS[kind], blob, at)[0], at + struct.calcsize(_SCALARS[kind])
            if kind == 8:
                return string(at) if keep else (None, at + 8 + struct.unpack_from("<Q", blob, at)[0])
            if kind == 9:
                inner, n = struct.unpack_from("<IQ", blob, at)
                at += 12
                if inner in _SCALARS:
                    return n, at + n * struct.calcsize(_SCALARS[inner])
                short = keep and inner == 8 and n <= 64  # general.tags, general.languages: kept as lists
                items = []
                for _ in range(n):  # strings or nested arrays: each carries its own length
                    item, at = value(inner, at, keep=short)
                    items.append(item)
                return (items if short else n), at
            raise ValueError(f"damaged GGUF metadata (value type {kind})")

        try:
            for _ in range(count):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", blob, pos)
                out[key], pos = value(kind, pos + 4, keep=True)
        except struct.error:
            raise ValueError("the GGUF file is cut short or damaged (its metadata ends early)") from None
    return out


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's content hash, once per process for a given size and modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def source_model(metadata: dict[str, Any]) -> str | None:
    """The Hub id of the model this GGUF was converted from, when its metadata gives a Hugging Face URL for it."""
    for key in ("general.source.repo_url", "general.source.url", "general.source.huggingface.repository"):
        value = metadata.get(key)
        if isinstance(value, str):
            match = _HF_REPO_URL.match(value.strip())
            if match:
                return match.group(1)
            if key.endswith("repository") and re.fullmatch(r"[\w.-]+/[\w.-]+", value.strip()):
                return value.strip()
    return None


def check(cfg: Settings) -> Path:
    """What can be told from the file's header, before the minutes of conversion: it is there, Transformers can
    load its architecture, and a chat template comes with it or from CHAT_TEMPLATE. Returns the file's path."""
    path = locate(cfg)
    try:
        metadata = read_metadata(path)
    except (ValueError, OSError) as e:
        raise ConfigError(
            f"{describe(cfg)}: {e}. Give a .gguf file written by llama.cpp or the gguf package."
        ) from None
    arch = str(metadata.get("general.architecture"))
    loadable = _loadable_architectures()
    # The loader's own renames of llama.cpp's names (transformers/modeling_gguf_pytorch_utils.py): qwen2moe is
    # its qwen2_moe, gpt-oss its gpt_oss, t5encoder its t5; a name it cannot map still fails in _convert.
    names = {arch, arch.replace("-", "_"), re.sub(r"(?<=\w)moe$", "_moe", arch), arch.replace("encoder", "")}
    if not names & loadable:
        raise ConfigError(
            f"{describe(cfg)}: a GGUF of architecture {arch!r}, which Transformers cannot load from GGUF "
            f"(it loads: {', '.join(sorted(loadable))}). Use a GGUF of one of those, or the model's safetensors "
            "repo."
        )
    if not metadata.get("tokenizer.chat_template") and not cfg.CHAT_TEMPLATE.strip():
        raise ConfigError(
            f"{describe(cfg)}: the GGUF file carries no chat template, so conversations cannot be formatted. "
            "Set CHAT_TEMPLATE to the model family's turn format (gemma, llama3, chatml) or to a Jinja file."
        )
    return path


def _loadable_architectures() -> set[str]:
    """`general.architecture` values Transformers' GGUF loader knows: its legacy table and its newer one."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # its table's non-architecture keys
    try:  # Transformers 5.2x: architectures converted by integrations/gguf (qwen35, lfm2 ...)
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


# --- the dequantized folder ----------------------------------------------------------------------------------
def cache_root() -> Path:
    """Read at each call, so HF_HOME set after import (the tests, the container) is honoured."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME") or constants.HF_HOME
    return Path(home).expanduser() / "hippocratically" / "gguf"


def prepare(cfg: Settings, dtype) -> Path:
    """The folder holding the GGUF's dequantized weights in `dtype`, its config and tokenizer; converted once."""
    import transformers

    path = check(cfg)
    digest = sha256(path)
    folder = cache_root() / digest / f"transformers-{transformers.__version__}" / str(dtype).removeprefix("torch.")
    if (folder / SOURCE_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for its folder
        if (folder / SOURCE_FILE).is_file():
            return folder
        log.info(
            "converting %s (%.0f MB) to a dequantized %s model in %s, once per file on this machine",
            path.name,
            path.stat().st_size / 1e6,
            str(dtype).removeprefix("torch."),
            folder,
        )
        t0 = time.perf_counter()
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(cfg, path, dtype, tmp)
            (tmp / SOURCE_FILE).write_text(
                json.dumps(
                    {
                        "file": path.name,
                        "hub_repo": hub_repo(cfg),
                        "sha256": digest,
                        "bytes": path.stat().st_size,
                        "metadata": {k: v for k, v in read_metadata(path).items() if k.startswith("general.")},
                    },
                    indent=2,
                )
            )
            shutil.rmtree(folder, ignore_errors=True)  # a folder without its SOURCE_FILE is a dead conversion's
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.0f s", path.name, time.perf_counter() - t0)
    return folder


def _convert(cfg: Settings, path: Path, dtype, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True), dtype=dtype
        )
    except (ValueError, KeyError, NotImplementedError) as e:  # what Transformers raises on a file it cannot map
        raise ConfigError(f"{describe(cfg)}: Transformers could not load the GGUF file ({e}).") from None
    model.config.name_or_path = ""  # general.name ("Gemma 3 270m") is no repo; the folder is not one either
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def source_record(cfg: Settings, folder: Path) -> dict[str, Any]:
    """The GGUF base as this run names it (file, Hub repo) and as its prepared folder describes it (sha256, size,
    general.* metadata), with the model it was converted from. The folder is shared by every run of the same
    bytes, so the file's name and repo come from the settings, not from the run that converted it."""
    record = json.loads((folder / SOURCE_FILE).read_text())
    record |= {"file": locate(cfg).name, "hub_repo": hub_repo(cfg), "source_model": source_model(record["metadata"])}
    return record
