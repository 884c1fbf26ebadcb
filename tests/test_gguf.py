"""A base model from a GGUF file (job/gguf_base.py), CHAT_TEMPLATE, and stopping at the template's end of turn.

The GGUF is the tests' tiny Llama written by tests/tiny_gguf.py (Q8_0 weights, the tokenizer, no chat template),
so the path a real GGUF takes (header checks, Transformers' dequantizing loader, the converted folder, NF4 on top)
runs on every commit, offline, in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN

from job import evaluate, gguf_base
from job.config import load_settings
from job.errors import ConfigError
from job.formats import single_turn
from job.formatting import tokenize_row
from job.model import build_messages, end_of_turn_ids, load_tokenizer
from job.paths import RunPaths
from job.report import card_data

# The whole job, as small as it goes: 8 conversations of at most 256 tokens, one epoch (a few optimizer steps),
# 2 held-out prompts of 4 new tokens, no benchmark.
GGUF_RUN = {
    **SMALL_RUN,
    "NUM_SAMPLES": "8",
    "EPOCHS": "1",
    "PACKING": "true",
    "BATCH_SIZE": "4",
    "BENCHMARK_TASKS": "",
    "HF_TOKEN": "",
}
REPLY = "Rest, drink fluids, and see a doctor if the fever lasts more than three days."
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]


def settings(**env) -> object:
    return load_settings(environ={k: str(v) for k, v in env.items()}, env_file=None)


@pytest.fixture(scope="module")
def turn_tokens_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's folder with Gemma's and ChatML's turn markers added to its tokenizer as special tokens
    (only tokenizers are loaded from it)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("turn-tokens")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    tok.save_pretrained(out)
    return out


# --- the whole job on a GGUF base ------------------------------------------------------------------------------
@pytest.mark.slow  # the whole job: about half a minute on 2 busy CPU cores
def test_the_job_trains_and_evaluates_a_gguf_base(tiny_model_dir, tmp_path, run_job, fake_hub):
    from tiny_gguf import write_llama_gguf

    gguf = write_llama_gguf(
        tiny_model_dir,
        tmp_path / "model" / "tiny-q8_0.gguf",
        metadata={"general.source.url": "https://huggingface.co/acme/tiny-llama"},
    )
    hf_home = tmp_path / "hf"
    env = {
        **GGUF_RUN,
        "BASE_MODEL": str(gguf.parent),  # a folder holding the file, and the file named by GGUF_FILE
        "GGUF_FILE": gguf.name,
        "CHAT_TEMPLATE": "llama3",
        "OUTPUT_DIR": str(tmp_path / "outputs"),
        "RUN_NAME": "gguf",
        "HUB_REPO_ID": "alice/gguf-test",
        "HF_TOKEN": "hf_test",
        "HF_HOME": str(hf_home),
    }
    result = run_job(env, "run")
    assert result.exit_code == 0, result.output[-4000:]
    paths = RunPaths(tmp_path / "outputs" / "gguf")

    # Converted once for the whole run: format, train, evaluate and push all loaded the same folder.
    assert len(re.findall(r"converting tiny-q8_0\.gguf", result.output)) == 1, result.output[-4000:]
    (folder,) = hf_home.glob("hippocratically/gguf/*/transformers-*/float32")
    assert (folder / "model.safetensors").is_file() and (folder / gguf_base.SOURCE_FILE).is_file()
    assert folder.parts[-3] == gguf_base.sha256(gguf)

    # Formatted with the llama3 template, trained on the reply and its <|eot_id|>.
    tok = load_tokenizer(settings(BASE_MODEL=str(paths.adapter)), str(paths.adapter))
    row = min(
        (json.loads(line) for line in paths.train_tokens.read_text().splitlines()), key=lambda r: len(r["input_ids"])
    )
    assert len(row["input_ids"]) < 256, "a reply cut at MAX_SEQ_LENGTH has no end of turn"
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    trained = tok.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert trained.endswith("<|eot_id|>") and text.endswith(trained)

    # The adapter records the GGUF it was trained on, not this machine's converted copy.
    adapter_config = json.loads((paths.adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(gguf.parent)
    record = json.loads(paths.base_model.read_text())
    assert record["file"] == gguf.name and record["sha256"] == gguf_base.sha256(gguf)
    assert record["source_model"] == "acme/tiny-llama" and record["end_of_turn"] == ["<|eot_id|>"]

    # The card: base_model is the model the GGUF was converted from; the text names the file and how to load it.
    card = (fake_hub.uploads[0]["copy"] / "README.md").read_text()
    assert "\nbase_model: acme/tiny-llama\n" in card
    assert f"the GGUF file `{gguf.name}`" in card and "GgufConfig(gguf_file=GGUF, dequantize=True)" in card
    assert json.loads((paths.root / "eval" / "metrics.json").read_text())["tuned"]["eval_loss"] > 0


def test_the_dequantized_weights_are_the_original_models(tiny_model_dir, tiny_gguf, tmp_path, monkeypatch):
    """Transformers' loader undoes llama.cpp's query/key permutation: the converted weights are the original
    model's, up to Q8_0's rounding (a wrong permutation or tensor mapping is off by the weights' own size)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = settings(BASE_MODEL=str(tiny_gguf), CHAT_TEMPLATE="llama3", QUANTIZATION="none")
    folder = gguf_base.prepare(cfg, torch.float32)
    original, converted = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(folder / "model.safetensors")),
    )
    assert set(converted) == set(original) - {"lm_head.weight"}  # tied: the GGUF has no output.weight
    for name, w in original.items():
        if name in converted:
            scale = w.abs().max().item()
            assert (converted[name] - w).abs().max().item() <= scale / 100, name  # Q8_0: 1/127 of a block's max
    # The tokenizer read back from the file tokenizes as the original does.
    from transformers import AutoTokenizer

    text = "Hello doctor, I have had a fever <|eot_id|> since two days."
    assert (
        AutoTokenizer.from_pretrained(folder)(text).input_ids
        == AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    )


