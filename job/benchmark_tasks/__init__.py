"""The benchmark's tasks, MultiMedQA's multiple-choice suite, by lm-eval's task names: the one list.

The BENCHMARK_TASKS setting's names and default (job/config.py), the folders lm-eval indexes (job/benchmark.py),
the bundled questions (FIXTURES/<name>.jsonl) and the README's table come from `TASKS`; tests/test_benchmark.py
checks every row against lm-eval's own config and the fixture folder. A new task: a row here and its fixture, and
for a task of our own its YAML in this folder (as pubmedqa.yaml); the sky YAMLs' BENCHMARK_TASKS follow the
default (tests/test_sky.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

OWN = Path(__file__).parent  # our own task YAMLs
FIXTURES = OWN.parent / "fixtures" / "benchmark"  # a few questions per task, written for this project


class Task(NamedTuple):
    folder: str | None  # lm-eval's folder under lm_eval/tasks/ that defines the task; None: ours, in OWN
    dataset: str  # the Hub dataset lm-eval reads the questions from
    config: str | None  # its config (subset)
    split: str  # the split scored
    answer: str = "the answer"  # the field holding the answer, where lm-eval's target is a function, not a field


_MMLU = "anatomy clinical_knowledge college_biology college_medicine medical_genetics professional_medicine".split()
TASKS = {
    "medqa_4options": Task("medqa", "GBaker/MedQA-USMLE-4-options-hf", None, "test", answer="label"),  # USMLE-style
    "medmcqa": Task("medmcqa", "openlifescienceai/medmcqa", None, "validation"),  # its test split has no answers
    # Ours (pubmedqa.yaml): lm-eval's stock prompt and targets on a source that loads as plain files.
    "pubmedqa": Task(None, "qiaojin/PubMedQA", "pqa_labeled", "train"),  # yes / no / maybe
    **{f"mmlu_{s}": Task("mmlu/default", "cais/mmlu", s, "test") for s in _MMLU},
}


def render_table() -> str:
    """The README's table of the tasks (`python -m job config --write-docs`)."""
    rows = ["| task | Hub dataset (config), split | defined by |", "|---|---|---|"]
    for name, t in TASKS.items():
        config = f" (`{t.config}`)" if t.config else ""
        where = f"lm-eval's `{t.folder}/`" if t.folder else f"ours, `job/benchmark_tasks/{name}.yaml`"
        rows.append(f"| `{name}` | `{t.dataset}`{config}, {t.split} | {where} |")
    return "\n".join(rows) + "\n"
