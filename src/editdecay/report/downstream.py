"""Downstream scores of one model stage, in one shape whatever produced them.

A cell result can hold two kinds of downstream numbers per model (M0, M_e, M_f, M_ef):
- the held-out task's scores: `task_accuracy`, `task_prefix_accuracy`, `task_token_accuracy`, `task_nll`,
  `n_task` (measure/task.py), reported here under the task's name (`task_name`: "embedded", "chatterbot";
  results written before the name was recorded are "embedded") with metrics accuracy / prefix_accuracy /
  token_accuracy / nll. Its headline metric (`headlines()`) is what its data source declares
  (data/source.py, `task_names`): exact match for the embedded task and "chatterbot-choice", token accuracy
  for chatterbot's free text written by people;
- lm-eval tasks (optional): `downstream = {task: {metric: value, ..., "n": int}}`.
Both become `{task: {metric: value}, ...}` plus `n` per task, so tables and figures
treat them alike and show whatever tasks and metrics are present.

The study's downstream score (docs/PROTOCOL.md) is the mean accuracy over its benchmarks:
`downstream_score` is the mean of `acc` over the lm-eval tasks that have it (the grid stores the same
number as `downstream_score`; measures.py checks they agree). `primary_metric` picks the one metric a
task shows in summary tables: accuracy first, else e.g. a perplexity (never averaged with accuracies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from editdecay.data.sources import held_out_names
from editdecay.measure.downstream.score import mean_accuracy, metric_base

EMBEDDED = "embedded"       # the held-out task of results that record no task name
# Preferred metric per task in summary tables, in order; lm-eval may spell them "acc,none".
PRIMARY = ("acc", "accuracy", "acc_norm", "exact_match", "em", "f1", "mcc")
FRACTIONS = PRIMARY + ("prefix_accuracy", "token_accuracy")        # metrics in [0, 1], shown in percent
COUNTS = ("n", "n_tokens")                         # sizes, not scores


@dataclass(frozen=True)
class TaskScores:
    task: str
    metrics: Mapping[str, float]       # metric -> value (numbers only; "n" is kept apart)
    n: int | None


def is_error_metric(metric: str) -> bool:
    return "stderr" in metric


def downstream_scores(metrics: Mapping | None) -> dict[str, TaskScores]:
    """Every downstream task of one model's stored metrics; {} when there are none."""
    m = metrics or {}
    out: dict[str, TaskScores] = {}
    if m.get("task_accuracy") is not None:
        name = held_out_name(m)
        vals = {"accuracy": m["task_accuracy"]}
        for key in ("prefix_accuracy", "token_accuracy", "nll"):
            if m.get(f"task_{key}") is not None:
                vals[key] = m[f"task_{key}"]
        out[name] = TaskScores(name, vals, m.get("n_task"))
    for task, scores in sorted((m.get("downstream") or {}).items()):
        if not isinstance(scores, Mapping):
            continue
        vals = {k: float(v) for k, v in scores.items()
                if k not in COUNTS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        n = scores.get("n")
        out[str(task)] = TaskScores(str(task), vals, int(n) if isinstance(n, (int, float)) else None)
    return out


def headlines() -> dict[str, tuple[str, str]]:
    """Held-out task name -> (its headline metric among the task's metrics, its key in stored metrics), for every
    held-out task a registered data source records (not lm-eval tasks)."""
    return {name: (metric, f"task_{metric}") for name, metric in held_out_names().items()}


def is_held_out(task: str) -> bool:
    return task in held_out_names()


def held_out_name(m: Mapping | None) -> str:
    """The held-out task of stored metrics or a curve point (`task_name`; "embedded" when not recorded)."""
    return (m or {}).get("task_name") or EMBEDDED


def headline_key(m: Mapping | None) -> str:
    """The stored key of the held-out task's headline score (`headlines()`), e.g. task_token_accuracy."""
    known = headlines()
    return known.get(held_out_name(m), known[EMBEDDED])[1]


def headline_label(key: str) -> str:
    return {"task_accuracy": "exact match", "task_token_accuracy": "token accuracy"}.get(key, key)


def is_fraction(metric: str) -> bool:
    return metric_base(metric) in FRACTIONS


def downstream_score(tasks: Mapping[str, TaskScores]) -> tuple[float | None, int]:
    """The study's downstream score: mean `acc` over the lm-eval tasks that report it, and how many do
    (measure.downstream.score.mean_accuracy; held-out tasks are not lm-eval tasks and stay out)."""
    return mean_accuracy({name: t.metrics for name, t in tasks.items() if not is_held_out(name)})


def primary_metric(scores: TaskScores) -> str | None:
    """The metric a task shows in summary tables: accuracy-like first, else its first score (e.g. perplexity)."""
    names = [k for k in scores.metrics if not is_error_metric(k)]
    headline = headlines().get(scores.task)
    if headline is not None and headline[0] in names:
        return headline[0]
    for want in PRIMARY:
        for k in names:
            if metric_base(k) == want:
                return k
    return names[0] if names else None


__all__ = ["EMBEDDED", "TaskScores", "headline_key", "headline_label", "headlines", "held_out_name", "is_held_out", "downstream_score", "downstream_scores", "is_error_metric", "is_fraction",
           "primary_metric"]
