"""The report: the model card pushed to the Hub, and the loss plot (job/paths.py).

Rendered once by the pipeline after the last of evaluate and benchmark that ran (job/pipeline.py), from
the files the stages left and what the manifest recorded of them, so it can be regenerated at any time and
always agrees with the metrics. Every setting the card names is the one recorded for the stage that used it
(the train stage's for training and data), never the current settings: a card describes the adapter it ships,
with the data's hash or revision, the base model's and the code that trained it (`provenance_rows`). All the
card's text, the benchmark and judge sections included, is a template (templates/model_card.md) that people
can review without reading Python; the stages provide only numbers. huggingface_hub's ModelCard renders it
and writes the metadata as valid, quoted YAML.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from job import benchmark, mixture
from job.config import DEPENDS, SETTINGS, Settings, with_overrides
from job.files import atomic_write_text, is_local_path, read_json, read_jsonl
from job.paths import RunPaths
from job.provenance import describe_code

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


# Markdown's inline marks: a sample's "![x](http://...)" or "**" would render as an image or as bold.
_MARKDOWN = re.compile(r"([\\`*_\[\]])")


def _quote(text: str, limit: int = 600) -> str:
    """Text from the data or a model's answer as one line of the card that renders as the text it is: HTML
    (`<script>`, `<img onerror=...>`, `<!--`) escaped, Markdown's inline marks backslashed."""
    text = " ".join(str(text).split())
    text = (text[:limit] + " …") if len(text) > limit else text
    return _MARKDOWN.sub(r"\\\1", html.escape(text, quote=False))


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
        datasets=[name for _, name in mixture.input_names(cfg.DATASET) if not is_local_path(name)] or None,
        library_name="peft",
        license=cfg.MODEL_LICENSE,
        language=["en"],
        pipeline_tag="text-generation",
        tags=["medical", "lora", "qlora" if cfg.QUANTIZATION == "nf4" else "peft", "trl", "sft", "hippocratically"],
    )


def recorded_settings(cfg: Settings, manifest: dict | None) -> Settings:
    """The settings the finished stages ran with, as the manifest recorded them: evaluate's and benchmark's for
    their own settings, the train stage's for everything up to training (it made the adapter). Settings no stage
    recorded (push's, or ones newer than the run) keep their current values."""
    stages = (manifest or {}).get("stages", {})
    recorded: dict = {}
    for stage in ("evaluate", "benchmark", "train"):  # train last: its values win for the adapter's settings
        rec = stages.get(stage)
        if isinstance(rec, dict) and rec.get("status") == "done" and isinstance(rec.get("fingerprint"), dict):
            recorded |= {k: v for k, v in rec["fingerprint"].items() if k in SETTINGS}
    return with_overrides(cfg, **recorded)


def _input_text(inp: dict | None) -> str:
    if not isinstance(inp, dict):
        return "not recorded (trained by an older version of the job)"
    if "revision" in inp:
        return f"`{inp.get('id')}` at revision `{inp.get('revision') or 'not pinned'}`"
    if inp.get("sha256"):
        return f"`{Path(str(inp.get('id'))).name}`, sha256 `{inp['sha256']}`"
    return f"`{inp.get('id')}` (missing when recorded)"


def _data_rows(inputs: dict) -> list[tuple[str, str]]:
    """DATASET's input, or each source's of a mixture (DATASET[source], job/mixture.py) after its mixture file's."""
    sources = [v for k, v in inputs.items() if k.startswith("DATASET[")]
    if not sources:
        return [("training data", _input_text(inputs.get("DATASET")))]
    file = [("mixture file", _input_text(inputs["DATASET"]))] if "DATASET" in inputs else []
    return file + [("training data", _input_text(inp)) for inp in sources]


def provenance_rows(manifest: dict | None) -> list[tuple[str, str]]:
    """What made the adapter, from the manifest's records of the stages that made it."""
    stages = (manifest or {}).get("stages", {})
    train = stages.get("train", {}) if isinstance(stages.get("train"), dict) else {}
    sample = stages.get("sample", {}) if isinstance(stages.get("sample"), dict) else {}
    inputs = sample.get("inputs") or {}
    rows = [
        *_data_rows(inputs),
        ("base model", _input_text((train.get("inputs") or {}).get("BASE_MODEL"))),
    ]
    questions = inputs.get("BENCHMARK_DATA")
    if questions:
        rows.append(("benchmark questions (decontamination)", _input_text(questions)))
    rows += [
        ("code that trained it", describe_code(train.get("code"))),
        ("training fingerprint (settings, data, base model)", f"`{train.get('digest') or 'not recorded'}`"),
        ("trained", train.get("finished_at") or "not recorded"),
    ]
    return rows


def _benchmarked(paths: RunPaths, manifest: dict | None) -> bool:
    """eval/benchmark.json exists and, where the manifest is known, the benchmark stage that wrote it is recorded
    as done: a retrain drops that record (job/pipeline.py), so a benchmark of an earlier adapter is never shown."""
    if not paths.benchmark.is_file():
        return False
    return manifest is None or manifest.get("stages", {}).get("benchmark", {}).get("status") == "done"


def _base_link(cfg: Settings, gguf: dict | None) -> str:
    if gguf is not None:
        source = card_data(cfg, gguf).base_model
        return f"the GGUF file `{gguf['file']}`" + (f" ([{source}](https://huggingface.co/{source}))" if source else "")
    if is_local_path(cfg.BASE_MODEL):
        return f"`{cfg.BASE_MODEL}`"
    return f"[{cfg.BASE_MODEL}](https://huggingface.co/{cfg.BASE_MODEL})"


def model_card(cfg: Settings, paths: RunPaths, manifest: dict | None = None) -> str:
    cfg = recorded_settings(cfg, manifest)
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
        # Only a benchmark of this adapter: after a retrain, the file left by the one before is not shown.
        benchmark=benchmark.results(paths) if _benchmarked(paths, manifest) else None,
        judge=metrics.get("judge"),  # None when no JUDGE_MODEL was set
        samples=[{k: _quote(v) for k, v in s.items()} for s in read_jsonl(paths.samples)[:N_SAMPLES_SHOWN]],
        # Every setting the adapter depends on (the train stage's fingerprint); the prompt is quoted above.
        provenance=provenance_rows(manifest),
        training=[(n, getattr(cfg, n)) for n in DEPENDS["train"] if n != "SYSTEM_PROMPT"]
        + [
            ("precision", metrics.get("precision")),
            ("base weights in training", train_log.get("train", {}).get("base_weights", "not recorded")),
            (
                "modules with adapters",
                ", ".join(train_log.get("train", {}).get("lora_target_modules", [])) or "not recorded",
            ),
            (
                "turn tokens trained with the adapter",
                ", ".join(train_log.get("train", {}).get("turn_tokens", [])) or "none",
            ),
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


def write(cfg: Settings, paths: RunPaths, manifest: dict | None = None) -> list[Path]:
    """The card and the loss plot; `manifest`: the run's records, which name what made the adapter."""
    plot_loss(read_json(paths.train_log), read_json(paths.metrics), paths.loss_plot)
    atomic_write_text(paths.model_card, model_card(cfg, paths, manifest))
    log.info("model card written to %s", paths.model_card)
    return [paths.model_card, paths.loss_plot]
