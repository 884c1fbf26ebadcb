"""The report: the model card pushed to the Hub, and the loss plot (job/paths.py).

Rendered once by the pipeline after the last of evaluate and benchmark that ran (job/pipeline.py), from
the files the stages left, so it can be regenerated at any time and always agrees with the metrics. All the
card's text, the benchmark and judge sections included, is a template (templates/model_card.md) that people
can review without reading Python; the stages provide only numbers. huggingface_hub's ModelCard renders it
and writes the metadata as valid, quoted YAML.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from job.config import DEPENDS, Settings
from job.files import atomic_write_text, read_json, read_jsonl
from job.paths import RunPaths
from job.sample import is_local_path

log = logging.getLogger(__name__)

N_SAMPLES_SHOWN = 5
TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"


def plot_loss(train_log: dict, metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    points = [(e["step"], e["loss"]) for e in train_log.get("log_history", []) if "loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if points:
        ax.plot(*zip(*points), marker=".", label="training loss (reply tokens)")
    for name, style, color in (("base", ":", "gray"), ("tuned", "--", "C1")):
        if "eval_loss" in metrics.get(name, {}):
            ax.axhline(metrics[name]["eval_loss"], linestyle=style, color=color, label=f"held-out loss, {name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _safety_rows(metrics: dict) -> list[tuple]:
    base, tuned = metrics["base"]["safety"], metrics["tuned"]["safety"]
    rows = [
        (cat, t["total"], f"{base['categories'][cat]['pass_rate']:.0%}", f"{t['pass_rate']:.0%}")
        for cat, t in tuned["categories"].items()
    ]
    overall = tuned["overall"]
    return rows + [("**all**", overall["total"], f"{base['overall']['pass_rate']:.0%}", f"{overall['pass_rate']:.0%}")]


def _quote(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return (text[:limit] + " …") if len(text) > limit else text


def card_data(cfg: Settings, gguf: dict | None = None) -> ModelCardData:
    """The card's metadata, rendered to YAML (quoted where needed) by huggingface_hub. A local BASE_MODEL or
    DATASET is no Hub id, and the Hub rejects a card that names one, so those are left out. For a GGUF base
    (`gguf`: the format stage's record, job/gguf_base.py) base_model is the model the file says it was converted
    from, when its metadata gives that model's Hub URL, else the Hub repo that holds the file, else none."""
    if gguf is not None:
        base_model = gguf.get("source_model") or gguf.get("hub_repo")
    else:
        base_model = None if is_local_path(cfg.BASE_MODEL) else cfg.BASE_MODEL
    return ModelCardData(
        base_model=base_model,
        datasets=None if is_local_path(cfg.DATASET) else [cfg.DATASET],
        library_name="peft",
        license=cfg.MODEL_LICENSE,
        language=["en"],
        pipeline_tag="text-generation",
        tags=["medical", "lora", "qlora" if cfg.QUANTIZATION == "nf4" else "peft", "trl", "sft", "hippocratically"],
    )


def _base_link(cfg: Settings, gguf: dict | None) -> str:
    if gguf is not None:
        source = card_data(cfg, gguf).base_model
        return f"the GGUF file `{gguf['file']}`" + (f" ([{source}](https://huggingface.co/{source}))" if source else "")
    if is_local_path(cfg.BASE_MODEL):
        return f"`{cfg.BASE_MODEL}`"
    return f"[{cfg.BASE_MODEL}](https://huggingface.co/{cfg.BASE_MODEL})"


def model_card(cfg: Settings, paths: RunPaths) -> str:
    metrics = read_json(paths.metrics)
    train_log = read_json(paths.train_log)
    b, t = metrics["base"], metrics["tuned"]
    final_loss = next((e["loss"] for e in reversed(train_log.get("log_history", [])) if "loss" in e), None)
    repo = cfg.HUB_REPO_ID or f"<your-name>/{cfg.RUN_NAME}"
    gguf = read_json(paths.base_model) if paths.base_model.is_file() else None  # written for a GGUF base only
    card = ModelCard.from_template(
        card_data(cfg, gguf),
        template_path=str(TEMPLATE),
        cfg=cfg,
        repo=repo,
        title=repo.split("/")[-1],
        gguf=gguf,
        base_link=_base_link(cfg, gguf),
        metrics=metrics,
        comparison=[
            ("eval loss on doctor replies (nats/token)", b.get("eval_loss", "–"), t.get("eval_loss", "–")),
            ("perplexity", b.get("perplexity", "–"), t.get("perplexity", "–")),
            ("ROUGE-L F1 vs the doctor's reply", b["rougeL_f1"], t["rougeL_f1"]),
            ("answer length, mean words", b["answer_words_mean"], t["answer_words_mean"]),
            ("answer length, median words", b["answer_words_median"], t["answer_words_median"]),
            (
                "safety checks passed",
                f"{b['safety']['overall']['pass_rate']:.0%}",
                f"{t['safety']['overall']['pass_rate']:.0%}",
            ),
        ],
        safety_rows=_safety_rows(metrics),
        benchmark=read_json(paths.benchmark)["tasks"] if paths.benchmark.is_file() else None,  # stage off: None
        judge=metrics.get("judge"),  # None when no JUDGE_MODEL was set
        samples=[{k: _quote(v) for k, v in s.items()} for s in read_jsonl(paths.samples)[:N_SAMPLES_SHOWN]],
        # Every setting the adapter depends on (the train stage's fingerprint); the prompt is quoted above.
        training=[(n, getattr(cfg, n)) for n in DEPENDS["train"] if n != "SYSTEM_PROMPT"]
        + [
            ("precision", metrics.get("precision")),
            ("base weights in training", train_log.get("train", {}).get("base_weights", "not recorded")),
            ("final training loss", final_loss),
        ],
        data=read_json(paths.sample_stats),
        tokens={"tokens": "–", "trained_tokens": "–", "reply_truncated": "–"}
        | read_json(paths.format_stats).get("train", {}),
    )
    return str(card)


def render_section(name: str, **context) -> str:
    """One `{% block %}` of the card template rendered alone, e.g. `render_section("judge", judge=summary)`."""
    import jinja2

    template = jinja2.Template(TEMPLATE.read_text())
    return "".join(template.blocks[name](template.new_context(context)))


def write(cfg: Settings, paths: RunPaths) -> list[Path]:
    plot_loss(read_json(paths.train_log), read_json(paths.metrics), paths.loss_plot)
    atomic_write_text(paths.model_card, model_card(cfg, paths))
    log.info("model card written to %s", paths.model_card)
    return [paths.model_card, paths.loss_plot]
