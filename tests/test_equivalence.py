"""The optimized training path (padding-free packing) computes the same loss and gradients as
the plain padded path on the same rows. The GPU benchmark repeats this check in bf16."""

import pytest
import torch

from bench.equivalence import equivalence
from bench.throughput import LLAMA_3_2_3B, flops_per_token
from job import attention
from job.config import load_settings, with_overrides
from job.files import read_jsonl
from job.formatting import tokenize_row
from job.model import load_model, load_tokenizer, lora_config


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa"])
def test_packed_equals_padded(tiny_model_dir, attn, monkeypatch):
    from peft import get_peft_model
    from transformers import LlamaConfig

    from job.__main__ import FIXTURE

    cfg = load_settings(
        {
            "BASE_MODEL": str(tiny_model_dir),
            "QUANTIZATION": "none",
            "LORA_DROPOUT": "0",
            "MAX_SEQ_LENGTH": "2048",
            "ATTN_IMPLEMENTATION": attn,
        },
        env_file=None,
    )
    calls = []
    reference = attention._per_conversation
    monkeypatch.setattr(attention, "_per_conversation", lambda *a: calls.append(a[3]) or reference(*a))
    tok = load_tokenizer(cfg)
    rows = [
        tokenize_row(cfg, tok, {"patient": r["Patient"], "doctor": r["Doctor"]})[0] for r in read_jsonl(FIXTURE)[:6]
    ]
    assert len({len(r["input_ids"]) for r in rows}) > 1, "rows of different lengths make padding matter"
    base = load_model(cfg, "fp32")
    torch.manual_seed(0)  # before get_peft_model, which draws the LoRA A matrices: no dependence on test order
    model = get_peft_model(base, lora_config(cfg, base))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make it non-zero so A gets gradients too
            p.data.normal_(0, 0.02)
    e = equivalence(model, rows, tok.pad_token_id)
    if attn == "sdpa_varlen":  # the packed pass went through our varlen path, once per layer, with all 6 rows
        assert len(calls) == model.config.num_hidden_layers and all(len(cu) == 7 for cu in calls), calls
    else:
        assert not calls
    assert e["loss_rel_diff"] < 1e-5, e
    assert e["grad_cosine"] > 0.99999, e
    assert e["grad_rel_l2"] < 1e-3, e
    # and the check can fail: different rows give a different loss
    other = equivalence(model, rows[:3], tok.pad_token_id)
    assert abs(other["loss_padded"] - e["loss_padded"]) > 1e-4

    # DESIGN.md: about 13.3 GFLOP per trained token for Llama-3.2-3B
    f = flops_per_token(LlamaConfig(**LLAMA_3_2_3B), mean_seq_len=300, lora_params=2_293_760)
    assert 12.8e9 < f < 13.8e9, f


def _lora_with_weights(cfg, base, weights=None):
    from peft import get_peft_model

    torch.manual_seed(0)  # before get_peft_model, which draws the LoRA A matrices: no dependence on test order
    model = get_peft_model(base, lora_config(cfg, base))
    if weights is None:
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make it non-zero so A gets gradients too
                p.data.normal_(0, 0.02)
    else:
        assert not model.load_state_dict(weights, strict=False).unexpected_keys
    return model


