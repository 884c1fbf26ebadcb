"""The Python packages a GPU machine without a package registry lacks, as xz archives small enough to carry.

    python -m bench.gpu_site --out .carry/site                       # the job's stack (the bench's `job` recipes)
    python -m bench.gpu_site --out .carry/uns --stack unsloth        # Unsloth's own stack (--unsloth-site)
    python -m bench.gpu_site --out .carry/axo --stack axolotl        # Axolotl's (--axolotl-site)

On the machine (PYTHONPATH first, so these shadow the image's older copies):

    mkdir -p /tmp/site && for a in .carry/site/part*/*.tar.xz; do tar -xJf "$a" -C /tmp/site; done
    export PYTHONPATH=/tmp/site:$PWD

Why our own script: the lent GPU machines (and many clusters) reach no registry, carry at most 64 MiB a call, and
come with their own torch, triton and CUDA libraries, which must not be replaced. pip resolves the stack's whole
dependency closure for the machine's Python (3.12, manylinux x86-64) with its own resolver (`pip install --dry-run
--report`), against stand-in torch and triton wheels of the machine's versions that have no dependencies, so that
none of CUDA's libraries comes along; it then downloads exactly that closure (wheels only: the few packages
published as source only are built into wheels here, all pure Python), installs it into a folder, trims what no
run there reads (bitsandbytes' libraries for other CUDA versions and ROCm, lm-eval's tasks but the job's
benchmark folders, test suites) and packs each top-level entry in an xz archive, the archives in folders part00,
part01 ... of at most --max-mb each, which consecutive calls can carry one at a time (a warm machine keeps
/tmp). `--have` names packages the machine already has, left out (default: numpy, whose copy there the machine's
torch was built with), or gives a file of `pip list --format=freeze` run there. MANIFEST.txt lists the versions.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# What the GPU machine's image holds (KINDS.md of the device library: torch 2.11.0+cu130, triton 3.6.0).
MACHINE_TORCH, MACHINE_TRITON = "2.11.0", "3.6.0"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
TARGET += [arg for p in PLATFORMS for arg in ("--platform", p)]
# Each stack as the bench measured it (README, Performance): pinned, so two machines build the same site.
STACKS = {
    "job": [
        "transformers==5.24.0",
        "trl==1.16.0",
        "peft==0.21.2",
        "bitsandbytes==0.50.2",
        "liger-kernel==0.8.5",
        "datasets==5.2.0",
        ".",  # the job's own requirements (pyproject.toml); the job itself travels as the working tree
    ],
    "unsloth": ["unsloth==2026.10.9", "bitsandbytes==0.50.2"],
    "axolotl": ["axolotl==0.19.0", "bitsandbytes==0.50.2"],  # Axolotl pins its own Liger
}
KEEP_BNB = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")  # the machine's CUDA 13.0, and CPU


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def stand_in(name: str, version: str, folder: Path) -> None:
    """A wheel of `name` at `version`+stub with no files and no dependencies: it satisfies what requires the
    machine's own package without bringing that package's dependencies (CUDA's libraries) into the closure."""
    info = f"{name}-{version}+stub.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}+stub-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+stub\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def closure(requirements: list[str], links: Path, work: Path) -> list[tuple[str, str]]:
    """(name, version) of every package the requirements need on the machine, as pip's resolver picks them. A package
    published as source only (no wheel to download for the machine) is built into a wheel here, once, and the
    resolution tried again; only pure-Python ones can be (a wheel built here with compiled code would be this
    machine's, not the GPU machine's)."""
    report = work / "report.json"
    pins = [f"torch=={MACHINE_TORCH}+stub", f"triton=={MACHINE_TRITON}+stub"]
    built: set[str] = set()
    while True:
        run = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
             str(report), "--find-links", str(links), "--target", str(work / "unused"), *TARGET, *pins,
             *requirements],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode == 0:
            break
        missing = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+(?:==[^\s;]+)?)", run.stderr)
        if not missing or missing.group(1) in built:
            raise SystemExit(f"pip could not resolve the {requirements} closure:\n{run.stderr[-3000:]}")
        built.add(missing.group(1))
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(links), missing.group(1))
        compiled = [w.name for w in links.glob("*.whl") if not w.name.endswith("-none-any.whl")]
        if compiled:
            raise SystemExit(f"{missing.group(1)} is published as source only and has compiled code: {compiled}")
    found = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    return sorted((n, v) for n, v in found if not v.endswith("+stub") and n != "hippocratically")


