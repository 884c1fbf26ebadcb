"""How the throughput bench (bench/throughput.py) times a training recipe, in the recipe's own process.

All recipes count the same thing, the real (non-padding) tokens that go through forward and backward in each
optimizer step. Steps run until the step rate is stable: the median tokens/s of the last `--stable-window` steps
is within `--tolerance` of the median of the window before (compilation, autotuning and allocator growth are then
behind us), at most `--warmup-cap` steps; then `--steps` steps are timed, each closed by torch.cuda.synchronize().
A recipe that never settles is timed over its last `--steps` steps and flagged "not stable". MFU is taken against
the card's bf16 matmul peak measured here (median of several warmed runs).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any


def stable_start(rates: list[float], window: int, tolerance: float) -> int | None:
    """Index of the first step after warm-up, or None if the rate never settles.

    Warm-up is over at step i when the median rate of steps [i-w, i) is within `tolerance` (a fraction)
    of the median of [i-2w, i-w). Medians, so one slow step (a log line, a garbage collection) neither
    ends nor prolongs warm-up; the timed window then starts at i, after everything compared.
    """
    for i in range(2 * window, len(rates) + 1):
        before = statistics.median(rates[i - 2 * window : i - window])
        last = statistics.median(rates[i - window : i])
        if abs(last - before) <= tolerance * max(last, before):
            return i
    return None


def spread(values: list[float]) -> dict[str, float]:
    """Median, p10, p90, min and max of per-step figures (p10/p90 by linear interpolation)."""
    # quantiles() needs two values or more; a single value is every decile
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values
    return {
        "median": statistics.median(values),
        "p10": deciles[0],
        "p90": deciles[-1],
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def timed_window(seconds: list[float], tokens: list[int], steps: int, window: int, tolerance: float) -> dict:
    """Choose the timed steps from all steps run, and summarize them."""
    rates = [t / s for t, s in zip(tokens, seconds)]
    # Stable in time to leave `steps` steps after warm-up (the same first index the online check finds).
    start = stable_start(rates[: max(len(rates) - steps, 0)], window, tolerance)
    stable = start is not None
    if not stable:  # never settled within the cap: the last `steps` steps, flagged
        start = max(len(rates) - steps, 0)
    picked = slice(start, start + steps)
    return {
        "stable": stable,
        "warmup_steps": start,
        "timed_steps": len(rates[picked]),
        "tokens_per_s": spread(rates[picked]),
        "seconds_per_step": spread(seconds[picked]),
        # what a user gets over the window: all tokens over all the time
        "tokens_per_s_overall": sum(tokens[picked]) / sum(seconds[picked]),
        "tokens_per_step": statistics.fmean(tokens[picked]),
    }


def measure_peak_tflops(size: int = 8192, runs: int = 7, products: int = 50) -> dict:
    """The card's bf16 matmul rate: median of `runs` timed runs of `products` products, after a warm-up
    long enough (about a second) for the clocks to ramp up."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(500):
        a @ b
    torch.cuda.synchronize()
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(products):
            a @ b
        torch.cuda.synchronize()
        rates.append(2 * size**3 * products / (time.perf_counter() - t0) / 1e12)
    return spread(rates)


def cuda(call: str, otherwise: Any = None) -> Any:
    """torch.cuda.<call>() on a GPU, `otherwise` without one (the CPU tests run the measuring code too)."""
    import torch

    return getattr(torch.cuda, call)() if torch.cuda.is_available() else otherwise


def _over_ranks(n: int, how: str) -> int:
    """Under DDP, `n` summed over the ranks (how="sum") or rank 0's `n` (how="rank0"); `n` itself without."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], device="cuda" if torch.cuda.is_available() else "cpu")
    if how == "sum":
        dist.all_reduce(t)
    else:
        dist.broadcast(t, src=0)
    return int(t.item())


class _CountingCollator:
    """Wraps a trainer's collator to count the real (non-padding) tokens of each micro-batch."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, examples):
        batch = self.inner(examples)
        # without an attention mask the batch is padding-free: one flat row of real tokens
        self.tokens.append(
            int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
        )
        return batch


def timed_train(trainer, grad_accum: int, args, profile_to: Path | None = None) -> dict:
    """Train with a per-step clock until the rate is stable plus `args.steps` steps (or the cap).

    With BENCH_PROFILE=N (a diagnosis run, not for the table) rank 0 records steps N and N+1 with
    torch.profiler and writes its busiest operations to `profile_to`.
    """
    import torch
    from transformers import TrainerCallback

    rank0 = int(os.environ.get("RANK", "0")) == 0
    profile_at = int(os.environ.get("BENCH_PROFILE", "0")) if profile_to and rank0 else 0
    profiler = None  # the running torch.profiler, while steps N and N+1 are recorded

    # Count before job/speedups/cuda_graphs.py's fixed-shape padding, if any: its padding is not trained on.
    outer = trainer.data_collator
    counter = _CountingCollator(getattr(outer, "inner", outer))
    if hasattr(outer, "inner"):
        outer.inner = counter
    else:
        trainer.data_collator = counter
    ends: list[float] = []  # clock readings: training's start, then the end of each step
    seconds: list[float] = []
    tokens: list[int] = []
    start: int | None = None  # the first step after warm-up, once found

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            nonlocal profiler
            if not ends:
                cuda("synchronize")
                ends.append(time.perf_counter())
            if profile_at and len(seconds) == profile_at:
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                profiler = torch.profiler.profile(activities=acts)
                profiler.start()

        def on_step_end(self, a, state, control, **kw):
            nonlocal profiler, start
            cuda("synchronize")
            ends.append(time.perf_counter())
            seconds.append(ends[-1] - ends[-2])  # step to step: data, forward, backward, optimizer, callbacks
            # Micro-batches are consumed in order; the dataloader may fetch ahead, so count by index.
            j = len(seconds) - 1
            step_tokens = sum(counter.tokens[j * grad_accum : (j + 1) * grad_accum])
            tokens.append(_over_ranks(step_tokens, "sum"))  # under DDP: every GPU's tokens
            if profiler is not None and len(seconds) == profile_at + 2:
                profiler.stop()
                avg = profiler.key_averages()
                sorts = ("cuda_time_total", "self_cpu_time_total", "cpu_time_total")
                profile_to.write_text("\n\n".join(avg.table(sort_by=k, row_limit=30) for k in sorts))
                if os.environ.get("BENCH_PROFILE_TRACE"):  # the timeline too, for host gaps the tables hide
                    profiler.export_chrome_trace(str(profile_to.with_suffix(".trace.json.gz")))
                profiler = None
            if start is None:
                start = stable_start([t / s for t, s in zip(tokens, seconds)], args.stable_window, args.tolerance)
            # Under DDP rank 0 decides, so every rank stops at the same step (or the collectives hang).
            if _over_ranks(start is not None and len(seconds) >= start + args.steps, "rank0"):
                control.should_training_stop = True
            return control

    trainer.add_callback(Clock())
    cuda("reset_peak_memory_stats")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        **timed_window(seconds, tokens, args.steps, args.stable_window, args.tolerance),
        "step_seconds": seconds,
        "step_tokens": tokens,
        "train_wall_s": wall,
        "peak_gib": cuda("max_memory_allocated", 0) / 2**30,
        "lora_params": trainer.model.get_nb_trainable_parameters()[0],
        "final_loss": losses[-1] if losses else None,
    }