def test_dequantized_base_trains_like_the_4bit_kernels(tiny_model_dir):
    """DEQUANTIZE_BASE: the NF4 base held in 16-bit (here fp32, on CPU) gives the loss and LoRA gradients
    of bitsandbytes' 4-bit layers; the unquantized base, with other weights, does not."""
    from job.__main__ import FIXTURE
    from job.model import dequantize_for_training

    env = {"BASE_MODEL": str(tiny_model_dir), "LORA_DROPOUT": "0", "MAX_SEQ_LENGTH": "2048"}
    cfg = load_settings({**env, "DEQUANTIZE_BASE": "true"}, env_file=None)
    tok = load_tokenizer(cfg)
    rows = [
        tokenize_row(cfg, tok, {"patient": r["Patient"], "doctor": r["Doctor"]})[0] for r in read_jsonl(FIXTURE)[:6]
    ]
    plain = _lora_with_weights(cfg, load_model(cfg, "fp32"))
    assert any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    lora = {k: v for k, v in plain.state_dict().items() if "lora_" in k}

    base = load_model(cfg, "fp32")
    assert dequantize_for_training(cfg, base)
    assert not any(type(m).__name__ == "Linear4bit" for m in base.modules())
    e = equivalence(_lora_with_weights(cfg, base, lora), rows, tok.pad_token_id, plain_model=plain)
    # Same NF4 weights (bitsandbytes' own dequantize_4bit, in fp32). bitsandbytes' CPU 4-bit matmul does not
    # reach fp32 accuracy: its results sit at bf16 level, whose rounding is 2^-9 (2.0e-3) relative per
    # element; seen: gradients 9.8e-4 apart (rel. L2), losses 1.5e-6 (a mean over ~2k tokens, so errors
    # cancel). So: gradients within 2^-9, the loss within 1e-5. The unquantized base, with other weights,
    # is far outside both (below: gradients 0.12 apart, losses 1.8e-4).
    assert e["loss_rel_diff"] < 1e-5, e
    assert e["grad_cosine"] > 0.99999, e
    assert e["grad_rel_l2"] < 2**-9, e

    unquantized = load_model(load_settings({**env, "QUANTIZATION": "none"}, env_file=None), "fp32")
    other = equivalence(_lora_with_weights(cfg, unquantized, lora), rows, tok.pad_token_id, plain_model=plain)
    assert other["loss_rel_diff"] > 1e-4 and other["grad_rel_l2"] > 2e-2, other


def test_dequantize_base_auto_needs_a_gpu_with_room(tiny_model_dir, monkeypatch):
    """auto: never on CPU; on a GPU only where the 16-bit copy takes at most a quarter of its memory."""
    import types

    from job.model import dequantize_for_training

    env = {"BASE_MODEL": str(tiny_model_dir)}
    auto = load_settings(env, env_file=None)
    assert auto.DEQUANTIZE_BASE == "auto"
    assert not dequantize_for_training(auto, load_model(auto, "fp32"))  # CPU
    assert not dequantize_for_training(load_settings({**env, "DEQUANTIZE_BASE": "false"}, env_file=None), None)
    assert not dequantize_for_training(load_settings({**env, "QUANTIZATION": "none"}, env_file=None), None)

    model = load_model(auto, "fp32")
    packed = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    size = sum(m.in_features * m.out_features for m in packed) * 4  # fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for total, expected in ((4 * size - 1, False), (4 * size, True)):
        gpu = types.SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, gpu=gpu: gpu)
        assert dequantize_for_training(auto, model) is expected, total
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules()) is not expected


