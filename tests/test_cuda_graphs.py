"""job/speedups/cuda_graphs.py: the fixed-shape padding that CUDA graphs need leaves the loss and the gradients
unchanged. (The capture itself needs CUDA: the last test runs on a GPU; `make bench` compares graphed and eager
steps there.)"""

import pytest
import torch
from conftest import tiny_family

from job.config import load_settings
from job.files import read_jsonl
from job.formats import single_turn
from job.formatting import tokenize_row
from job.model import load_model, load_tokenizer, lora_config
from job.speedups.cuda_graphs import FixedShape, slots_for


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


TOKENS, MAX_LENGTH = 4 * 256, 256  # the captured shape in these tests: 4 packed rows of 256 tokens


def _batches(tiny_model_dir):
    """Settings (fp32-exact: no quantization, no dropout), tokenizer, TRL's padding-free collator, three fixture
    conversations, and that collator padded to the captured shape."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job.__main__ import FIXTURE

    cfg = load_settings(
        {"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none", "LORA_DROPOUT": "0", "MAX_SEQ_LENGTH": "256"},
        env_file=None,
    )
    tok = load_tokenizer(cfg)
    rows = [tokenize_row(cfg, tok, single_turn(r["Patient"], r["Doctor"]))[0] for r in read_jsonl(FIXTURE)]
    examples = [{"input_ids": r["input_ids"], "seq_lengths": [len(r["input_ids"])]} for r in rows if r][:3]
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    fixed = FixedShape(collate, TOKENS, MAX_LENGTH, slots_for(TOKENS, MAX_LENGTH), tok.pad_token_id)
    return cfg, tok, collate, examples, fixed


def _lora_model(cfg, precision: str):
    """The tiny model with a seeded adapter whose B is non-zero (B starts at zero), so A gets gradients too."""
    from peft import get_peft_model

    base = load_model(cfg, precision)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(cfg, base))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def test_padding_to_the_captured_shape_changes_no_loss_or_gradient(tiny_model_dir):
    cfg, tok, collate, examples, fixed = _batches(tiny_model_dir)
    tokens, max_length = TOKENS, MAX_LENGTH

    plain, padded = collate(examples), fixed(examples)
    real = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape == padded["labels"].shape == padded["position_ids"].shape == (1, tokens)
    assert padded["cu_seq_lens_q"].shape == (slots_for(tokens, max_length) + 1,)
    assert padded["cu_seq_lens_q"][:4].tolist() == plain["cu_seq_lens_q"].tolist()
    assert padded["cu_seq_lens_q"][-1] == tokens and padded["max_length_q"] == max_length
    assert (padded["labels"][0, real:] == -100).all()
    pieces = padded["cu_seq_lens_q"].diff()
    assert pieces.max() <= max_length and pieces[3:].sum() == tokens - real  # padding in pieces the kernel takes
    assert (padded["position_ids"][0, real:][padded["position_ids"][0, real:] == 0]).numel() == (pieces[3:] > 0).sum()

    model = _lora_model(cfg, "fp32")
    loss, grads = _loss_and_grads(model, plain)
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    # fp32 on CPU: the same per-conversation attention and the same masked tokens, summed in another order
    assert abs(loss_padded - loss) <= 1e-5 * abs(loss)
    assert (grads_padded - grads).norm() <= 1e-4 * grads.norm()

    # A micro-batch with more conversations than the capture holds is left as it is (it runs eager).
    few = FixedShape(collate, tokens, max_length, 3, tok.pad_token_id)
    assert few(examples)["input_ids"].shape[1] == real
    # and one longer than the captured tokens
    assert FixedShape(collate, real - 1, max_length, 99, tok.pad_token_id)(examples)["input_ids"].shape[1] == real


def test_graphs_only_where_the_step_can_be_captured(monkeypatch):
    from job import attention
    from job.config import with_overrides
    from job.speedups.cuda_graphs import use_graphs, why_not

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "flash_varlen", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_settings({}, env_file=None)
    assert use_graphs(cfg, compiled=False)
    assert not use_graphs(cfg, compiled=True)
    for change in (
        {"CUDA_GRAPHS": False},
        {"PACKING": False},  # padded rows need a mask, which the graph does not pass
        {"GRADIENT_CHECKPOINTING": True},
        {"ATTN_IMPLEMENTATION": "sdpa"},  # would attend across the packed conversations without the varlen kernel
    ):
        assert not use_graphs(with_overrides(cfg, **change), compiled=False), change
    assert not use_graphs(cfg, compiled=False, attn="eager")  # loaded eager (Gemma 2's logit soft-capping)
    assert "the model attends with eager" in why_not(cfg, compiled=False, attn="eager")
    assert "reads their bounds on the host" in why_not(cfg, compiled=False, attn="eager_varlen")  # Gemma 2 packed
    assert why_not(with_overrides(cfg, PACKING=False), compiled=False).startswith("PACKING=false")
    monkeypatch.setenv("WORLD_SIZE", "2")  # each DDP rank captures its own layers (the GPU test below)
    assert use_graphs(cfg, compiled=False)
    monkeypatch.setattr(attention, "flash_varlen", lambda: False)  # a T4 or V100: packed rows take the host loop
    assert not use_graphs(cfg, compiled=False)
    monkeypatch.setattr(attention, "flash_varlen", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_graphs(cfg, compiled=False)


def _attached(monkeypatch, capture):
    """A stand-in trainer with cuda_graphs.attach applied (BATCH_SIZE 4 x MAX_SEQ_LENGTH 256), `capture` in place of
    capture_layers; returns the trainer and the callback attach added."""
    import types

    from job.speedups import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "capture_layers", capture)
    callbacks = []
    pad = types.SimpleNamespace(pad_token_id=7)
    trainer = types.SimpleNamespace(data_collator="TRL's", processing_class=pad, add_callback=callbacks.append)
    cuda_graphs.attach(trainer, load_settings({"BATCH_SIZE": "4", "MAX_SEQ_LENGTH": "256"}, env_file=None))
    (callback,) = callbacks
    return trainer, callback


def test_a_failed_capture_stops_the_job_with_the_way_out(monkeypatch):
    import types

    from job.errors import BUG, JobError

    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    _, callback = _attached(monkeypatch, fail)
    with pytest.raises(JobError, match="CUDA_GRAPHS=false") as caught:
        callback.on_train_begin(types.SimpleNamespace(bf16=True, fp16=False), None, None, model=None)
    assert "stream is capturing" in str(caught.value) and caught.value.exit_code == BUG


def test_the_trainer_pads_to_the_captured_shape_and_captures_in_its_precision(monkeypatch):
    """attach: the trainer's collator padded to BATCH_SIZE x MAX_SEQ_LENGTH tokens, and a callback that captures the
    layers when training begins, under the Trainer's mixed precision (bf16 or fp16 autocast, or none)."""
    import types

    captured = []
    trainer, callback = _attached(monkeypatch, lambda *a, **k: captured.append((a, k)))
    fixed = trainer.data_collator
    assert isinstance(fixed, FixedShape) and fixed.inner == "TRL's"
    assert (fixed.tokens, fixed.max_length, fixed.slots, fixed.pad_id) == (1024, 256, slots_for(1024, 256), 7)
    precisions = ((True, False, torch.bfloat16), (False, True, torch.float16), (False, False, torch.float32))
    for bf16, fp16, dtype in precisions:
        callback.on_train_begin(types.SimpleNamespace(bf16=bf16, fp16=fp16), None, None, model="model")
        args, kwargs = captured.pop()
        assert args == ("model", 1024, 256, fixed.slots, dtype) and kwargs == {"autocast": bf16 or fp16}


