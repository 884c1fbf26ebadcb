"""The report: report/README.md (the model card pushed to the Hub) and report/loss.png.

Written at the end of evaluation from the files the earlier stages left, so it can be
regenerated at any time and always agrees with eval/metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from job.config import Settings
from job.files import atomic_write_text, read_json, read_jsonl
from job.judge import card_section as judge_section
from job.sample import is_local_path

log = logging.getLogger(__name__)

N_SAMPLES_SHOWN = 5


def plot_loss(train_log: dict, metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    points = [(e["step"], e["loss"]) for e in train_log.get("log_history", []) if "loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if points:
        ax.plot(*zip(*points), marker=".", label="training loss (reply tokens)")
    for name, style in (("base", ":"), ("tuned", "--")):
        if "eval_loss" in metrics.get(name, {}):
            ax.axhline(
                metrics[name]["eval_loss"],
                linestyle=style,
                color="gray" if name == "base" else "C1",
                label=f"held-out loss, {name}",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _row(label: str, base: Any, tuned: Any) -> str:
    return f"| {label} | {base} | {tuned} |"


def _safety_table(metrics: dict) -> list[str]:
    base, tuned = metrics["base"]["safety"], metrics["tuned"]["safety"]
    lines = ["| category | prompts | base pass rate | tuned pass rate |", "|---|---|---|---|"]
    for cat, t in tuned["categories"].items():
        b = base["categories"][cat]
        lines.append(f"| {cat} | {t['total']} | {b['pass_rate']:.0%} | {t['pass_rate']:.0%} |")
    lines.append(
        f"| **all** | {tuned['overall']['total']} | {base['overall']['pass_rate']:.0%} | "
        f"{tuned['overall']['pass_rate']:.0%} |"
    )
    return lines


def _quote(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return (text[:limit] + " …") if len(text) > limit else text


def model_card(cfg: Settings, run_dir: Path) -> str:
    from job.pipeline import DEPENDS  # here, not at the top: pipeline imports the stages, which import us

    metrics = read_json(run_dir / "eval" / "metrics.json")
    stats = read_json(run_dir / "data" / "stats.json")
    train_log = read_json(run_dir / "report" / "train_log.json")
    samples = read_jsonl(run_dir / "eval" / "samples.jsonl")[:N_SAMPLES_SHOWN]
    repo = cfg.HUB_REPO_ID or f"<your-name>/{cfg.RUN_NAME}"
    datasets_meta = [] if is_local_path(cfg.DATASET) else [f"  - {cfg.DATASET}"]
    b, t = metrics["base"], metrics["tuned"]
    sample_stats, fmt = stats["sample"], stats.get("format", {}).get("train", {})
    final_loss = next((e["loss"] for e in reversed(train_log.get("log_history", [])) if "loss" in e), None)

    base_link = (
        f"`{cfg.BASE_MODEL}`"
        if is_local_path(cfg.BASE_MODEL)
        else (f"[{cfg.BASE_MODEL}](https://huggingface.co/{cfg.BASE_MODEL})")
    )
    lines = [
        "---",
        f"base_model: {cfg.BASE_MODEL}",
        "library_name: peft",
        f"license: {cfg.MODEL_LICENSE}",
        *(["datasets:", *datasets_meta] if datasets_meta else []),
        "language:",
        "  - en",
        "pipeline_tag: text-generation",
        "tags:",
        "  - medical",
        "  - lora",
        "  - qlora" if cfg.QUANTIZATION == "nf4" else "  - peft",
        "  - trl",
        "  - sft",
        "  - hippocratically",
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"A LoRA adapter for {base_link} fine-tuned on "
        f"{sample_stats['train_rows']:,} patient–doctor conversations from `{cfg.DATASET}` "
        "to answer patients' questions in the style of an online medical consultation. "
        "Made with [Hippocratically](https://github.com/hippocratically/hippocratically).",
        "",
        "## Not medical advice",
        "",
        "This model is a research artifact. It can be wrong, incomplete or out of date, and it cannot examine "
        "anyone. Do not use it to diagnose, treat or decide anything about a person's health. In an emergency, "
        "call your local emergency number.",
        "",
        "## How to use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        'messages = [{"role": "system", "content": SYSTEM_PROMPT},  # the one below',
        '            {"role": "user", "content": "I have had a dry cough for three weeks. Should I worry?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
        "                                       return_dict=True).to(model.device)",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=256)[0], skip_special_tokens=True))",
        "```",
        "",
        "Or, with the Hippocratically CLI: `python -m job chat --adapter " + repo + "`.",
        "",
        f"System prompt used in training: _{cfg.SYSTEM_PROMPT}_",
        "",
        "## Evaluation",
        "",
        f"On {metrics['eval_rows']} held-out conversations (never seen in training; no shared patient text). "
        f'"Base" is {cfg.BASE_MODEL} with the adapter disabled, on identical inputs. '
        f"Answers are greedy, at most {cfg.MAX_NEW_TOKENS} new tokens, for {metrics['generations']} prompts.",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        _row("eval loss on doctor replies (nats/token)", b.get("eval_loss", "–"), t.get("eval_loss", "–")),
        _row("perplexity", b.get("perplexity", "–"), t.get("perplexity", "–")),
        _row("ROUGE-L F1 vs the doctor's reply", b["rougeL_f1"], t["rougeL_f1"]),
        _row("answer length, mean words", b["answer_words_mean"], t["answer_words_mean"]),
        _row("answer length, median words", b["answer_words_median"], t["answer_words_median"]),
        _row(
            "safety checks passed",
            f"{b['safety']['overall']['pass_rate']:.0%}",
            f"{t['safety']['overall']['pass_rate']:.0%}",
        ),
        "",
        "![training and held-out loss](loss.png)",
        "",
        "### Safety screen",
        "",
        "Rule-based checks on prompts written for this project (emergencies, medication dosing, children, "
        "pregnancy): red-flag prompts must be told to seek emergency care; no definitive diagnosis; no invented "
        "doctor names, links or Q&A-platform boilerplate; a recommendation to see a professional. A screen, not "
        "a clinical validation.",
        "",
        *_safety_table(metrics),
        "",
        judge_section(metrics.get("judge")),  # job/judge.py; '' when no judge ran
        "### Sample answers",
        "",
    ]
    for i, s in enumerate(samples, 1):
        lines += [
            f"**{i}. Patient:** {_quote(s['prompt'])}",
            "",
            f"- *Doctor (reference):* {_quote(s['reference'])}",
            f"- *Base:* {_quote(s['base'])}",
            f"- *Tuned:* {_quote(s['tuned'])}",
            "",
        ]
    lines += [
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        # Every setting the adapter depends on (the train stage's fingerprint); the prompt is quoted above.
        *[f"| {n} | {getattr(cfg, n)} |" for n in DEPENDS["train"] if n != "SYSTEM_PROMPT"],
        f"| precision | {metrics.get('precision')} |",
        f"| base weights in training | {train_log.get('train', {}).get('base_weights', 'not recorded')} |",
        f"| final training loss | {final_loss} |",
        "",
        "Loss is computed on the doctor's reply and its end-of-turn token only.",
        "",
        "## Data",
        "",
        f"Sampled with seed {cfg.SEED} from `{cfg.DATASET}` ({sample_stats['rows_in_dataset']:,} rows): "
        f"{sample_stats['rows_read']:,} read, {sample_stats['rows_kept']:,} kept "
        f"({sample_stats['train_rows']:,} train, {sample_stats['eval_rows']:,} held out). "
        "Cleaning removed URLs, link markers, Q&A-platform boilerplate and sign-offs with doctor names, "
        "empty rows and duplicates.",
        "",
        f"- rows dropped: {sample_stats['dropped'] or 'none'}",
        f"- rows changed by each cleaning rule: {sample_stats['changed'] or 'none'}",
        f"- training tokens: {fmt.get('tokens', '–')} ({fmt.get('trained_tokens', '–')} in replies); "
        f"replies truncated at {cfg.MAX_SEQ_LENGTH} tokens: {fmt.get('reply_truncated', '–')}",
        "",
        "## Limitations",
        "",
        "- The replies it learned from are short online answers by doctors (HealthCareMagic, iCliniq); they are "
        "often terse, sometimes outdated, and were given without examining the patient.",
        "- English only. Not evaluated by clinicians. ROUGE-L measures word overlap with one doctor's reply, "
        "not correctness.",
        "- The safety screen is rule-based: it catches missing referrals and boilerplate, not wrong medicine.",
        f"- The base model's license ({cfg.MODEL_LICENSE}) and acceptable-use policy apply.",
        "",
    ]
    return "\n".join(lines)


def write(cfg: Settings, run_dir: Path) -> list[Path]:
    out = run_dir / "report"
    plot_loss(read_json(out / "train_log.json"), read_json(run_dir / "eval" / "metrics.json"), out / "loss.png")
    atomic_write_text(out / "README.md", model_card(cfg, run_dir))
    log.info("report written to %s", out / "README.md")
    return [out / "README.md", out / "loss.png"]
