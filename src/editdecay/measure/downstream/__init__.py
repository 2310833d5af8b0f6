"""Downstream scores of in-memory models through lm-evaluation-harness (docs/METHODS.md E7: DS of M0, M_e, M_f, M_ef).

- `spec`        the task-spec grammar (everyday, the study's eight tasks, lm-eval:NAME, local:DIR, ppl:FILE);
                pure, so grid files and command lines are checked without torch or lm-eval
- `everyday`    editdecay's own multiple-choice task (tasks/everyday_mc.*), authored here, runs offline
- `perplexity`  perplexity on a local text corpus through lm-eval's rolling log-likelihood
- `harness`     load the tasks (before any model work), score a model object with lm-eval's HFLM

Importing this package imports neither torch nor lm-eval; `load_tasks` and `evaluate_downstream` do.
"""

from editdecay.measure.downstream.harness import (
           DownstreamResult,
           LoadedTasks,
           evaluate_downstream,
           load_tasks,
)
from editdecay.measure.downstream.spec import (
           EVERYDAY,
           STUDY_TASKS,
           DownstreamSpec,
           parse_task,
           parse_tasks,
           task_digest,
)

__all__ = ["DownstreamResult", "DownstreamSpec", "EVERYDAY", "LoadedTasks", "STUDY_TASKS", "evaluate_downstream",
           "load_tasks", "parse_task", "parse_tasks", "task_digest"]