def test_a_second_process_reuses_the_converted_folder(tiny_gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = settings(BASE_MODEL=str(tiny_gguf), CHAT_TEMPLATE="llama3")
    first = gguf_base.prepare(cfg, torch.float32)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO", logger="job.gguf_base")
    assert gguf_base.prepare(cfg, torch.float32) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp and "converting" not in caplog.text
    assert gguf_base.prepare(cfg, torch.bfloat16).name == "bfloat16"  # another dtype is another folder


# --- what the file's header tells -----------------------------------------------------------------------------
def test_the_header_reader_gives_the_files_metadata(tiny_model_dir, tmp_path):
    from tiny_gguf import write_llama_gguf

    path = write_llama_gguf(
        tiny_model_dir,
        tmp_path / "t.gguf",
        chat_template="{{ messages }}",
        metadata={"general.source.repo_url": "https://huggingface.co/google/gemma-3-270m/"},
    )
    meta = gguf_base.read_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["tokenizer.chat_template"] == "{{ messages }}"
    assert meta["tokenizer.ggml.tokens"] == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert gguf_base.source_model(meta) == "google/gemma-3-270m"


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"general.source.url": "https://huggingface.co/Qwen/Qwen3-0.6B"}, "Qwen/Qwen3-0.6B"),
        ({"general.source.huggingface.repository": "meta-llama/Llama-3.2-1B"}, "meta-llama/Llama-3.2-1B"),
        ({"general.source.url": "https://github.com/org/repo"}, None),  # not the Hub: no Hub id to name
        ({"general.source.url": "https://huggingface.co/a/b\nbase_model: evil/x"}, None),
        ({"general.name": "Gemma 3 270m", "general.basename": "gemma-3"}, None),  # a name is not a repo
    ],
)
def test_the_source_model_is_named_only_from_a_hub_address(metadata, expected):
    assert gguf_base.source_model(metadata) == expected


def test_card_base_model_is_the_source_or_the_gguf_repo_never_a_local_path():
    cfg = settings(BASE_MODEL="/models/x.gguf")
    assert card_data(cfg, {"source_model": "google/gemma-3-270m", "hub_repo": None}).base_model == "google/gemma-3-270m"
    assert card_data(cfg, {"source_model": None, "hub_repo": "someone/gemma-GGUF"}).base_model == "someone/gemma-GGUF"
    assert card_data(cfg, {"source_model": None, "hub_repo": None}).base_model is None