def _tiny_gemma3(tiny_model_dir, out):
    """The tiny Gemma 3 (a 16-token sliding window: shorter than the conversations) saved with the tiny tokenizer."""
    from conftest import tiny_gemma3_config
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    Gemma3ForCausalLM(tiny_gemma3_config(tok, 16)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize(
    "ddp,family",
    [(False, "llama"), (True, "llama"), (False, "gemma3"), (False, "qwen2"), (False, "qwen3"), (False, "mistral")]
    + [(False, "phi3")],
    ids=["one-process", "ddp", "gemma3", "qwen2", "qwen3", "mistral", "phi3"],
)
def test_graphed_layers_give_the_eager_loss_and_gradients(tiny_model_dir, tmp_path, ddp, family):
    """The captured layers replay the eager step, also inside DDP (which once invalidated the capture: its
    gradient accumulators belong to the default stream), and for Gemma 3 (sliding-window layers, a rotary base
    per layer type), and for the other families that take the packed path (conftest.FAMILIES; Gemma 2 trains eager,
    without graphs). bf16 with fp32 LoRA weights under autocast, as the Trainer trains; flash attention's
    backward is not deterministic, so two eager steps set the noise floor."""
    import torch.distributed as dist

    from job.speedups.cuda_graphs import capture_layers

    if family == "gemma3":
        tiny_model_dir = _tiny_gemma3(tiny_model_dir, tmp_path / "gemma3")
    elif family != "llama":
        from transformers import AutoTokenizer

        tiny_model_dir = tiny_family(family, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / family)
    cfg, _, _, examples, fixed = _batches(tiny_model_dir)
    tokens, max_length = TOKENS, MAX_LENGTH
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in fixed(examples).items()}
    model = _lora_model(cfg, "bf16")
    model.train()
    step_model = model
    if ddp:
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        step_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return loss.item(), grads

    try:
        (loss, grads), (_, again) = step(), step()
        release = capture_layers(model, tokens, max_length, fixed.slots, torch.bfloat16, autocast=True)
        graphed_loss, graphed = step()
        graphed_loss2, graphed2 = step()  # a replay again: the clone hooks keep .grad apart from the graph's buffers
        release()
    finally:
        if ddp:
            dist.destroy_process_group()
    layers = model.config.num_hidden_layers
    assert release.calls == {"graph": 2 * layers, "eager": 0}
    eps = 2**-8  # bf16's unit roundoff
    assert abs(graphed_loss - loss) <= eps * abs(loss) and graphed_loss2 == graphed_loss
    floor = ((again - grads).norm() / grads.norm()).item()
    assert ((graphed - grads).norm() / grads.norm()).item() <= max(2 * floor, eps)
    assert ((graphed2 - graphed).norm() / graphed.norm()).item() <= max(2 * floor, eps)
