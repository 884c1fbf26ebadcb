"""The bench's arithmetic and report (the GPU run itself cannot run in CI): when warm-up is over, what
the median and spread are, and the README section it rewrites."""

import pytest
import torch

from bench.shapes import SHAPES, model_config
from bench.throughput import flops_per_token
from bench.throughput_report import CHECKS, README_END, README_START, UNSLOTH, markdown, replace_readme_section
from bench.timing import spread, stable_start, timed_window
from job.paths import RunPaths


def test_warmup_ends_after_the_compile_spike():
    # Steps 0-3 compile and autotune (slow, then faster), then the rate settles at 1000 tokens/s with
    # +-1% jitter. Window 5: the first index whose last 5 and previous 5 medians agree within 5%.
    rates = [50.0, 300.0, 700.0, 900.0] + [1000.0 + (10 if i % 2 else -10) for i in range(40)]
    start = stable_start(rates, window=5, tolerance=0.05)
    # A median of five ignores two slow steps: at 12 the earlier window [2, 7) still holds steps 2 and 3,
    # and its median is already a settled step's. Timing starts at 12, after every step compared.
    assert start == 12
    assert min(rates[start:]) >= 990


def test_one_slow_step_does_not_end_or_prolong_warmup():
    rates = [1000.0] * 30
    rates[3] = 10.0  # a garbage collection
    assert stable_start(rates, window=5, tolerance=0.05) == 10


def test_never_stable_is_flagged_and_the_last_steps_are_timed():
    rates = [100.0 * 1.2**i for i in range(40)]  # still 20% faster every step
    assert stable_start(rates, window=5, tolerance=0.05) is None
    tokens = [1000] * 40
    seconds = [t / r for t, r in zip(tokens, rates)]
    w = timed_window(seconds, tokens, steps=10, window=5, tolerance=0.05)
    assert not w["stable"] and w["warmup_steps"] == 30 and w["timed_steps"] == 10


def test_timed_window_starts_at_the_stable_point_and_has_the_requested_steps():
    tokens = [4000] * 50
    seconds = [2.0, 1.0, 0.5] + [0.2] * 47  # 2,000 ... 20,000 tokens/s
    w = timed_window(seconds, tokens, steps=30, window=5, tolerance=0.05)
    assert w["stable"] and w["warmup_steps"] == 11 and w["timed_steps"] == 30
    assert w["tokens_per_s"]["median"] == pytest.approx(20_000)
    assert w["tokens_per_s_overall"] == pytest.approx(20_000)
    # stable too late to leave 30 timed steps: flagged, and the last 30 are timed
    late = timed_window(seconds[:40], tokens[:40], steps=30, window=5, tolerance=0.05)
    assert not late["stable"] and late["warmup_steps"] == 10


def test_spread_median_and_deciles():
    s = spread([float(v) for v in range(1, 12)])  # 1..11
    assert s["median"] == 6 and s["min"] == 1 and s["max"] == 11 and s["n"] == 11
    assert s["p10"] == pytest.approx(2.0) and s["p90"] == pytest.approx(10.0)  # linear interpolation
    assert spread([5.0]) == {"median": 5.0, "p10": 5.0, "p90": 5.0, "min": 5.0, "max": 5.0, "n": 1}


def test_the_repository_readme_has_the_markers():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1
    # the bench rewrites between these markers (replace_section is tested in test_settings_docs.py)
    assert f"{README_START}\n| new |\n{README_END}" in replace_readme_section(text, "\n| new |")


def _recipe(tokens_per_s: float) -> dict:
    rate = spread([tokens_per_s * 0.9, tokens_per_s, tokens_per_s * 1.1])
    return {
        "tokens_per_s": rate,
        "seconds_per_step": spread([0.2]),
        "stable": True,
        "warmup_steps": 10,
        "mfu": 0.3,
        "peak_gib": 12.0,
        "hours_full": 1.5,
    }


