"""job/speedups/liger.py: Liger's kernels only where they run, and its process-wide patch undone after training."""

import torch

from job.config import load_settings
from job.model import load_model, lora_config
from job.speedups.liger import use_liger


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


def test_liger_only_on_a_gpu_and_not_with_compile(monkeypatch):
    """torch.compile cannot trace Liger's kernels; without CUDA they do not run."""
    import importlib.util

    on = load_settings({"LIGER_KERNEL": "true"}, env_file=None)
    find_spec = importlib.util.find_spec
    installed = lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", installed)
    assert not use_liger(on, compiled=False)  # CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_liger(on, compiled=False)
    assert not use_liger(on, compiled=True)
    assert not use_liger(load_settings({"LIGER_KERNEL": "false"}, env_file=None), compiled=False)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert use_liger(on, compiled=False) is (find_spec("liger_kernel") is not None)  # as installed here
