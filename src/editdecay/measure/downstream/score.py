"""The study's downstream score DS (docs/PROTOCOL.md; docs/METHODS.md E7): the mean accuracy over tasks.

Written once here and used by the harness (the number stored with every evaluation) and by the
report (recomputed from the stored per-task metrics), so the two can never disagree by definition.
"""

from __future__ import annotations

from typing import Mapping

SUMMARY_METRIC = "acc"        # lm-eval's accuracy; lm-eval may spell it "acc,none"


def metric_base(metric: str) -> str:
    """"acc,none" -> "acc": lm-eval's metric name without its filter suffix."""
    return metric.split(",", 1)[0]


def mean_accuracy(tasks: Mapping[str, Mapping[str, object]]) -> tuple[float | None, int]:
    """DS = mean of `acc` over the tasks that report it, and how many do; (None, 0) when none does.

    tasks: task name -> {metric: value}. Tasks without accuracy (e.g. perplexity) are left out, never
    averaged with accuracies.
    """
    accs = []
    for metrics in tasks.values():
        acc = next((v for k, v in metrics.items() if metric_base(k) == SUMMARY_METRIC and v is not None), None)
        if acc is not None:
            accs.append(float(acc))
    return (sum(accs) / len(accs) if accs else None), len(accs)


__all__ = ["SUMMARY_METRIC", "mean_accuracy", "metric_base"]