def test_markdown_ratios_and_flags():
    """The report's own logic: ratios to unsloth and trl (labelled when more GPUs ran), the DDP speed-up,
    failed and unstable recipes flagged, checks kept out of the table, a row per recipe per round."""
    rnd = {
        "trl": _recipe(2000.0),
        "job": _recipe(4000.0),
        UNSLOTH: _recipe(9000.0),
        "job-accum2": _recipe(10_000.0),
        "job-ddp2": {**_recipe(19_000.0), "gpus": 2},
        "job-sdpa": {"failed": "exit 1"},
        "job-compile": {**_recipe(30_000.0), "stable": False, "warmup_steps": 60},
        "checks": {"generation": {"failed": "OutOfMemory: boom"}},
    }
    setup = {
        "device": "GPU",
        "peak_tflops": spread([790.0]),
        "precision": "bf16",
        "rows": 995,
        "mean_tokens_per_row": 254.0,
    }
    results = {"setup": setup, "args": {"usd_per_hour": 2.0}, "rounds": [rnd]}
    md = markdown(results)
    assert f"| {CHECKS} |" not in md
    assert "| job | 4,000 | 3,680–4,320 | 0.200 | 0.44x | 2.00x | 30.0% | 12.0 | 10 | 1.5 h | 3 |" in md
    assert "| job-sdpa | failed: exit 1 |" in md
    assert "| 60 (not stable: cap reached) |" in md
    assert "| job-ddp2 | 19,000 | 17,480–20,520 | 0.200 | 2.11x on 2 GPUs |" in md  # unsloth ran on one
    assert "19,000 vs 10,000 tokens/s, 1.90x" in md  # DDP's speed-up on the same data and steps
    assert "generation failed: OutOfMemory: boom" in md
    md2 = markdown({**results, "rounds": [rnd, rnd]})
    assert "| job (round 1) |" in md2 and "| job (round 2) |" in md2
    assert "Device: GPU, bf16 matmul peak measured 790 TFLOP/s; model shape llama-3.2-3b;" in md
    capped = markdown({**results, "args": {"gpu_memory": 24.0, "shape": "llama-3.1-8b"}})
    assert "Device: GPU, each recipe's process capped to 24 GiB of its memory (a smaller card's)" in capped
    assert "model shape llama-3.1-8b;" in capped
    assert "vs plain" not in md  # a column only where a round measured the plain path
    eager = {"graphs": {"skipped": "the model attends with eager, not sdpa_varlen (packed rows need a mask)"}}
    family = markdown({**results, "rounds": [{**rnd, "plain": _recipe(1000.0), "checks": eager}]})
    assert "CUDA graphs: not used on this model (the model attends with eager, not sdpa_varlen" in family
    assert "| vs unsloth | vs trl | vs plain | MFU |" in family
    assert "| job | 4,000 | 3,680–4,320 | 0.200 | 0.44x | 2.00x | 4.00x | 30.0% |" in family


def test_a_capped_recipe_process_asks_torch_for_that_share_of_the_card(monkeypatch):
    import types

    from bench.throughput import cap_gpu_memory

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: asked.append((f, d)))
    cap_gpu_memory(None)
    cap_gpu_memory(16)
    assert asked == [(0.2, 0)]
    with pytest.raises(SystemExit, match="more than this GPU's 80.0 GiB"):
        cap_gpu_memory(96)


