"""job/speedups/torch_compile.py: every decoder layer compiled in place, and TORCH_COMPILE=auto only where it pays."""

import torch

from job.config import load_settings, with_overrides
from job.files import read_jsonl
from job.model import load_model
from job.speedups import torch_compile
from job.speedups.torch_compile import COMPILE_AFTER_STEPS, use_compile


def test_regional_compile_covers_every_decoder_layer(tiny_model_dir, monkeypatch):
    cfg = load_settings({"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "none"}, env_file=None)
    model = load_model(cfg, "fp32")
    names = [n for n, _ in model.named_parameters()]
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)))
    assert torch_compile.compile_layers(model) == model.config.num_hidden_layers
    assert [m for m, _ in compiled] == list(model.model.layers)  # each decoder layer, nothing else
    assert all(kw == {"dynamic": True} for _, kw in compiled)  # one graph for every packed-row length
    assert [n for n, _ in model.named_parameters()] == names  # in place: PEFT's state-dict keys unchanged
    # CPU: no compile, whatever the settings say
    assert not use_compile(load_settings({"TORCH_COMPILE": "true"}, env_file=None), [])


def test_auto_compiles_only_runs_long_enough_to_repay_it(demo_run, monkeypatch):
    """TORCH_COMPILE=auto decides from the optimizer steps planned before training (the rows packed by TRL's
    own packer), and only where the base is held in 16-bit: the plan equals the steps the demo's training took."""
    import json

    from job.paths import RunPaths

    paths = RunPaths(demo_run.run_dir)
    cfg = load_settings(demo_run.env, env_file=None)
    history = json.loads(paths.train_log.read_text())["log_history"]
    taken = max(e["step"] for e in history)
    planned = torch_compile.planned_steps(cfg, read_jsonl(paths.train_tokens))
    assert planned == taken
    assert torch_compile.planned_steps(with_overrides(cfg, EPOCHS=4.0), read_jsonl(paths.train_tokens)) == 2 * taken

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto, never, always = (with_overrides(cfg, TORCH_COMPILE=v) for v in ("auto", "false", "true"))
    monkeypatch.setattr(torch_compile, "planned_steps", lambda cfg, rows: COMPILE_AFTER_STEPS - 1)
    assert not use_compile(auto, []) and not use_compile(never, []) and use_compile(always, [])
    monkeypatch.setattr(torch_compile, "planned_steps", lambda cfg, rows: COMPILE_AFTER_STEPS)
    assert use_compile(auto, []) and not use_compile(never, [])
    # The base packed in 4 bits: auto never compiles (slower there), true still does
    assert not use_compile(auto, [], packed_base=True) and use_compile(always, [], packed_base=True)