def test_a_hub_repo_with_gguf_file_downloads_that_file(tiny_gguf, monkeypatch):
    import huggingface_hub

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(tiny_gguf)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    cfg = settings(BASE_MODEL="someone/tiny-GGUF", GGUF_FILE="tiny.gguf", CHAT_TEMPLATE="llama3")
    assert gguf_base.locate(cfg) == tiny_gguf and asked == [("someone/tiny-GGUF", "tiny.gguf")]
    assert gguf_base.hub_repo(cfg) == "someone/tiny-GGUF"


# --- CHAT_TEMPLATE ---------------------------------------------------------------------------------------------
def test_gemma_template_is_gemmas_own_format(turn_tokens_model):
    """Google's Gemma 3 format: the system message opens the first user turn, then a blank line; the assistant is
    "model"; each turn ends <end_of_turn> and a newline."""
    cfg = settings(BASE_MODEL=str(turn_tokens_model), CHAT_TEMPLATE="gemma", SYSTEM_PROMPT="Be careful.")
    tok = load_tokenizer(cfg)
    text = tok.apply_chat_template(build_messages(cfg, " My head hurts. ", reply=REPLY + "\n"), tokenize=False)
    bos = tok.bos_token
    assert text == (
        f"{bos}<start_of_turn>user\nBe careful.\n\nMy head hurts.<end_of_turn>\n"
        f"<start_of_turn>model\n{REPLY}<end_of_turn>\n"
    )
    prompt = tok.apply_chat_template(build_messages(cfg, "Hi"), add_generation_prompt=True, tokenize=False)
    assert prompt == f"{bos}<start_of_turn>user\nBe careful.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    no_system = settings(BASE_MODEL=str(turn_tokens_model), CHAT_TEMPLATE="gemma", SYSTEM_PROMPT="")
    assert tok.apply_chat_template(build_messages(no_system, "Hi"), tokenize=False) == (
        f"{bos}<start_of_turn>user\nHi<end_of_turn>\n"
    )