def test_a_recipe_warms_up_then_times_the_steps_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    """The child's measurement on the tiny model, on CPU: the job's own trainer, steps counted and timed,
    training stopped once warm-up and the timed steps are done (or at the cap); with BENCH_PROFILE=N,
    steps N and N+1 profiled into the output folder."""
    from bench.throughput import bench_settings, measure_training, parse_args
    from job import formatting, sample

    data = __import__("pathlib").Path(__file__).resolve().parents[1] / "job" / "fixtures" / "dialogues.jsonl"
    args = parse_args(
        ["--model-dir", str(tiny_model_dir), "--data", str(data), "--rows", "24", "--gen-prompts", "4"]
        + ["--out", str(tmp_path), "--steps", "3", "--stable-window", "2", "--tolerance", "10", "--warmup-cap", "5"]
    )
    cfg = bench_settings(args)
    cfg.run_dir.mkdir(parents=True)
    sample.run(cfg, RunPaths(cfg.run_dir))
    formatting.run(cfg, RunPaths(cfg.run_dir))
    monkeypatch.setenv("BENCH_PROFILE", "1")
    r = measure_training("job", cfg, args)
    # any rate is "stable" within a tolerance of 1000%: warm-up is the first two windows, then 3 timed steps
    assert r["stable"] and r["warmup_steps"] == 4 and r["timed_steps"] == 3
    assert len(r["step_seconds"]) == len(r["step_tokens"]) == 7  # stopped early: the cap allowed 8
    assert all(t > 0 for t in r["step_tokens"]) and r["tokens_per_s"]["median"] > 0
    assert r["lora_params"] > 0
    assert "Self CPU" in (tmp_path / "profile-job.txt").read_text()  # torch.profiler's table


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_has_its_published_parameter_count(name):
    """Built on the meta device (no memory): a shape that lost a layer, a head or its tied embeddings is off by far
    more than the 0.5% that the published counts' rounding allows."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(SHAPES[name].params, rel=5e-3)
    assert flops_per_token(model.config, mean_seq_len=300, lora_params=0) > 4e9 * SHAPES[name].params * 0.9


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "gemma2"])
def test_a_shape_too_big_for_16_bits_is_built_packed_and_loads_as_the_job_loads_it(tiny_model_dir, tmp_path, family):
    """The 70B shape is drawn one linear layer at a time straight into NF4 (bench/shapes.py): here a tiny model of
    three families (tied embeddings, biased projections, Gemma's 1 + weight norms) built so on the CPU, saved, and
    loaded by the job's load_model gives the same 4-bit weights and the same logits."""
    import bitsandbytes.functional as F
    import transformers
    from transformers import AutoTokenizer

    from bench.shapes import build_random, random_nf4
    from job.config import load_settings
    from job.model import load_model
    from job.tiny_model import TINY

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    kind = {"llama-tied": "LlamaConfig", "qwen2": "Qwen2Config", "gemma2": "Gemma2Config"}[family]
    config = getattr(transformers, kind)(**{**TINY, "head_dim": 16}, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    build_random("tiny", tmp_path / "nf4", tok, device="cpu", config=config)
    torch.manual_seed(0)  # as build_random seeds: the same draw again, in memory
    built = random_nf4(config, "cpu")
    loaded = load_model(load_settings({"BASE_MODEL": str(tmp_path / "nf4")}, env_file=None), "bf16")
    layer = lambda m: m.model.layers[1].mlp.down_proj  # noqa: E731
    assert type(layer(loaded)).__name__ == "Linear4bit"
    weights = [F.dequantize_4bit(layer(m).weight.data, layer(m).weight.quant_state) for m in (built, loaded)]
    assert torch.equal(*weights) and weights[0].float().std() > 0
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    built.eval()
    loaded.set_attn_implementation(built.config._attn_implementation)  # the job loads it with its varlen attention
    with torch.no_grad():
        logits = [m(ids).logits.float() for m in (built, loaded)]
    assert torch.equal(*logits) and logits[0].std() > 0


def test_checks_names_parts_of_the_checks_part():
    from bench.throughput import parse_args

    assert parse_args(["--checks", "equivalence,graphs"]).checks == "equivalence,graphs"
    with pytest.raises(SystemExit) as e:
        parse_args(["--checks", "graph"])  # a misspelt part would otherwise check nothing, silently
    assert e.value.code == 2


def test_the_axolotl_recipe_is_axolotls_fast_qlora_path_on_the_jobs_settings(tmp_path):
    """bench/axolotl_recipe.py's config for Axolotl (not installed here): 4-bit NF4 QLoRA with the job's r, alpha and
    targets and no dropout, multipack packing of 8 rows of MAX_SEQ_LENGTH (the job recipe's tokens per step), torch's
    varlen attention, the LoRA kernels and Liger, no gradient checkpointing, the job's optimizer, schedule and seed,
    the loss on the replies; without CUDA the GPU-only parts off."""
    from bench.axolotl_recipe import LIGER_FLAGS, LORA_KERNELS, MICRO_BATCH, axolotl_config
    from job.config import load_settings

    env = {"BASE_MODEL": "/models/m", "LORA_R": "16", "LORA_ALPHA": "32", "MAX_SEQ_LENGTH": "512"}
    cfg = load_settings({**env, "OUTPUT_DIR": str(tmp_path)}, env_file=None)
    gpu = axolotl_config(cfg, ["q_proj", "v_proj"], tmp_path / "train.jsonl", tmp_path / "ax", 90, cuda=True)
    assert (gpu["adapter"], gpu["load_in_4bit"], gpu["bf16"]) == ("qlora", True, True)
    assert gpu["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
    assert [gpu[k] for k in lora] == [16, 32, 0.0, ["q_proj", "v_proj"]]
    assert gpu["sample_packing"] and gpu["gradient_accumulation_steps"] == 1 and not gpu["gradient_checkpointing"]
    assert MICRO_BATCH == gpu["micro_batch_size"] == 8 and gpu["sequence_len"] == 512
    assert (gpu["attn_implementation"], gpu["sdpa_varlen"]) == ("sdpa", True)
    assert all(gpu[k] for k in (*LORA_KERNELS, *LIGER_FLAGS)) and gpu["plugins"] == [
        "axolotl.integrations.liger.LigerPlugin"
    ]
    schedule = ("learning_rate", "lr_scheduler", "warmup_ratio", "optimizer", "seed", "max_steps")
    assert [gpu[k] for k in schedule] == [cfg.LEARNING_RATE, cfg.LR_SCHEDULER, cfg.WARMUP_RATIO, cfg.OPTIMIZER, 42, 90]
    [data] = gpu["datasets"]
    assert (data["path"], data["type"], data["roles_to_train"], data["train_on_eos"]) == (
        str(tmp_path / "train.jsonl"),
        "chat_template",
        ["assistant"],
        "turn",
    )
    assert gpu["chat_template"] == "tokenizer_default" and gpu["dataset_prepared_path"].startswith(str(tmp_path))
    cpu = axolotl_config(cfg, "all-linear", tmp_path / "train.jsonl", tmp_path / "ax", 8, cuda=False)
    assert cpu["lora_target_linear"] and "lora_target_modules" not in cpu
    assert not any(cpu[k] for k in (*LORA_KERNELS, "sdpa_varlen", "bf16")) and "plugins" not in cpu
    assert not set(LIGER_FLAGS) & set(cpu)


def test_axolotl_batches_count_their_real_tokens_and_reach_the_model_unchanged():
    """timed_train counts what the collator returns: Axolotl's packed rows are padded and carry no 0/1 mask, so the
    recipe's wrapper hands the counter a mask of the real tokens and takes it off again (or puts Axolotl's own back)."""
    from bench.axolotl_recipe import _RealTokens
    from bench.timing import _CountingCollator

    class Packed:  # Axolotl's collator in small: each row's conversations end to end, right-padded to 6
        padding_side = "right"

        def __init__(self, numbered: bool):
            self.tokenizer, self.numbered = self, numbered

        def __call__(self, rows):
            ids = [sum((f["input_ids"] for f in row), []) for row in rows]
            batch = {"input_ids": torch.tensor([r + [0] * (6 - len(r)) for r in ids])}
            if self.numbered:  # varlen backends' mask: 1, 2, ... per conversation, 0 on padding
                docs = [sum(([i + 1] * len(f["input_ids"]) for i, f in enumerate(row)), []) for row in rows]
                batch["attention_mask"] = torch.tensor([d + [0] * (6 - len(d)) for d in docs])
            return batch

    rows = [[{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}], [{"input_ids": [4]}]]
    for numbered in (False, True):
        outer = _RealTokens(Packed(numbered))
        counter = _CountingCollator(outer.inner)
        outer.inner = counter  # as timed_train puts its counter in
        try:
            batch = outer(rows)
            assert list(counter.tokens) == [6]  # 5 + 1 real tokens of 12 slots
        finally:
            outer.close()
        if numbered:
            assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 0, 0, 0, 0, 0]]
        else:
            assert set(batch) == {"input_ids"}


def test_kept_compares_the_jobs_packed_attention_with_padded_rows_and_for_gemma_2_the_whole_row(capsys):
    """bench/kept.py: the variants each shape is measured in, and a run of the real Gemma 2 width cut to one layer
    and tiny rows, whose packed and padded paths keep the same bytes (rows of equal length: no padding) and whose
    whole-row eager attention keeps more."""
    from bench import kept

    assert [v[1:] for v in kept.variants(model_config("llama-3.2-3b"))] == [("sdpa_varlen", True), ("sdpa", False)]
    gemma = [v[1:] for v in kept.variants(model_config("gemma-2-2b"))]
    assert gemma == [("eager_varlen", True), ("eager", False), ("eager", True)]
    assert kept.main(["--shape", "gemma-2-2b", "--layers", "1", "--rows", "4x128", "--vocab", "256"]) == 0
    out = capsys.readouterr().out
    kept_gib = [float(line.split(": ")[2].split(" GiB")[0]) for line in out.splitlines() if " GiB kept" in line]
    assert len(kept_gib) == 3 and kept_gib[2] > kept_gib[0], out
    assert abs(kept_gib[1] - kept_gib[0]) <= 0.01 * kept_gib[0], out


def test_gpu_site_trims_what_no_gpu_run_reads_and_packs_parts_a_call_can_carry(tmp_path):
    """bench/gpu_site.py: bitsandbytes keeps its CPU and CUDA 13.0 libraries, lm-eval the job's task folders (and
    the folders above them), no package its tests; every top-level entry lands in exactly one part, each part
    within the limit."""
    import os
    import tarfile

    from bench import gpu_site

    site = tmp_path / "site"
    for f in ("bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
              "bitsandbytes/libbitsandbytes_cuda126.so", "bitsandbytes/libbitsandbytes_rocm64.so",
              "bitsandbytes/__init__.py", "lm_eval/tasks/__init__.py", "lm_eval/tasks/mmlu/default/a.yaml",
              "lm_eval/tasks/mmlu/other/b.yaml", "lm_eval/tasks/medqa/c.yaml", "lm_eval/tasks/arc/d.yaml",
              "pandas/tests/t.py", "pandas/core.py"):  # fmt: skip
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_bytes(os.urandom(30_000))  # random: xz cannot shrink it, so the sizes are known
    gpu_site.trim(site, {"mmlu/default", "medqa"})
    left = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert left == [
        "bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
        "lm_eval/tasks/__init__.py", "lm_eval/tasks/medqa/c.yaml", "lm_eval/tasks/mmlu/default/a.yaml",
        "pandas/core.py",
    ]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    parts = gpu_site.pack(site, out, max_bytes=100_000)  # bitsandbytes and lm_eval ~90 kB each: a part each
    assert len(parts) == 3 and min(len(list(p.iterdir())) for p in parts) == 1
    assert all(sum(f.stat().st_size for f in p.iterdir()) <= 100_000 for p in parts)
    packed = set()
    for archive in out.glob("part*/*.tar.xz"):
        with tarfile.open(archive) as tar:
            packed |= {m.name for m in tar.getmembers() if m.isfile()}
    assert packed == set(left)


def test_gpu_site_resolves_a_stack_without_the_machines_torch_or_cuda(tmp_path):
    """The closure is pip's own resolution for the machine's Python against stand-in torch and triton wheels: TRL's
    needs come along, torch, triton and CUDA's libraries do not."""
    from bench import gpu_site

    links = tmp_path / "links"
    links.mkdir()
    gpu_site.stand_in("torch", gpu_site.MACHINE_TORCH, links)
    gpu_site.stand_in("triton", gpu_site.MACHINE_TRITON, links)
    names = {n.lower() for n, _ in gpu_site.closure(["trl==1.16.0"], links, tmp_path)}
    assert {"trl", "transformers", "accelerate", "datasets"} <= names
    assert not names & {"torch", "triton"} and not any(n.startswith("nvidia-") for n in names), names
