"""job/speedups/nf4_base.py: DEQUANTIZE_BASE where the GPU has room; elsewhere the memory-lean path's split
micro-batches make the same optimizer step. (The dequantized base's loss and gradients: tests/test_equivalence.py.)"""

import torch

from job.config import load_settings, with_overrides
from job.model import load_model
from job.speedups.nf4_base import RESERVE, activation_bytes, dequantize_for_training, lean_micro_batches


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
    four_bit, sixteen_bit = load_model(nf4, "fp32"), load_model(nf4, "fp32", quantization="none")
    unchanged = lean_micro_batches(nf4, four_bit)  # CPU: memory is not short
    assert (unchanged.BATCH_SIZE, unchanged.GRAD_ACCUM) == (4, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # after loading: it would place them on a GPU
    plenty = RESERVE + activation_bytes(nf4, four_bit.config, 4)  # bytes free: room for the whole micro-batch
    lean = lean_micro_batches(nf4, four_bit, free=plenty)
    assert (lean.BATCH_SIZE, lean.GRAD_ACCUM, lean.GRADIENT_CHECKPOINTING) == (2, 6, False)
    assert lean_micro_batches(with_overrides(nf4, BATCH_SIZE=3), four_bit, free=plenty).BATCH_SIZE == 3
    assert lean_micro_batches(nf4, sixteen_bit, free=plenty).BATCH_SIZE == 4

    # Short of memory, it splits further, to what fits, then recomputes activations (a 70B base on one card)
    one = activation_bytes(nf4, four_bit.config, 1)
    assert activation_bytes(nf4, four_bit.config, 2) == 2 * one  # linear in the tokens of a micro-batch
    assert activation_bytes(nf4, four_bit.config, 1, checkpointing=True) < one
    tight = lean_micro_batches(nf4, four_bit, free=RESERVE + one)
    assert (tight.BATCH_SIZE, tight.GRAD_ACCUM, tight.GRADIENT_CHECKPOINTING) == (1, 12, False)
    three = with_overrides(nf4, BATCH_SIZE=3)  # odd: no halving, straight to what fits
    assert lean_micro_batches(three, four_bit, free=RESERVE + one).BATCH_SIZE == 1
    short = lean_micro_batches(nf4, four_bit, free=RESERVE + one - 1)
    assert (short.BATCH_SIZE, short.GRAD_ACCUM, short.GRADIENT_CHECKPOINTING) == (1, 12, True)


def test_activation_estimate_matches_the_measured_peaks():
    """ACT_HIDDEN and ACT_MLP were fitted to two measured peaks of the 4-bit path (micro-batches of 2,048 tokens on
    an H100: Llama-3.2-3B ~4.9 GiB and Llama-3.1-8B ~8.4 GiB above the weights); the estimate stays within 15% of
    both, and gives Llama-3.1-70B on one 80 GB card micro-batches of 1,024 tokens (issue 30): its NF4 weights
    take ~37 GiB, so 2,048 tokens' ~45 GiB cannot fit."""
    from bench.shapes import model_config

    settings = load_settings({"MAX_SEQ_LENGTH": "512"}, env_file=None)
    for shape, measured in (("llama-3.2-3b", 4.9), ("llama-3.1-8b", 8.4)):
        estimate = activation_bytes(settings, model_config(shape), 4) / 2**30
        assert abs(estimate - measured) <= 0.15 * measured, (shape, estimate)
    big = model_config("llama-3.1-70b")
    assert activation_bytes(settings, big, 4) > (79 - 37) * 2**30 - RESERVE > activation_bytes(settings, big, 2)
    # Gemma 2 attends eager: a packed micro-batch given whole is one flat row, whose scores grow with the square of
    # its tokens; given one conversation at a time (eager_varlen, the job's choice), as padded rows do, linearly
    gemma = model_config("gemma-2-2b")
    gemma._attn_implementation = "eager"
    assert activation_bytes(settings, gemma, 8) - 2 * activation_bytes(settings, gemma, 4) > 0
    padded = load_settings({"MAX_SEQ_LENGTH": "512", "PACKING": "false"}, env_file=None)
    assert activation_bytes(padded, gemma, 8) == 2 * activation_bytes(padded, gemma, 4)
    whole_row = activation_bytes(settings, gemma, 8)
    gemma._attn_implementation = "eager_varlen"
    assert activation_bytes(settings, gemma, 8) == 2 * activation_bytes(settings, gemma, 4)
    assert activation_bytes(settings, gemma, 8) == activation_bytes(padded, gemma, 8) < whole_row
    # recomputed, each of its 80 layers keeps its input: a tenth of the memory
    assert activation_bytes(settings, big, 1, checkpointing=True) < activation_bytes(settings, big, 1) / 10


def test_dequantize_base_auto_needs_a_gpu_with_room(tiny_model_dir, monkeypatch, caplog):
    """auto: never on CPU; on a GPU only where the 16-bit copy takes at most a quarter of the memory this process may
    use: the card's, or the share torch.cuda.set_per_process_memory_fraction leaves it (a capped card acts as a
    small one), and the log says which it chose and why."""
    import types

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
    # 8x the copy's size, capped to a share of 0.5 or just under: 4x the copy, or just short of it
    gpu = types.SimpleNamespace(total_memory=8 * size)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpu)
    for share, expected in ((0.5 - 1e-6, False), (0.5, True)):
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i, share=share: share)
        caplog.clear()
        with caplog.at_level("INFO", logger="job.speedups.nf4_base"):
            assert dequantize_for_training(auto, model) is expected, share
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules()) is not expected
        said = caplog.records[-1].getMessage()  # (the tiny model's sizes print as 0.0 GiB)
        assert said.startswith("base weights: NF4-rounded" if expected else "keeping the base weights packed"), said
        assert "quarter of the 0.0 GiB of GPU memory this process may use" in said, said
