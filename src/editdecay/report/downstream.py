"""Downstream scores of one model stage, in one shape whatever produced them.

A cell result can hold two kinds of downstream numbers per model (M0, M_e, M_f, M_ef):
- the embedded task's exact match: `task_accuracy`, `task_prefix_accuracy`, `n_task`
  (finetune/task.py), reported here as task "embedded" with metrics accuracy / prefix_accuracy;
- lm-eval tasks (optional): `downstream = {task: {metric: value, ..., "n": int}}`.
Both become `{task: {metric: value}, ...}` plus `n` per task, so tables and figures
treat them alike and show whatever tasks and metrics are present.

The study's downstream score (PROTOCOL.md) is the mean accuracy over its benchmarks:
`downstream_score` is the mean of `acc` over the lm-eval tasks that have it (the grid stores the same
number as `downstream_score`; measures.py checks they agree). `primary_metric` picks the one metric a
task shows in summary tables: accuracy first, else e.g. a perplexity (never averaged with accuracies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

EMBEDDED = "embedded"
# Preferred metric per task in summary tables, in order; lm-eval may spell them "acc,none".
PRIMARY = ("acc", "accuracy", "acc_norm", "exact_match", "em", "f1", "mcc")
FRACTIONS = PRIMARY + ("prefix_accuracy",)        # metrics in [0, 1], shown in percent
COUNTS = ("n", "n_tokens")                         # sizes, not scores


@dataclass(frozen=True)
class TaskScores:
    task: str
    metrics: Mapping[str, float]       # metric -> value (numbers only; "n" is kept apart)
    n: int | None


def _base_name(metric: str) -> str:
    return metric.split(",", 1)[0]


def is_error_metric(metric: str) -> bool:
    return "stderr" in metric


def downstream_scores(metrics: Mapping | None) -> dict[str, TaskScores]:
    """Every downstream task of one model's stored metrics; {} when there are none."""
    m = metrics or {}
    out: dict[str, TaskScores] = {}
    if m.get("task_accuracy") is not None:
        vals = {"accuracy": m["task_accuracy"]}
        if m.get("task_prefix_accuracy") is not None:
            vals["prefix_accuracy"] = m["task_prefix_accuracy"]
        out[EMBEDDED] = TaskScores(EMBEDDED, vals, m.get("n_task"))
    for task, scores in sorted((m.get("downstream") or {}).items()):
        if not isinstance(scores, Mapping):
            continue
        vals = {k: float(v) for k, v in scores.items()
                if k not in COUNTS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        n = scores.get("n")
        out[str(task)] = TaskScores(str(task), vals, int(n) if isinstance(n, (int, float)) else None)
    return out


def is_fraction(metric: str) -> bool:
    return _base_name(metric) in FRACTIONS


def downstream_score(tasks: Mapping[str, TaskScores]) -> tuple[float | None, int]:
    """The study's downstream score: mean `acc` over the lm-eval tasks that report it, and how many do."""
    accs = []
    for name, t in tasks.items():
        if name == EMBEDDED:
            continue
        acc = next((v for k, v in t.metrics.items() if _base_name(k) == "acc"), None)
        if acc is not None:
            accs.append(acc)
    return (sum(accs) / len(accs) if accs else None), len(accs)


def primary_metric(scores: TaskScores) -> str | None:
    """The metric a task shows in summary tables: accuracy-like first, else its first score (e.g. perplexity)."""
    names = [k for k in scores.metrics if not is_error_metric(k)]
    for want in PRIMARY:
        for k in names:
            if _base_name(k) == want:
                return k
    return names[0] if names else None


__all__ = ["EMBEDDED", "TaskScores", "downstream_score", "downstream_scores", "is_error_metric", "is_fraction",
           "primary_metric"]