@pytest.mark.parametrize("name, end", [("gemma", "<end_of_turn>"), ("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>")])
def test_each_shipped_template_marks_the_trained_tokens_and_its_end_of_turn(turn_tokens_model, name, end):
    """The {% generation %} markers cover exactly what the format stage trains (the reply and what ends it), and
    the end-of-turn token is trained and stops generation."""
    cfg = settings(BASE_MODEL=str(turn_tokens_model), CHAT_TEMPLATE=name, MAX_SEQ_LENGTH=512)
    tok = load_tokenizer(cfg)
    item, status = tokenize_row(cfg, tok, single_turn("My head hurts.", REPLY))
    marked = tok.apply_chat_template(
        build_messages(cfg, "My head hurts.", reply=REPLY),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert status == "ok" and list(marked["input_ids"]) == item["input_ids"]
    assert list(marked["assistant_masks"]) == item["completion_mask"]
    trained = [t for t, m in zip(item["input_ids"], item["completion_mask"]) if m]
    end_id = tok.convert_tokens_to_ids(end)
    assert end_id in trained and tok.decode(trained).startswith(REPLY)
    assert end_id in end_of_turn_ids(tok) and tok.eos_token_id in end_of_turn_ids(tok)


def test_a_template_file_is_used_as_given(turn_tokens_model, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text((Path(gguf_base.__file__).parent / "templates" / "chat" / "chatml.jinja").read_text())
    cfg = settings(BASE_MODEL=str(turn_tokens_model), CHAT_TEMPLATE=str(path))
    assert (
        load_tokenizer(cfg)
        .apply_chat_template(build_messages(cfg, "Hi"), tokenize=False)
        .startswith("<|im_start|>system\n")
    )


def test_a_template_whose_turn_end_is_not_a_token_is_refused(tiny_model_dir):
    """ChatML on a Llama vocabulary: <|im_end|> would be pieces of text, and generation could never stop at it."""
    with pytest.raises(ConfigError) as err:
        load_tokenizer(settings(BASE_MODEL=str(tiny_model_dir), CHAT_TEMPLATE="chatml"))
    assert "CHAT_TEMPLATE='chatml'" in str(err.value) and "not one token" in str(err.value)


def test_a_template_that_does_not_render_is_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError) as err:
        load_tokenizer(settings(BASE_MODEL=str(tiny_model_dir), CHAT_TEMPLATE=str(path)))
    assert f"CHAT_TEMPLATE={str(path)!r}" in str(err.value) and "does not render" in str(err.value)


# --- generation stops at the end of turn ------------------------------------------------------------------------
def test_evaluation_stops_at_the_templates_end_of_turn_not_only_eos(turn_tokens_model, monkeypatch):
    """Gemma's tokenizer ends text with <eos> but a turn with <end_of_turn>: the decoder is given both."""
    cfg = settings(BASE_MODEL=str(turn_tokens_model), CHAT_TEMPLATE="gemma", MAX_NEW_TOKENS=3, EVAL_BATCH_SIZE=4)
    tok = load_tokenizer(cfg)
    given = []

    def fake_greedy(model, ids, mask, new_tokens, eos_id, pad_id, repetition_penalty):
        assert repetition_penalty == cfg.REPETITION_PENALTY == 1.0  # plain greedy unless REPETITION_PENALTY is set
        given.append(eos_id)
        return torch.full((ids.shape[0], new_tokens), pad_id)

    monkeypatch.setattr(evaluate.decode, "greedy", fake_greedy)
    model = torch.nn.Linear(1, 1)
    evaluate.generate(model, tok, [build_messages(cfg, "Hi")], cfg)
    assert given and set(given[0]) == {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}


def test_greedy_stops_at_any_of_several_end_tokens(tiny_model_dir):
    from job.decode import greedy
    from job.model import load_model

    cfg = settings(BASE_MODEL=str(tiny_model_dir), QUANTIZATION="none")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, "fp32").eval()
    torch.manual_seed(0)
    for p in model.parameters():
        if p.ndim == 2:
            p.data.normal_(0, 0.2)
    tok.padding_side = "left"
    batch = tok.apply_chat_template(
        [build_messages(cfg, "My child has a fever.")],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    free = greedy(model, batch["input_ids"], batch["attention_mask"], 12, [-1], tok.pad_token_id)[0].tolist()
    stop = free[4]
    assert stop not in free[:4]
    out = greedy(model, batch["input_ids"], batch["attention_mask"], 12, [-1, stop], tok.pad_token_id)[0].tolist()
    assert out[:5] == free[:5] and set(out[5:]) == {tok.pad_token_id}


def test_the_record_names_this_runs_file_though_the_converted_folder_is_shared(tiny_gguf, tmp_path, monkeypatch):
    """Two names for the same bytes share one converted folder; each run's record names its own file and repo."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    copy = tmp_path / "renamed-q8.gguf"
    shutil.copy(tiny_gguf, copy)
    first = settings(BASE_MODEL=str(tiny_gguf), CHAT_TEMPLATE="llama3")
    second = settings(BASE_MODEL=str(copy), CHAT_TEMPLATE="llama3")
    folder = gguf_base.prepare(first, torch.float32)
    assert gguf_base.prepare(second, torch.float32) == folder
    assert gguf_base.source_record(second, folder)["file"] == "renamed-q8.gguf"
    assert gguf_base.source_record(first, folder)["file"] == tiny_gguf.name


def test_generation_dequantizes_the_4bit_weights_the_cpu_kernel_repacked(tiny_model_dir):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first no-grad forward in eval mode (the eval-loss
    pass); dequantizing for generation must give the weights of before, not a reading of the repacked bytes."""
    import bitsandbytes.functional as bnbf

    from job.model import four_bit_layers, load_model

    cfg = settings(BASE_MODEL=str(tiny_model_dir))
    model = load_model(cfg, "fp32").eval()
    layers = dict((id(m), m) for m in four_bit_layers(model))
    before = {k: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).clone() for k, m in layers.items()}
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack the weights")
    garbled = {k: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) for k, m in layers.items()}
    assert evaluate.unpack_cpu_layout(model) == len(layers)
    for key, m in layers.items():
        # The repacking keeps the block scales in bf16: the weights come back within bf16's rounding of them.
        restored = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert ((restored - before[key]).norm() / before[key].norm()).item() < 1e-2
        assert ((garbled[key] - before[key]).norm() / before[key].norm()).item() > 0.5  # what dequantize read before
    plain = model.dequantize()
    assert all(type(m).__name__ != "Linear4bit" for m in plain.modules())
