"""The throughput bench's report (bench/throughput.py): its figures as the README's bench section, a table row per
recipe and round, then a paragraph per comparison and check; written beside bench.json as bench.md."""

from __future__ import annotations

import json
from pathlib import Path

from job.config import replace_section
from job.files import atomic_write_text

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
FULL_DATASET_ROWS = 256_916  # ruslanmv/ai-medical-chatbot, train split
UNSLOTH = "unsloth"  # each row's tokens/s is compared with this recipe's and with plain TRL's
AXOLOTL = "axolotl"  # Axolotl's fastest path (bench/axolotl_recipe.py): like unsloth, a process with its own stack
PLAIN = "plain"  # ... and with the job's own plain path, where a run has it (the model-family runs)
CHECKS = "checks"  # the part that checks equivalence and times generation (bench/equivalence.py): no table row
CHECK_PARTS = ("equivalence", "graphs", "generation")  # what that part's result holds
COLUMNS = "recipe|tokens/s (median)|p10–p90|s/step|vs unsloth|vs trl|MFU|peak GiB|warm-up steps".split("|")
PLAIN_COLUMN = 6  # where "vs plain" goes, after "vs trl", in a run that measured `plain`


def _ratio(x: dict, ref: dict | None) -> str:
    ok = ref and "tokens_per_s" in ref
    return f"{x['tokens_per_s']['median'] / ref['tokens_per_s']['median']:.2f}x" if ok else "–"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _listed(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _table_row(label: str, x: dict, rnd: dict, usd: float | None, width: int, plain: bool) -> str:
    """One recipe of one round: its figures, or why it has none."""
    if "tokens_per_s" not in x:
        return _row([label, x.get("skipped") or f"failed: {x.get('failed')}"]) + " |" * (width - 2)
    t, ratios = x["tokens_per_s"], [_ratio(x, rnd.get(UNSLOTH)), _ratio(x, rnd.get("trl"))]
    ratios += [_ratio(x, rnd.get(PLAIN))] if plain else []
    if x.get("gpus", 1) > 1:  # the peers ran on one GPU: say so where the ratio is read
        ratios = [q if q == "–" else f"{q} on {x['gpus']} GPUs" for q in ratios]
    warm = f"{x['warmup_steps']}" + ("" if x["stable"] else " (not stable: cap reached)")
    s, gib, mfu, hours = x["seconds_per_step"]["median"], x["peak_gib"], x["mfu"], x["hours_full"]
    cells = [label, f"{t['median']:,.0f}", f"{t['p10']:,.0f}–{t['p90']:,.0f}", f"{s:.3f}", *ratios]
    cells += [f"{100 * mfu:.1f}%", f"{gib:.1f}", warm, f"{hours:.1f} h"]
    return _row(cells + ([f"{hours * usd:.0f}"] if usd else []))


def _table(rounds: list[dict], usd: float | None) -> str:
    plain = any(PLAIN in rnd for rnd in rounds)
    columns = COLUMNS[:PLAIN_COLUMN] + ["vs plain"] + COLUMNS[PLAIN_COLUMN:] if plain else COLUMNS
    head = [*columns, f"full dataset ({FULL_DATASET_ROWS / 1000:.0f}k rows)", *(["full dataset, USD"] if usd else [])]
    table = [_row(head), "|" + "---|" * len(head)]
    for i, rnd in enumerate(rounds):
        tag = f" (round {i + 1})" if len(rounds) > 1 else ""
        table += [_table_row(name + tag, x, rnd, usd, len(head), plain) for name, x in rnd.items() if name != CHECKS]
    return "\n".join(table)


def _ddp(rnd: dict) -> str | None:
    one, two = rnd.get("job-accum2", {}), rnd.get("job-ddp2", {})
    if "tokens_per_s" in one and "tokens_per_s" in two:
        return (
            f"Two GPUs (DDP, batch 8 each) vs one (batch 8 x accumulation 2), same data and optimizer steps: "
            f"{two['tokens_per_s']['median']:,.0f} vs {one['tokens_per_s']['median']:,.0f} tokens/s, "
            f"{_ratio(two, one)}."
        )
    return None


def _equivalence(e: dict) -> str | None:
    if "grad_cosine" in e:
        return (
            f"Equivalence: the job's path (packed rows, base weights {e['job_base_weights']}) vs the plain path "
            f"(padded rows, bitsandbytes' 4-bit layers), same 8 rows and adapter, bf16: loss {e['loss_packed']:.5f} "
            f"vs {e['loss_padded']:.5f} (rel. diff {e['loss_rel_diff']:.1e}), LoRA gradient cosine "
            f"{e['grad_cosine']:.5f}, rel. L2 {e['grad_rel_l2']:.1e}."
        )
    return None


def _graphs(c: dict) -> str | None:
    if "skipped" in c:  # the job runs this model's layers eager (bench/equivalence.py check_graphs)
        return f"CUDA graphs: not used on this model ({c['skipped']}), so not checked."
    if "grad_cosine" in c:
        return (
            f"CUDA graphs (job/speedups/cuda_graphs.py): one padded micro-batch of {c['tokens']:,} tokens, dropout "
            "off, replayed "
            f"layers vs eager: loss {c['loss_graph']:.5f} vs {c['loss_eager']:.5f} (rel. diff "
            f"{c['loss_rel_diff']:.1e}), LoRA gradient cosine {c['grad_cosine']:.5f}, rel. L2 {c['grad_rel_l2']:.1e} "
            f"(two eager steps: {c['grad_rel_l2_eager_twice']:.1e}; flash attention's backward is not deterministic); "
            f"captured in {c['capture_s']:.1f} s; layer calls {c['layer_calls']}."
        )
    return None


def _liger(e: dict, g: dict) -> str | None:
    if "liger_modules" in e and "liger_modules" in g:
        return (
            f"Liger's forward ran in {e['liger_modules']} modules of the trained model and in {g['liger_modules']} "
            "of the evaluated one, loaded afterwards in the same process (0: training's patch was put back)."
        )
    return None


def _generation(g: dict) -> str | None:
    if "tokens_per_s" in g:
        return (
            f"Generation (the evaluate stage's default: {g['prompts']} prompts answered by base and tuned model as "
            f"rows of shared batches, up to {g['max_new_tokens']} new tokens, EVAL_BATCH_SIZE={g['batch']}): "
            f"{g['tokens_per_s']:,.0f} new tokens/s in the timed pass ({g['tokens_per_s_first']:,.0f} in the "
            f"first, untimed one); peak {g['peak_gib']:.1f} GiB."
        )
    return None


def _decoders(g: dict) -> str | None:
    if not g.get("decoders"):
        return None
    speeds = [
        f"{k} {x['tokens_per_s']:,.0f}"
        + (f" ({x['rows_equal_to_eager_loop']})" if "rows_equal_to_eager_loop" in x else "")
        for k, x in g["decoders"].items()
    ]
    return (
        "The same rows in one batch, each decoder warmed alike (new tokens/s; rows whose answer equals the "
        f"eager loop's): {'; '.join(speeds)}."
    )


def _checks(checks: dict) -> list[str]:
    """The checks' paragraphs, then what failed in them."""
    e, c, g = (checks.get(part, {}) for part in CHECK_PARTS)
    out = [_equivalence(e), _graphs(c), _liger(e, g), _generation(g), _decoders(g)]
    if "failed" in checks:
        out.append(f"The checks' process failed: {checks['failed']}")
    out += [f"{p} failed: {checks[p]['failed']}" for p in CHECK_PARTS if "failed" in checks.get(p, {})]
    return [p for p in out if p]


def markdown(r: dict) -> str:
    """The README's bench section: the setup, a table row per recipe and round, a paragraph per comparison."""
    setup, rounds, args = r["setup"], r["rounds"], r.get("args", {})
    cap = args.get("gpu_memory")
    paragraphs = [
        f"Device: {setup['device']}"
        + (f", each recipe's process capped to {cap:g} GiB of its memory (a smaller card's)" if cap else "")
        + f", bf16 matmul peak measured {setup['peak_tflops']['median']:.0f} TFLOP/s; "
        f"model shape {args.get('shape', 'llama-3.2-3b')}; precision {setup['precision']}; {setup['rows']} "
        f"conversations, mean {setup['mean_tokens_per_row']:.0f} tokens, max length 512. "
        f"{_listed(setup.get('versions', {}))}.",
        _table(rounds, args.get("usd_per_hour")),
    ]
    for peer in (UNSLOTH, AXOLOTL):  # their processes' own stacks
        pv = next((rnd[peer]["versions"] for rnd in rounds if "versions" in rnd.get(peer, {})), None)
        if pv:
            paragraphs.append(f"The {peer} process: {_listed(pv)}.")
    paragraphs += [_ddp(rnd) for rnd in rounds]
    paragraphs += _checks(next((rnd[CHECKS] for rnd in rounds if CHECKS in rnd), {}))
    return "\n\n".join(p for p in paragraphs if p) + "\n"


def write_report(results: dict, out: Path, readme: Path | None) -> str:
    """bench.json (every figure) and bench.md into `out`; with `readme`, its bench section rewritten."""
    md = markdown(results)
    atomic_write_text(out / "bench.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "bench.md", md)
    if readme:
        atomic_write_text(readme, replace_readme_section(readme.read_text(), md))
    return md


def replace_readme_section(text: str, body: str) -> str:
    """The README with the text between the bench markers replaced by `body` (markers kept): the same
    mechanism that regenerates the settings table (job/config.py)."""
    return replace_section(text, "bench", body.strip("\n") + "\n")
