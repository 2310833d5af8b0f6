"""The study's downstream score DS (docs/PROTOCOL.md; docs/METHODS.md E7): the mean accuracy over tasks.

Written once here and used by the harness (the number stored with every evaluation) and by the
report (recomputed from the stored per-task metrics), so the two can never disagree by definition.

Two protocols score tasks, and their accuracies are never averaged together: "generation" (the study's
own, commonsense.py: tasks named 'commonsense:<task>') and "loglikelihood" (lm-eval's multiple choice).
DS is the mean over the tasks of the study's protocol when any task was scored that way, else over the
lm-eval tasks; `accuracy_by_protocol` gives both.
"""

from __future__ import annotations

from typing import Mapping

SUMMARY_METRIC = "acc"        # lm-eval's accuracy; lm-eval may spell it "acc,none"
GENERATION, LOGLIKELIHOOD = "generation", "loglikelihood"
_GENERATION_PREFIX = "commonsense:"      # commonsense.py task_key


def metric_base(metric: str) -> str:
    """"acc,none" -> "acc": lm-eval's metric name without its filter suffix."""
    return metric.split(",", 1)[0]


def protocol_of(task: str) -> str:
    """How a task (as results name it) was scored: "generation" or "loglikelihood"."""
    return GENERATION if str(task).startswith(_GENERATION_PREFIX) else LOGLIKELIHOOD


def accuracy_by_protocol(tasks: Mapping[str, Mapping[str, object]]) -> dict[str, tuple[float, int]]:
    """{protocol: (mean `acc` over its tasks that report one, how many do)} for the protocols present."""
    accs: dict[str, list[float]] = {}
    for name, metrics in tasks.items():
        acc = next((v for k, v in metrics.items() if metric_base(k) == SUMMARY_METRIC and v is not None), None)
        if acc is not None:
            accs.setdefault(protocol_of(name), []).append(float(acc))
    return {p: (sum(v) / len(v), len(v)) for p, v in accs.items()}


def mean_accuracy(tasks: Mapping[str, Mapping[str, object]]) -> tuple[float | None, int]:
    """DS = mean of `acc` over the tasks of one protocol (the study's generation protocol when present, else
    lm-eval's), and how many tasks; (None, 0) when no task reports an accuracy.

    tasks: task name -> {metric: value}. Tasks without accuracy (e.g. perplexity) are left out, never
    averaged with accuracies.
    """
    by = accuracy_by_protocol(tasks)
    chosen = by.get(GENERATION) or by.get(LOGLIKELIHOOD)
    return chosen if chosen else (None, 0)


__all__ = ["GENERATION", "LOGLIKELIHOOD", "SUMMARY_METRIC", "accuracy_by_protocol", "mean_accuracy", "metric_base",
           "protocol_of"]
