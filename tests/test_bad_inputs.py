"""The bad-input catalog: every mistake a user can make up front gets one clear message and the right exit code.

Each case runs `python -m job` in-process (conftest's `run_job`) with its own settings, and checks:
the exit code (2, bad setting or input, unless the table says otherwise); that the message names the
item and the fix (the `expect` fragments); that nothing is marked done in the manifest (beyond what the
case allows); and, for problems knowable before loading a model, that `AutoModelForCausalLM.from_pretrained`
was never called. Two cases also run as real subprocesses for the true exit status and stderr.

The messages are collected into a catalog (markdown), written to pytest's temporary folder and, when
HIPPO_CATALOG names a file, there too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SMALL_RUN, job_process

from job.errors import BAD_CONFIG, OUT_OF_MEMORY, TRANSIENT
from job.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
BASE = {**SMALL_RUN, "HF_TOKEN": "", "RUN_NAME": "bad"}
CATALOG: list[tuple[str, int, str]] = []


@dataclass
class Case:
    id: str
    env: dict[str, str]
    expect: tuple[str, ...]  # fragments the message must contain: the item, the bad value, the fix
    setup: Callable[[SimpleNamespace], None] | None = None  # may write files, edit ctx.env, monkeypatch
    code: int = BAD_CONFIG
    may_be_done: tuple[str, ...] = ()  # stages that legitimately finished before the problem showed
    model_may_load: bool = False


# --- setups ----------------------------------------------------------------------------------------------
def _dotenv(ctx):
    (ctx.cwd / ".env").write_text("BATCHSIZE=4\n")


def _dataset(name: str, content: bytes | str):
    def setup(ctx):
        path = ctx.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        ctx.env["DATASET"] = str(path)

    return setup


def _parquet_int_doctor(ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ctx.tmp / "ints.parquet"
    pq.write_table(pa.table({"Patient": [f"Question {i}?" for i in range(40)], "Doctor": list(range(40))}), path)
    ctx.env["DATASET"] = str(path)


_GOOD_LINE = json.dumps(
    {
        "Description": "Q",
        "Patient": "I have had a headache for a week.",
        "Doctor": "Please rest, drink water and see your doctor if it persists.",
    }
)
_BOILERPLATE_ONLY = (
    "\n".join(
        json.dumps(
            {
                "Description": "Q",
                "Patient": f"Question number {i} about my knee pain.",
                "Doctor": "Thanks for the query. Regards, Dr. Smith",
            }
        )
        for i in range(40)
    )
    + "\n"
)


def _chat(bad: dict, good: str = "messages", line: int = 3):
    """DATASET: ten good conversations of the `good` format (tests/data/formats/), `bad` as line `line`."""

    def setup(ctx):
        source = Path(__file__).parent / "data" / "formats" / "messages.jsonl"
        rows = [json.loads(text) for text in source.read_text().splitlines()][:10]
        if good == "sharegpt":
            names = {"user": "human", "assistant": "gpt", "system": "system"}
            rows = [
                {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
                for r in rows
            ]
        rows.insert(line - 1, bad)
        _dataset("chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))(ctx)

    return setup


def _turns(*turns) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


_Q, _A = "My knee hurts after running.", "Rest it, use ice and see a physiotherapist if it lasts."


def _model_without_chat_template(ctx):
    model = ctx.tmp / "no-template-model"
    shutil.copytree(ctx.model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = model / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    ctx.env["BASE_MODEL"] = str(model)


def _gguf(folder: bool = False, arch: str | None = None, garbage: bool = False):
    """BASE_MODEL: the tiny model as a .gguf without a chat template (tests/tiny_gguf.py); `folder`: BASE_MODEL is
    the folder that holds it; `arch`: a header-only GGUF of that architecture; `garbage`: a .gguf of other bytes."""

    def setup(ctx):
        from gguf import GGUFWriter
        from tiny_gguf import write_llama_gguf

        path = ctx.tmp / "ggufs" / "tiny.gguf"
        path.parent.mkdir()
        if garbage:
            path.write_bytes(b"PK\x03\x04 a zip file, renamed")
        elif arch:
            writer = GGUFWriter(str(path), arch=arch)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        else:
            write_llama_gguf(ctx.model_dir, path)
        ctx.env["BASE_MODEL"] = str(path.parent if folder else path)
        ctx.env["HF_HOME"] = str(ctx.tmp / "hf")  # a conversion, if any, would land here

    return setup


def _output_dir_under_a_file(ctx):
    blocker = ctx.tmp / "a-file"
    blocker.write_text("not a folder")
    ctx.env["OUTPUT_DIR"] = str(blocker / "outputs")


def _empty_folder_as_model(ctx):
    (ctx.tmp / "empty-model").mkdir()
    ctx.env["BASE_MODEL"] = str(ctx.tmp / "empty-model")


def _no_bitsandbytes(ctx):
    ctx.monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


def _gpu_without_bf16(ctx):
    import torch

    props = SimpleNamespace(name="Tesla T4", total_memory=16 * 2**30)
    for name, value in {
        "is_available": lambda: True,
        "is_bf16_supported": lambda *a, **k: False,
        "device_count": lambda: 1,
        "get_device_name": lambda *a: "Tesla T4",
        "get_device_properties": lambda *a: props,
    }.items():
        ctx.monkeypatch.setattr(torch.cuda, name, value)


def _finished_sample_with_other_settings(ctx):
    from job.pipeline import DEPENDS

    run_dir = Path(ctx.env["OUTPUT_DIR"]) / ctx.env["RUN_NAME"]
    run_dir.mkdir(parents=True)
    from job.config import load_settings

    old = load_settings({**ctx.env, "NUM_SAMPLES": "30"}, env_file=None)
    manifest = {"stages": {"sample": {"status": "done", "fingerprint": old.fingerprint_for(DEPENDS["sample"])}}}
    RunPaths(run_dir).manifest.write_text(json.dumps(manifest))


def _manifest(content: str):
    def setup(ctx):
        run_dir = Path(ctx.env["OUTPUT_DIR"]) / ctx.env["RUN_NAME"]
        run_dir.mkdir(parents=True)
        RunPaths(run_dir).manifest.write_text(content)

    return setup


def _latin1_dotenv(ctx):
    (ctx.cwd / ".env").write_bytes(b"SEED=7\nSYSTEM_PROMPT=Vous \xeates un assistant\n")


def _run_dir_locked_by_a_live_process(ctx):
    """Another job (here: this test's parent process, alive all along) owns the run directory."""
    import socket

    run_dir = Path(ctx.env["OUTPUT_DIR"]) / ctx.env["RUN_NAME"]
    run_dir.mkdir(parents=True)
    owner = {"host": socket.gethostname(), "pid": os.getppid(), "started_at": "2026-11-28T08:00:00+00:00"}
    RunPaths(run_dir).lock.write_text(json.dumps(owner))


def _oom_in_training(ctx):
    import torch
    from trl import SFTTrainer

    def train(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    ctx.monkeypatch.setattr(SFTTrainer, "train", train)


CASES = [
    # --- settings ---
    Case("unknown setting, typo", {"NUM_SAMPLE": "10"}, ("NUM_SAMPLE", "did you mean NUM_SAMPLES")),
    Case("unknown setting in .env", {}, ("BATCHSIZE", ".env", "did you mean BATCH_SIZE"), setup=_dotenv),
    Case("whole number expected", {"BATCH_SIZE": "eight"}, ("BATCH_SIZE='eight'", "whole number")),
    Case("number expected", {"LEARNING_RATE": "fast"}, ("LEARNING_RATE='fast'", "number such as")),
    Case("true/false expected", {"PACKING": "maybe"}, ("PACKING='maybe'", "true or false")),
    Case("empty number", {"NUM_SAMPLES": ""}, ("NUM_SAMPLES=''", "empty value")),
    Case("empty text setting", {"BASE_MODEL": " "}, ("BASE_MODEL", "must not be empty")),
    Case("value not among the choices", {"QUANTIZATION": "int8"}, ("QUANTIZATION='int8'", "nf4, none")),
    Case("out of range", {"LORA_DROPOUT": "1.5"}, ("LORA_DROPOUT=1.5", "between 0 and 1")),
    Case("zero batch", {"BATCH_SIZE": "0"}, ("BATCH_SIZE=0", "between 1 and")),
    Case("MAX_SEQ_LENGTH too short", {"MAX_SEQ_LENGTH": "32"}, ("MAX_SEQ_LENGTH=32", "256 or more")),
    Case(
        "more generations than eval rows",
        {"EVAL_PROMPTS": "10"},
        ("EVAL_PROMPTS=10", "EVAL_SAMPLES=4", "raise EVAL_SAMPLES"),
    ),
    Case(
        "several problems reported together",
        {"NUM_SAMPLES": "many", "LORA_R": "0", "STAGES": "sample,trian"},
        ("NUM_SAMPLES='many'", "LORA_R=0", "STAGES='sample,trian'"),
    ),
    Case("RUN_NAME with a slash", {"RUN_NAME": "runs/one"}, ("RUN_NAME='runs/one'", "letters, digits")),
    Case("RUN_NAME of the parent folder", {"RUN_NAME": ".."}, ("RUN_NAME='..'", "starting with a letter or digit")),
    Case("RUN_NAME of OUTPUT_DIR itself", {"RUN_NAME": "."}, ("RUN_NAME='.'", "starting with a letter or digit")),
    Case("RUN_NAME too long", {"RUN_NAME": "r" * 300}, ("RUN_NAME='rrr", "1 to 100")),
    Case("negative SEED", {"SEED": "-1"}, ("SEED=-1", "between 0 and 4294967295")),
    Case("SEED beyond 32 bits", {"SEED": "4294967296"}, ("SEED=4294967296", "between 0 and 4294967295")),
    Case("infinite EPOCHS", {"EPOCHS": "inf"}, ("EPOCHS='inf'", "finite number")),
    Case("unknown OPTIMIZER", {"OPTIMIZER": "adamw_bogus"}, ("OPTIMIZER='adamw_bogus'", "did you mean adamw")),
    Case("WARMUP_RATIO of 1", {"WARMUP_RATIO": "1.0"}, ("WARMUP_RATIO=1.0", "less than 1")),
    Case(".env not UTF-8", {}, (".env: line 2 is not UTF-8", "re-save"), setup=_latin1_dotenv),
    Case("truncated manifest", {}, ("manifest.json is damaged", "Delete it"), setup=_manifest('{"stages": {"sam')),
    Case("empty manifest", {}, ("manifest.json is damaged", "another RUN_NAME"), setup=_manifest("")),
    # Hand-edited manifests with the wrong types where the pipeline reads a stage's record (issue 26).
    *(
        Case(f"manifest with {what}", {}, ("manifest.json is damaged", field, "Delete it"), setup=_manifest(text))
        for what, text, field in [
            ("a stage that is a string", '{"stages": {"train": "done"}}', "stages.train is a JSON string"),
            ("a stage that is a list", '{"stages": {"sample": ["done"]}}', "stages.sample is a JSON array"),
            ("stages that are a list", '{"stages": ["sample"]}', "stages is a JSON array, not an object"),
            ("a manifest that is a list", '[{"stages": {}}]', "the file is a JSON array"),
            (
                "a fingerprint that is not an object",
                '{"stages": {"sample": {"status": "done", "finished_at": "t", "fingerprint": 3, "artifacts": []}}}',
                "stages.sample.fingerprint is a JSON number",
            ),
            (
                "artifacts that are not a list",
                '{"stages": {"sample": {"status": "done", "finished_at": "t", "fingerprint": {}, "artifacts": "x"}}}',
                "stages.sample.artifacts is a JSON string",
            ),
            (
                "artifacts that are not file names",
                '{"stages": {"sample": {"status": "done", "finished_at": "t", "fingerprint": {}, "artifacts": [1]}}}',
                "stages.sample.artifacts holds something other than file names",
            ),
            ("a status that is not text", '{"stages": {"sample": {"status": true}}}', "stages.sample.status is a JSON"),
            ("a report that is a list", '{"stages": {}, "report": []}', "report is a JSON array"),
        ]
    ),
    Case(
        "run directory held by another run",
        {},
        ("another run is using", f"pid {os.getppid()}", "started 2026-11-28T08:00:00", "choose another RUN_NAME"),
        setup=_run_dir_locked_by_a_live_process,
        code=TRANSIENT,
    ),
    Case(
        "malformed HUB_REPO_ID",
        {"HUB_REPO_ID": "my model", "HF_TOKEN": "hf_x"},
        ("HUB_REPO_ID='my model'", "owner/name"),
    ),
    Case("push without a token", {"HUB_REPO_ID": "alice/med"}, ("HUB_REPO_ID='alice/med'", "HF_TOKEN", "write access")),
    Case("wandb without a key", {"REPORT_TO": "wandb"}, ("WANDB_API_KEY", "REPORT_TO=tensorboard")),
    Case(
        "unwritable OUTPUT_DIR", {}, ("OUTPUT_DIR=", "cannot write", "writable folder"), setup=_output_dir_under_a_file
    ),
    Case("stage whose upstream never ran", {"STAGES": "evaluate"}, ("STAGES='evaluate'", "needs 'sample' finished")),
    Case(
        "changed settings on a finished stage",
        {},
        ("stage 'sample' already finished", "NUM_SAMPLES: 30 -> 24", "REDO=true"),
        setup=_finished_sample_with_other_settings,
        may_be_done=("sample",),
    ),
    # --- hardware ---
    Case(
        "4-bit without bitsandbytes",
        {},
        ("QUANTIZATION='nf4'", "bitsandbytes", "QUANTIZATION=none"),
        setup=_no_bitsandbytes,
    ),
    Case(
        "bf16 on a GPU without bf16",
        {"PRECISION": "bf16", "QUANTIZATION": "none"},
        ("PRECISION='bf16'", "Tesla T4", "PRECISION=fp16 or auto"),
        setup=_gpu_without_bf16,
    ),
    Case("fp16 without a GPU", {"PRECISION": "fp16"}, ("PRECISION='fp16'", "CUDA GPU", "PRECISION=auto")),
    # --- data ---
    Case("dataset file missing", {"DATASET": "/nonexistent/dialogues.jsonl"}, ("DATASET=", "no such file")),
    Case("dataset file empty", {}, ("DATASET=", "empty"), setup=_dataset("empty.jsonl", b"")),
    Case("dataset of blank lines", {}, ("DATASET=", "only blank lines, no rows"), setup=_dataset("b.jsonl", "\n \n")),
    Case(
        "csv with an open quote",
        {},
        ("DATASET=", "could not be loaded: ParserError", "EOF inside string starting at row 1"),
        setup=_dataset("quote.csv", 'Description,Patient,Doctor\n"unterminated,quote\n'),
    ),
    Case(
        "mixture file with an unknown key",
        {},
        ("DATASET=", "mix.yaml', source 1: unknown key 'colums'", "a source's keys are dataset, weight"),
        setup=_dataset("mix.yaml", "sources:\n  - dataset: a.jsonl\n    colums: x\n"),
    ),
    # mixtures (job/mixture.py, tests/test_mixture.py)
    Case("mixture weight zero", {"DATASET": "a.jsonl:0,b.jsonl:1"}, ("DATASET=", "'a.jsonl' is 0", "above 0")),
    Case("mixture weight negative", {"DATASET": "a.jsonl:-1,b.jsonl"}, ("DATASET=", "is -1", "above 0")),
    Case("mixture empty source", {"DATASET": "a.jsonl:1,,b.jsonl"}, ("DATASET=", "empty source", "source:weight")),
    Case("weight of one source", {"DATASET": "a.jsonl:0.5"}, ("DATASET=", "one source", "drop ':0.5'")),
    Case(
        "mixture source missing",
        {"DATASET": "/nonexistent/general.jsonl:0.2,/nonexistent/medical.jsonl:0.8"},
        ("DATASET='/nonexistent/general.jsonl'", "no such file"),
    ),
    Case(
        "dataset not UTF-8",
        {},
        ("DATASET=", "line 2 is not UTF-8", "Re-save the file as UTF-8"),
        setup=_dataset("latin1.jsonl", (_GOOD_LINE + "\n").encode() + b'{"Patient": "caf\xe9"}\n'),
    ),
    Case(
        "dataset of an unsupported type",
        {},
        ("DATASET=", "unsupported file type", ".jsonl"),
        setup=_dataset("dialogues.txt", "Patient: hello\n"),
    ),
    Case(
        "dataset with a broken JSON line",
        {},
        ("DATASET=", "line 2 is not valid JSON", "Fix or delete that line"),
        setup=_dataset("broken.jsonl", _GOOD_LINE + '\n{"Patient": "unterminated\n' + _GOOD_LINE + "\n"),
    ),
    Case(
        "dataset line that is a JSON array",
        {},
        ("DATASET=", "line 2 is a JSON array, not an object", '{"Patient": "...", "Doctor": "..."}'),
        setup=_dataset("array.jsonl", _GOOD_LINE + '\n["Rest.", "See a GP."]\n'),
    ),
    Case(
        "dataset line that is a bare string",
        {},
        ("DATASET=", "line 1 is a JSON string, not an object"),
        setup=_dataset("string.jsonl", '"Rest and see a GP."\n' + _GOOD_LINE + "\n"),
    ),
    Case(
        ".json file holding one object",
        {},
        ("DATASET=", "holds one JSON object", "JSON array", ".jsonl"),
        setup=_dataset("one.json", _GOOD_LINE),
    ),
    Case(
        "Doctor column of integers",
        {},
        ("DOCTOR_COLUMN='Doctor' holds int64 values", "text column"),
        setup=_parquet_int_doctor,
    ),
    Case(
        "replies that are JSON objects",
        {},
        ("DOCTOR_COLUMN='Doctor' holds JSON object values", "text column"),
        setup=_dataset(
            "objects.jsonl",
            "\n".join(json.dumps({"Patient": f"Question {i}?", "Doctor": {"text": "Rest."}}) for i in range(40)),
        ),
    ),
    Case("missing column", {"DOCTOR_COLUMN": "Answer"}, ("DOCTOR_COLUMN='Answer'", "'Doctor'", "*_COLUMN")),
    # --- conversation formats (job/formats.py): the row's line, the field, the fix ---
    Case(
        "messages: a role that is not one",
        {},
        (
            "line 3",
            "field messages[1].role",
            "'doctor' is not a role of the messages format",
            "system, developer, user, assistant",
        ),
        setup=_chat(_turns(("user", _Q), ("doctor", _A))),
    ),
    Case(
        "sharegpt: a role that is not one",
        {},
        ("line 3", "field conversations[0].from", "'patient' is not a role", "human, user, gpt"),
        setup=_chat({"conversations": [{"from": "patient", "value": _Q}, {"from": "gpt", "value": _A}]}, "sharegpt"),
    ),
    Case(
        "messages: empty content",
        {},
        ("line 3", "field messages[1].content is empty", "Fill it in"),
        setup=_chat(_turns(("user", _Q), ("assistant", " "))),
    ),
    Case(
        "messages: no assistant turn",
        {},
        ("line 3", "field 'messages'", "no assistant turn", "Add the reply"),
        setup=_chat(_turns(("system", "Be brief."), ("user", _Q))),
    ),
    Case(
        "messages: content that is not text",
        {},
        ("line 3", "field messages[0].content", "holds a int", "Write it as a string"),
        setup=_chat({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": _Q}]}),
    ),
    Case(
        "messages: an image among the content parts",
        {},
        ("line 3", "field messages[0].content[1]: a 'image_url' part", "only text parts", "as a string"),
        setup=_chat(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": _Q}, {"type": "image_url", "image_url": {}}]},
                    {"role": "assistant", "content": _Q},
                ]
            }
        ),
    ),
    Case(
        "messages: two user turns in a row",
        {},
        ("line 3", "turn 1 is the user's where the assistant's belongs", "taking turns"),
        setup=_chat(_turns(("user", _Q), ("user", "Hello?"), ("assistant", _A))),
    ),
    Case(
        "alpaca: empty output",
        {},
        ("line 3", "field 'output' is empty", "only 'input' may be empty"),
        setup=_dataset(
            "alpaca.jsonl",
            "".join(
                json.dumps({"instruction": f"{_Q} ({i})", "input": "", "output": "" if i == 2 else _A}) + "\n"
                for i in range(10)
            ),
        ),
    ),
    Case(
        "mixed formats in one file",
        {},
        (
            "line 3 is a row of the sharegpt format",
            "but line 1 is messages",
            "a dataset holds one format",
            "split the file",
        ),
        setup=_chat({"conversations": [{"from": "human", "value": _Q}, {"from": "gpt", "value": _A}]}),
    ),
    Case(
        "mixed formats, DATA_FORMAT set",
        {"DATA_FORMAT": "messages"},
        ("line 3 is a row of the alpaca format", "this dataset's format is messages", "Convert"),
        setup=_chat({"instruction": _Q, "output": _A}),
    ),
    Case(
        "auto-detection ambiguous",
        {},
        ("DATA_FORMAT=auto", "line 3 has the fields of messages and alpaca", "ambiguous", "Set DATA_FORMAT"),
        setup=_chat({**_turns(("user", _Q), ("assistant", _A)), "instruction": _Q, "output": _A}),
    ),
    Case(
        "DATA_FORMAT of another format",
        {"DATA_FORMAT": "sharegpt"},
        ("DATA_FORMAT=sharegpt", "no field 'conversations'", "'messages'", "Set DATA_FORMAT"),
        setup=_chat(_turns(("user", _Q), ("assistant", _A))),
    ),
    Case(
        "more samples than the data has",
        {"NUM_SAMPLES": "500"},
        ("NUM_SAMPLES=500", "after cleaning", "Lower NUM_SAMPLES"),
    ),
    Case(
        "every row empty after cleaning",
        {},
        ("has only 0 after cleaning", "empty_doctor", "Lower NUM_SAMPLES"),
        setup=_dataset("boilerplate.jsonl", _BOILERPLATE_ONLY),
    ),
    Case(
        "rows too long for MAX_SEQ_LENGTH",
        {"MAX_SEQ_LENGTH": "64"},
        ("MAX_SEQ_LENGTH=64", "no room left for the reply", "Raise MAX_SEQ_LENGTH"),
        may_be_done=("sample",),
    ),
    # --- model ---
    Case(
        "BASE_MODEL folder missing",
        {"BASE_MODEL": "/nonexistent/llama"},
        ("BASE_MODEL='/nonexistent/llama'", "no such folder"),
    ),
    Case("BASE_MODEL folder is not a model", {}, ("BASE_MODEL=", "has no config.json"), setup=_empty_folder_as_model),
    Case(
        "model without a chat template",
        {},
        ("BASE_MODEL=", "no chat template", "instruct"),
        setup=_model_without_chat_template,
    ),
    Case(
        "GGUF base without a chat template, CHAT_TEMPLATE unset",
        {},
        ("BASE_MODEL=", "tiny.gguf", "no chat template", "Set CHAT_TEMPLATE", "gemma, llama3, chatml"),
        setup=_gguf(),
    ),
    Case(
        ".gguf file missing",
        {"BASE_MODEL": "/nonexistent/model-q4_k_m.gguf"},
        ("BASE_MODEL='/nonexistent/model-q4_k_m.gguf'", "no such .gguf file"),
    ),
    Case(
        "GGUF_FILE not in the BASE_MODEL folder",
        {"GGUF_FILE": "model-q8_0.gguf", "CHAT_TEMPLATE": "llama3"},
        ("GGUF_FILE='model-q8_0.gguf'", "not in the folder", "its .gguf files: tiny.gguf"),
        setup=_gguf(folder=True),
    ),
    Case("GGUF_FILE not a .gguf", {"GGUF_FILE": "model.safetensors"}, ("GGUF_FILE='model.safetensors'", ".gguf file")),
    Case(
        "GGUF_FILE beside a .gguf BASE_MODEL",
        {"BASE_MODEL": "/models/a.gguf", "GGUF_FILE": "b.gguf"},
        ("GGUF_FILE='b.gguf'", "BASE_MODEL already names a .gguf file"),
    ),
    Case(
        "a .gguf that is not GGUF",
        {"CHAT_TEMPLATE": "llama3"},
        ("BASE_MODEL=", "tiny.gguf", "not a GGUF file"),
        setup=_gguf(garbage=True),
    ),
    Case(
        "GGUF of an architecture Transformers cannot load",
        {"CHAT_TEMPLATE": "llama3"},
        ("BASE_MODEL=", "architecture 'rwkv6'", "cannot load", "gemma3", "llama"),
        setup=_gguf(arch="rwkv6"),
    ),
    Case(
        "CHAT_TEMPLATE neither a name nor a file",
        {"CHAT_TEMPLATE": "gemma4"},
        ("CHAT_TEMPLATE='gemma4'", "gemma, llama3, chatml", "Jinja file"),
    ),
    Case(
        "CHAT_TEMPLATE of another model family",
        {"CHAT_TEMPLATE": "chatml"},
        ("CHAT_TEMPLATE='chatml'", "not one token", "template of the model's family"),
    ),
    Case(
        "LoRA target modules absent",
        {"LORA_TARGET_MODULES": "q_proj,query_key_value"},
        ("LORA_TARGET_MODULES='q_proj,query_key_value'", "query_key_value not found", "linear modules are"),
    ),
    # --- at run time ---
    Case(
        "out of GPU memory in training",
        {},
        ("out of memory at step 0", "BATCH_SIZE=2", "MAX_SEQ_LENGTH=256", "Lower BATCH_SIZE", "GRADIENT_CHECKPOINTING"),
        setup=_oom_in_training,
        code=OUT_OF_MEMORY,
        may_be_done=("sample", "format"),
        model_may_load=True,
    ),
]


# --- running a case --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    """The tiny model built once per session by tests/conftest.py."""
    return tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def catalog(tmp_path_factory):
    yield CATALOG
    lines = ["| case | exit | message |", "|---|---|---|"]
    for case_id, code, message in CATALOG:
        lines.append(f"| {case_id} | {code} | {message.replace(chr(10), '<br>').replace('|', '&#124;')} |")
    text = "\n".join(lines) + "\n"
    (tmp_path_factory.getbasetemp() / "bad_inputs_catalog.md").write_text(text)
    if os.environ.get("HIPPO_CATALOG"):
        Path(os.environ["HIPPO_CATALOG"]).write_text(text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, model_dir, tmp_path, monkeypatch, run_job):
    import transformers

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**BASE, "BASE_MODEL": str(model_dir), "OUTPUT_DIR": str(tmp_path / "outputs"), **case.env}
    ctx = SimpleNamespace(env=env, tmp=tmp_path, cwd=cwd, model_dir=model_dir, monkeypatch=monkeypatch)
    if case.setup:
        case.setup(ctx)
    loads = []
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        loads.append(args)
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # train.run sets it if unset

    result = run_job(env, "run", cwd=cwd)

    message = result.message
    CATALOG.append((case.id, result.exit_code, message))
    assert result.exit_code == case.code, result.output[-3000:]
    for fragment in case.expect:
        assert fragment in message, f"{fragment!r} not in the message:\n{message}"
    assert "Traceback" not in result.output
    run_dir = Path(env["OUTPUT_DIR"]) / env["RUN_NAME"]
    manifest = RunPaths(run_dir).manifest
    done = []
    if manifest.is_file() and "manifest" not in case.id:  # the damaged-manifest cases leave theirs as it was
        stages = json.loads(manifest.read_text())["stages"]
        done = [s for s, r in stages.items() if r.get("status") == "done"]
    assert set(done) <= set(case.may_be_done), f"marked done: {done}"
    if case.model_may_load:
        assert loads, "the spy saw no model load (so its silence elsewhere would prove nothing)"
    else:
        assert loads == [], "the model was loaded although the problem was knowable up front"
    if not case.may_be_done:
        assert not RunPaths(run_dir).checkpoints.exists() and not RunPaths(run_dir).adapter.exists()


# --- the same, as real processes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expect",
    [
        ({"NUM_SAMPLE": "10", "BATCH_SIZE": "eight"}, ("did you mean NUM_SAMPLES", "BATCH_SIZE='eight'")),
        ({"DATASET": "latin1.jsonl"}, ("DATASET='latin1.jsonl'", "line 1 is not UTF-8")),
    ],
    ids=["settings", "non-utf8-data"],
)
def test_bad_input_exit_status_and_stderr_of_a_real_process(extra, expect, model_dir, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"Patient": "caf\xe9", "Doctor": "ok"}\n')
    env = {**BASE, "BASE_MODEL": str(model_dir), "OUTPUT_DIR": str(tmp_path / "outputs"), **extra}
    proc = job_process(env, cwd=tmp_path, timeout=300)
    assert proc.returncode == BAD_CONFIG, proc.stderr[-3000:]
    for fragment in expect:
        assert fragment in proc.stderr
    assert "(exit 2: bad setting or input" in proc.stderr and "Traceback" not in proc.stderr
    assert not RunPaths(tmp_path / "outputs" / "bad").manifest.exists()
    if "NUM_SAMPLE" in extra:  # bad settings: nothing at all is written before they are valid
        assert not (tmp_path / "outputs").exists()