def test_shared_batches_answer_like_the_base_and_the_tuned_model_apart(tiny_model_dir, tmp_path):
    """The evaluate stage's default: base and tuned answers decoded as rows of the same batches, the
    adapter switched per row. Each answer must be the one its model gives on its own."""
    from peft import PeftModel, get_peft_model

    from job.evaluate import generate, shared_model_for_generation
    from job.model import build_messages

    cfg = load_settings(
        {"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none", "EVAL_BATCH_SIZE": "4", "MAX_NEW_TOKENS": "12"},
        env_file=None,
    )
    tok = load_tokenizer(cfg)
    base = load_model(cfg, "fp32")
    torch.manual_seed(0)
    for p in base.parameters():  # the tiny model repeats one blank token; larger random weights vary
        if p.ndim == 2:
            p.data.normal_(0, 0.2)
    lora = lora_config(cfg, base)
    lora.init_lora_weights = False  # a non-zero lora_B, as after training
    trained = get_peft_model(base, lora)
    trained.save_pretrained(tmp_path / "adapter")
    tuned = PeftModel.from_pretrained(trained.unload(), tmp_path / "adapter")  # as load_tuned does

    prompts = ["I have a headache.", "My child has a fever of 39 degrees since yesterday evening, what now?", "Hi"]
    prompts += ["Can I take ibuprofen with paracetamol?", "Rash on arm", "I feel dizzy when I stand up quickly."]
    prompts += ["My knee hurts after running five kilometres."]  # 14 rows: batches of 4, 4, 4 and 2
    conversations = [build_messages(cfg, p) for p in prompts]
    n = len(conversations)
    shared = shared_model_for_generation(tuned, tmp_path / "adapter")
    both, speed = generate(shared, tok, conversations * 2, cfg, [False] * n + [True] * n)
    with shared.disable_adapter():
        alone_base, _ = generate(shared, tok, conversations, cfg)
    alone_tuned, _ = generate(shared, tok, conversations, cfg)

    assert both[:n] == alone_base and both[n:] == alone_tuned
    assert sum(a != b for a, b in zip(alone_base, alone_tuned)) >= n // 2, "the adapter must change the answers"
    assert len(set(alone_base)) > 1 and all(alone_base), alone_base  # real, distinct answers
    assert speed["answers"] == 2 * n and speed["new_tokens"] > 0
    scales = [m.scaling["default"] for m in shared.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert scales and all(s == lora.lora_alpha / lora.r for s in scales), "per-row scales must be put back"


def test_regional_compile_covers_every_decoder_layer(tiny_model_dir, monkeypatch):
    from job.train import compile_layers, use_compile, use_liger

    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none"}, env_file=None)
    model = load_model(cfg, "fp32")
    names = [n for n, _ in model.named_parameters()]
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)))
    assert compile_layers(model) == model.config.num_hidden_layers
    assert [m for m, _ in compiled] == list(model.model.layers)  # each decoder layer, nothing else
    assert all(kw == {"dynamic": True} for _, kw in compiled)  # one graph for every packed-row length
    assert [n for n, _ in model.named_parameters()] == names  # in place: PEFT's state-dict keys unchanged
    # CPU: neither compile nor Liger is used, whatever the settings say
    on = load_settings({"TORCH_COMPILE": "true", "LIGER_KERNEL": "true"}, env_file=None)
    assert not use_compile(on, []) and not use_liger(on, compiled=False)


def test_auto_compiles_only_runs_long_enough_to_repay_it(demo_run, monkeypatch):
    """TORCH_COMPILE=auto decides from the optimizer steps planned before training (the rows packed by TRL's
    own packer), and only where the base is held in 16-bit: the plan equals the steps the demo's training took."""
    import json

    from job import train
    from job.paths import RunPaths

    paths = RunPaths(demo_run.run_dir)
    cfg = load_settings(demo_run.env, env_file=None)
    history = json.loads(paths.train_log.read_text())["log_history"]
    taken = max(e["step"] for e in history)
    planned = train.planned_steps(cfg, read_jsonl(paths.train_tokens))
    assert planned == taken
    assert train.planned_steps(with_overrides(cfg, EPOCHS=4.0), read_jsonl(paths.train_tokens)) == 2 * taken

    monkeypatch.setattr(train, "_cuda", lambda: True)
    auto, never, always = (with_overrides(cfg, TORCH_COMPILE=v) for v in ("auto", "false", "true"))
    monkeypatch.setattr(train, "planned_steps", lambda cfg, rows: train.COMPILE_AFTER_STEPS - 1)
    assert not train.use_compile(auto, []) and not train.use_compile(never, []) and train.use_compile(always, [])
    monkeypatch.setattr(train, "planned_steps", lambda cfg, rows: train.COMPILE_AFTER_STEPS)
    assert train.use_compile(auto, []) and not train.use_compile(never, [])
    # The base packed in 4 bits: auto never compiles (slower there), true still does
    assert not train.use_compile(auto, [], packed_base=True) and train.use_compile(always, [], packed_base=True)


