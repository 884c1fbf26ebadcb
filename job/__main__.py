"""Command line: `python -m job [run|config|demo|chat|provenance]` (console script: `hippocratically`).

Every setting comes from the environment (or .env); see `python -m job config` and job/config.py.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m job`: SIGTERM is handled from here on, before the slow imports (job/stop.py)
    from job import stop

    stop.install()

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from job import errors, redact, stop
from job.errors import BUG, EXIT_CODES, INTERRUPTED, JobError, OutOfMemory, classify

log = logging.getLogger("job")

# The demo: the real pipeline on a tiny generated model and the bundled fixture, on CPU, offline.
# Learning rate and epochs are raised so a 2-layer random model visibly learns in a minute.
FIXTURE = Path(__file__).parent / "fixtures" / "dialogues.jsonl"
DEMO = {
    "DATASET": str(FIXTURE),
    "NUM_SAMPLES": "80",
    "EVAL_SAMPLES": "16",
    "EVAL_PROMPTS": "8",
    "MAX_NEW_TOKENS": "24",
    "MAX_SEQ_LENGTH": "512",
    "BATCH_SIZE": "4",
    "EPOCHS": "2",
    "LEARNING_RATE": "5e-3",
    "SAVE_STEPS": "5",
    "LOGGING_STEPS": "1",
    "HUB_REPO_ID": "",
    "PRECISION": "auto",
    "BENCHMARK_DATA": str(Path(__file__).parent / "fixtures" / "benchmark"),  # a few questions per task
    # Three fixture questions a task cannot tell a drop from noise, and the tiny model's adapter is random:
    # the demo shows the benchmark table without letting chance stop its push (tests/test_benchmark.py
    # checks the gate itself on a known drop).
    "MAX_BENCHMARK_DROP": "100",
    # Likewise the safety screen: a random 2-layer model's answers are noise, and whether its adapter passes a
    # few more or fewer of them than its base says nothing (tests/test_safety.py checks the gate on a known drop).
    "MAX_SAFETY_DROP": "100",
}


def _setup_logging() -> None:
    redact.install_log_scrubbing()  # no token or URL password reaches the log, from our code or a library's
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return ", ".join(f"{g.name} ({g.total_memory / 2**30:.0f} GiB)" for g in gpus)
    return f"CPU only ({os.cpu_count()} cores)"


def cmd_config(args) -> int:
    from job import benchmark_tasks, config

    if args.write_docs:  # .env.example and the README's tables are generated from the schema and the task list
        root = Path(args.write_docs)
        (root / ".env.example").write_text(config.render_env_example(), encoding="utf-8")
        readme = root / "README.md"
        text = config.replace_section(readme.read_text(encoding="utf-8"), "settings", config.render_settings_table())
        text = config.replace_section(text, "benchmark-tasks", benchmark_tasks.render_table())
        readme.write_text(text, encoding="utf-8")
        print(f"wrote {root / '.env.example'} and the settings and benchmark tasks tables of {readme}")
        return 0
    print(json.dumps(config.load_settings().masked(), indent=2))
    return 0


def cmd_run(args, environ: dict[str, str] | None = None, env_file: str | None = ".env") -> int:
    import torch

    from job import pipeline
    from job.config import load_settings
    from job.paths import RunPaths

    cfg = load_settings(environ, env_file=env_file)
    redact.register(cfg.HF_TOKEN, cfg.WANDB_API_KEY, cfg.JUDGE_API_KEY)
    redact.register_url(cfg.JUDGE_BASE_URL)
    from huggingface_hub import constants

    errors.folders_written[:] = [str(cfg.run_dir), constants.HF_HOME]  # named when a write error names no file
    log.info("settings: %s", json.dumps(cfg.masked()))
    log.info("hardware: %s; torch %s", _hardware(), torch.__version__)
    log.info("run directory: %s; stages: %s", cfg.run_dir, ",".join(cfg.stages))
    pipeline.run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        paths = RunPaths(cfg.run_dir)
        print(f"\nDone. Run directory: {cfg.run_dir}")
        if paths.model_card.exists():
            print(f"Model card: {paths.model_card}")
        if paths.push.exists():
            print(f"Files for the Hub: {paths.push}")
    return 0


def cmd_demo(args) -> int:
    from job import tiny_model
    from job.files import read_jsonl

    env = dict(os.environ)
    output_dir = env.setdefault("OUTPUT_DIR", "outputs")
    env.setdefault("RUN_NAME", "demo")
    model_dir = Path(output_dir) / "tiny-model"
    if not (model_dir / "config.json").exists():
        texts = [v for r in read_jsonl(FIXTURE) for v in r.values() if isinstance(v, str)]
        tiny_model.build(model_dir, texts)
        log.info("built a tiny Llama-architecture model in %s", model_dir)
    env.update(DEMO, BASE_MODEL=str(model_dir))
    return cmd_run(args, environ=env, env_file=None)


def cmd_provenance(args) -> int:
    """What made each artifact of a run directory (job/provenance.py); reads files only, loads no model."""
    from job import provenance

    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        from job.config import load_settings

        run_dir = load_settings().run_dir
    info = provenance.collect(run_dir)
    print(
        json.dumps(info, indent=2, default=str) if args.json else provenance.show(info), end="\n" if args.json else ""
    )
    return 0


def cmd_chat(args) -> int:
    from job import chat

    return chat.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job", description="Fine-tune a medical assistant with QLoRA.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the stages selected by STAGES (default)")
    config = sub.add_parser("config", help="print the resolved settings, secrets masked")
    config.add_argument("--write-docs", metavar="REPO", help="regenerate REPO/.env.example and README's settings table")
    sub.add_parser("demo", help="the whole job on a tiny local model and bundled data, offline")
    chat = sub.add_parser("chat", help="talk to a fine-tuned adapter")
    chat.add_argument("--adapter", help="adapter folder or Hub id (default: RUN_DIR/adapter)")
    chat.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    prov = sub.add_parser("provenance", help="what made each artifact of a run: fingerprints, inputs, code")
    prov.add_argument("run_dir", nargs="?", help="a run directory (default: OUTPUT_DIR/RUN_NAME of the settings)")
    prov.add_argument("--json", action="store_true", help="print the record as JSON")
    args = parser.parse_args(argv)
    _setup_logging()
    commands = {"config": cmd_config, "demo": cmd_demo, "chat": cmd_chat, "provenance": cmd_provenance}
    try:
        with stop.handling_sigterm():
            code = commands.get(args.command, cmd_run)(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted (exit {INTERRUPTED}): run the same command again to resume", file=sys.stderr)
        code = INTERRUPTED
    except Exception as e:
        err = _as_job_error(e)
        if err is None:
            log.exception("unexpected error")
            code = BUG
        else:
            print(
                f"\nerror: {redact.scrub(str(err))}\n(exit {err.exit_code}: {EXIT_CODES[err.exit_code]})",
                file=sys.stderr,
            )
            code = err.exit_code
    return code


def cli() -> None:
    """The `hippocratically` console script: `python -m job` with SIGTERM handled for the whole process."""
    stop.install()
    sys.exit(main())


def _as_job_error(e: Exception) -> JobError | None:
    """Our own errors as they are; outside failures (Hub, network, disk, GPU memory) by their type."""
    if isinstance(e, JobError):
        return e
    torch = sys.modules.get("torch")  # not imported yet: then this cannot be a GPU out-of-memory error
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return OutOfMemory(f"GPU out of memory ({e}). Lower EVAL_BATCH_SIZE, BATCH_SIZE or MAX_SEQ_LENGTH.")
    return classify(e, "the job")


if __name__ == "__main__":
    sys.exit(main())