def trim(site: Path, folders: set[str]) -> None:
    """Remove what no run on the machine reads: other bitsandbytes libraries, lm-eval's other tasks, test suites."""
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_*"):
        if lib.name not in KEEP_BNB:
            lib.unlink()
    tasks = site / "lm_eval" / "tasks"
    if tasks.is_dir():
        keep = {tasks / f for f in folders}
        for d in sorted(p for p in tasks.rglob("*") if p.is_dir()):
            if d.exists() and not any(d == k or k.is_relative_to(d) or d.is_relative_to(k) for k in keep):
                shutil.rmtree(d)
    for tests in [p for p in site.glob("*/tests") if p.is_dir()] + list(site.rglob("__pycache__")):
        shutil.rmtree(tests, ignore_errors=True)


def pack(site: Path, out: Path, max_bytes: int) -> list[Path]:
    """Each top-level entry of the site in an xz archive of its own, the archives put into folders part00, part01 ...
    of at most `max_bytes` each (one folder a call); returns the folders."""
    archives = []
    for entry in sorted(site.iterdir(), key=lambda p: p.name):
        path = out / f"{entry.name}.tar.xz"
        with tarfile.open(path, "w:xz", preset=6) as tar:
            tar.add(entry, arcname=entry.name)
        archives.append(path)
    parts: list[Path] = []
    for path in sorted(archives, key=lambda p: -p.stat().st_size):  # largest first: fewer, fuller folders
        size = path.stat().st_size
        if size > max_bytes:
            raise SystemExit(f"{path.name} is {size / 1e6:.1f} MB, more than --max-mb alone")
        fits = [p for p in parts if sum(f.stat().st_size for f in p.iterdir()) + size <= max_bytes]
        if not fits:
            fits = [out / f"part{len(parts):02d}"]
            fits[0].mkdir()
            parts.append(fits[0])
        path.rename(fits[0] / path.name)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the archives (emptied first)")
    parser.add_argument("--stack", choices=sorted(STACKS), default="job")
    parser.add_argument(
        "--have", default="numpy", help="packages the machine has, left out: comma-separated, or a pip freeze file"
    )
    parser.add_argument("--max-mb", type=float, default=60.0, help="largest archive, MB (a call carries 64 MiB)")
    args = parser.parse_args(argv)

    from job.benchmark_tasks import TASKS

    root = Path(__file__).resolve().parent.parent
    listed = Path(args.have).read_text().splitlines() if Path(args.have).is_file() else args.have.split(",")
    have = {re.split(r"[=<>@ ]", h.strip())[0].lower().replace("_", "-") for h in listed if h.strip()}
    requirements = [str(root) if r == "." else r for r in STACKS[args.stack]]
    with tempfile.TemporaryDirectory(prefix="gpu-site-") as tmp:
        work = Path(tmp)
        links, wheels, site = work / "links", work / "wheels", work / "site"
        for d in (links, wheels, site):
            d.mkdir()
        stand_in("torch", MACHINE_TORCH, links)
        stand_in("triton", MACHINE_TRITON, links)
        needed = [(n, v) for n, v in closure(requirements, links, work) if n.lower().replace("_", "-") not in have]
        pip("download", "--quiet", "--no-deps", "--find-links", str(links), "--dest", str(wheels), *TARGET,
            *(f"{n}=={v}" for n, v in needed))  # fmt: skip
        pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(site), *TARGET,
            *map(str, sorted(wheels.glob("*.whl"))))  # fmt: skip
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts, with this machine's interpreter path
        trim(site, {t.folder for t in TASKS.values() if t.folder})
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        parts = pack(site, args.out, int(args.max_mb * 1e6))
    manifest = [f"{args.stack} stack for Python 3.12, manylinux x86-64; torch {MACHINE_TORCH} and triton "
                f"{MACHINE_TRITON} and {', '.join(sorted(have)) or 'nothing else'} from the machine"]  # fmt: skip
    manifest += [f"{n}=={v}" for n, v in needed]
    (args.out / "MANIFEST.txt").write_text("\n".join(manifest) + "\n")
    for part in parts:
        files = list(part.iterdir())
        print(f"{part}: {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {len(files)} archives")
    print(f"{len(needed)} packages; unpack every part's archives into one folder, first on PYTHONPATH")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