def test_training_patches_of_the_model_code_stay_with_the_trained_model(tiny_model_dir, tmp_path, monkeypatch):
    """Liger patches the trained model's modules and, process-wide, Transformers' modeling module; after the
    training block every later model (evaluation's) is Transformers' own, while the trained model keeps its
    kernels. Liger needs Triton, absent here, so we patch the way apply_liger_kernel_to_llama does."""
    import sys
    from types import MethodType

    from peft import get_peft_model

    from job.evaluate import load_tuned
    from job.model import model_code_restored

    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none"}, env_file=None)
    base = load_model(cfg, "fp32")
    trained = get_peft_model(base, lora_config(cfg, base))
    trained.save_pretrained(tmp_path / "adapter")
    code = sys.modules[type(trained.get_base_model()).__module__]
    stock = (code.LlamaRMSNorm, code.LlamaMLP, code.apply_rotary_pos_emb, code.LlamaForCausalLM.forward)

    class PatchedNorm(code.LlamaRMSNorm):
        pass

    class PatchedMLP(code.LlamaMLP):
        pass

    def patched_rope(*args, **kwargs):
        raise AssertionError("a patched rotary embedding ran in evaluation")

    def patched_forward(self, *args, **kwargs):
        raise AssertionError("a patched causal-LM forward ran in evaluation")

    def instance_norm(self, x):
        return x

    with model_code_restored(trained):  # what train.run wraps around trainer.train()
        # through monkeypatch, so a broken restore cannot leak the patch into later tests
        monkeypatch.setattr(code, "LlamaRMSNorm", PatchedNorm)
        monkeypatch.setattr(code, "LlamaMLP", PatchedMLP)
        monkeypatch.setattr(code, "apply_rotary_pos_emb", patched_rope)
        monkeypatch.setattr(code.LlamaForCausalLM, "forward", patched_forward)
        norm = trained.get_base_model().model.norm
        norm.forward = MethodType(instance_norm, norm)  # the per-module part of the patch
        during = load_model(cfg, "fp32")
    assert type(during.model.norm) is PatchedNorm  # inside the block the patch reaches new models

    assert (code.LlamaRMSNorm, code.LlamaMLP, code.apply_rotary_pos_emb, code.LlamaForCausalLM.forward) == stock
    assert norm.forward.__func__ is instance_norm  # the trained model keeps its own kernels
    tuned = load_tuned(cfg, tmp_path / "adapter", "fp32")
    inner = tuned.get_base_model()
    assert type(inner.model.norm) is stock[0] and type(inner.model.layers[0].mlp) is stock[1]
    out = tuned(input_ids=torch.tensor([[1, 2, 3]]))  # runs: no patched forward or rotary embedding left
    assert torch.isfinite(out.logits).all()


def _first_step_gradients(cfg, paths) -> torch.Tensor:
    """The LoRA gradients that the first optimizer step applies (after accumulation and clipping)."""
    from transformers import TrainerCallback

    from job.train import build_trainer

    seen = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append(torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.requires_grad]))

    trainer = build_trainer(cfg, paths, "fp32", max_steps=1, save_strategy="no", report_to=[], logging_steps=1)
    trainer.add_callback(Grab())
    trainer.train()
    return seen[0]


def test_lean_path_splits_micro_batches_into_the_same_optimizer_step(demo_run, tmp_path, monkeypatch):
    """Where the base stays in 4 bits on a GPU, each micro-batch is split in two with GRAD_ACCUM doubled. The
    first optimizer step then applies the gradients of the unsplit step: the same sequences, and the loss
    normalised by the tokens of both micro-batches (TRL's num_items_in_batch). fp32 on CPU; a step over other
    sequences (BATCH_SIZE=2 alone) is far from it, so the comparison can fail."""
    from job import train
    from job.paths import RunPaths

    paths = RunPaths(tmp_path / "run")
    paths.data.mkdir(parents=True)
    paths.train_tokens.write_bytes(RunPaths(demo_run.run_dir).train_tokens.read_bytes())
    env = {**demo_run.env, "LORA_DROPOUT": "0", "QUANTIZATION": "none", "GRAD_ACCUM": "1"}
    whole = _first_step_gradients(load_settings(env, env_file=None), paths)
    split = _first_step_gradients(load_settings({**env, "BATCH_SIZE": "2", "GRAD_ACCUM": "2"}, env_file=None), paths)
    other = _first_step_gradients(load_settings({**env, "BATCH_SIZE": "2"}, env_file=None), paths)
    assert whole.norm() > 0
    # the same sums of fp32 products, in two parts instead of one
    assert (split - whole).norm() <= 1e-5 * whole.norm()
    assert (other - whole).norm() > 1e-2 * whole.norm()

    # When it splits: 4-bit layers kept, on a GPU, an even BATCH_SIZE
    nf4 = load_settings({**env, "QUANTIZATION": "nf4", "BATCH_SIZE": "4", "GRAD_ACCUM": "3"}, env_file=None)
    four_bit = load_model(nf4, "fp32")
    unchanged = train.lean_micro_batches(nf4, four_bit)  # CPU: memory is not short
    assert (unchanged.BATCH_SIZE, unchanged.GRAD_ACCUM) == (4, 3)
    monkeypatch.setattr(train, "_cuda", lambda: True)
    lean = train.lean_micro_batches(nf4, four_bit)
    assert (lean.BATCH_SIZE, lean.GRAD_ACCUM) == (2, 6)
    assert train.lean_micro_batches(with_overrides(nf4, BATCH_SIZE=3), four_bit).BATCH_SIZE == 3
    assert train.lean_micro_batches(nf4, load_model(nf4, "fp32", quantization="none")).BATCH_SIZE == 4


def test_packed_rows_take_the_flash_kernel_only_on_a_gpu_that_has_it(monkeypatch):
    """FlashAttention-2 needs compute capability 8.0 (Ampere); a T4 (7.5) or V100 (7.0) takes the reference loop."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert attention.flash_varlen() is expected, capability


def test_job_trainer_keeps_trls_loss_and_metrics(demo_run, tmp_path, monkeypatch):
    """train.trainer_class repeats TRL's training loss so that its metrics stay on the GPU until a log line.
    Trained with it and with TRL's own SFTTrainer (two micro-batches a step, a log line every two steps), the
    logged loss, entropy, token accuracy and token count and the LoRA weights are the same: the same fp32 ops in
    the same order (the first step is logged alone). A TRL upgrade that changes its loss or its metrics fails
    here, and so does one that sends our training loss back to TRL's method (the speed-up would be gone)."""
    from trl import SFTTrainer

    from job.paths import RunPaths
    from job.train import build_trainer

    paths = RunPaths(tmp_path / "run")
    paths.data.mkdir(parents=True)
    paths.train_tokens.write_bytes(RunPaths(demo_run.run_dir).train_tokens.read_bytes())
    env = {**demo_run.env, "LORA_DROPOUT": "0", "QUANTIZATION": "none", "BATCH_SIZE": "2", "GRAD_ACCUM": "2"}
    cfg = load_settings(env, env_file=None)
    trl_calls = []
    stock = SFTTrainer.compute_loss
    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda *a, **k: trl_calls.append(1) or stock(*a, **k))

    def train(lean: bool):
        trainer = build_trainer(cfg, paths, "fp32", lean=lean, max_steps=4, save_strategy="no", logging_steps=2)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "entropy" in e]
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        return logs, weights

    ours, our_weights = train(lean=True)
    assert trl_calls == []  # every training micro-batch took our loss
    theirs, their_weights = train(lean=False)
    assert len(trl_calls) == 8  # 4 steps x 2 micro-batches
    assert len(ours) == len(theirs) == 3  # steps 1, 2 and 4
    for mine, trl in zip(ours, theirs):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert mine[key] == pytest.approx(trl[key], rel=1e-6), key
    assert ours[-1]["num_tokens"] > ours[0]["num_tokens"] > 0
    assert 0 < ours[0]["mean_token_accuracy"] < 1 and ours[0]["entropy"] > 0
    torch.testing.assert_close(our_weights, their_weights, rtol=1e-6, atol=1e-7)


def test_models_that_cap_attention_logits_load_with_eager_attention():
    from transformers import Gemma2Config, LlamaConfig

    assert attention.attention_for(LlamaConfig(), "sdpa_varlen") == ("sdpa_varlen", None)
    chosen, why = attention.attention_for(Gemma2Config(attn_logit_softcapping=50.0), "sdpa_varlen")
    assert chosen == "eager" and "attn_logit_softcapping=50.0" in why
    assert attention.attention_for(Gemma2Config(attn_logit_softcapping=None), "sdpa")[0] == "sdpa"
