"""Decay during training (docs/METHODS.md E7, decay curve): edit metrics and task accuracy every k steps.

The callback evaluates the model in memory at step 0 (the edited model, before
any training step and before adapters are attached), every `every` optimiser
steps, and at the last step. No model copies are written: one evaluation is a
few batched forward passes (E6 scores via `metrics.evaluate_requests`, task
scores via `task.exact_match`: exact match, token accuracy, NLL). Each point is appended to a JSONL file as it
is measured, so an interrupted run still has its curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from editdecay.core.arch import unwrap_peft
from editdecay.core.cache import dumps_json
from editdecay.core.request import EditRequest
from editdecay.data.instructions import InstructionRecord
from editdecay.finetune import schedule
from editdecay.measure.metrics import RequestOutcome, aggregate, evaluate_requests
from editdecay.measure.task import TaskScore, exact_match

@dataclass
class DecayCallback:
    """Evaluate `requests` (E6) and held-out task records at the steps `every` names (finetune/schedule.py: every
    k steps, 0: only first and last; or a list of steps)."""

    requests: Sequence[EditRequest] = ()
    task_records: Sequence[InstructionRecord] = ()
    every: int | tuple[int, ...] = 0
    template: str = "compact"
    batch_size: int = 32
    path: Path | None = None                      # curve JSONL, appended and flushed per point
    task_name: str | None = None                  # the held-out task's name (embedded, chatterbot), in the metrics
    control: Sequence[EditRequest] = ()           # knowledge-control facts (measure/knowledge.py), measured alike
    examples_per_step: int = 1                    # training examples per optimiser step (batch_size * grad_accum)
    request_path: Path | None = None              # per-request curve JSONL (measure/decay_time.py), per point
    points: list[dict] = field(default_factory=list)
    outcomes: dict[int, list[RequestOutcome]] = field(default_factory=dict)   # step -> per-request outcomes
    control_outcomes: dict[int, list[RequestOutcome]] = field(default_factory=dict)   # step -> control outcomes

    def __post_init__(self) -> None:
        self.every = schedule.check(self.every)

    def due(self, step: int, last_step: int) -> bool:
        return schedule.due(self.every, step, last_step)

    def evaluate(self, model, tokenizer, step: int, epoch: float | None = None) -> dict:
        """Measure the model now; returns the curve point (also stored in `points`, per-request in `outcomes`).
        `epoch`: examples trained on so far / examples in the training set (the study's dose unit), recorded with
        the point when given."""
        t0 = time.perf_counter()
        measured, task = measure(model, tokenizer, [*self.requests, *self.control], self.task_records,
                                 template=self.template, batch_size=self.batch_size)
        outcomes, control = measured[:len(self.requests)], measured[len(self.requests):]
        agg = aggregate(outcomes)
        point = {
            "step": step, **({"epoch": round(epoch, 4)} if epoch is not None else {}), "efficacy": agg["efficacy"], "paraphrase": agg["paraphrase"],
            "neighborhood": agg["neighborhood"], **task_keys(task, self.task_name),
            "harmonic_mean": agg["harmonic_mean"], "n_requests": agg["n"],
            "eval_seconds": round(time.perf_counter() - t0, 3),
        }
        self.points.append(point)
        self.outcomes[step] = outcomes
        self.control_outcomes[step] = control
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(dumps_json(point) + "\n")       # NaN -> null + status, never bare NaN
                f.flush()
        if self.request_path is not None and (outcomes or control):
            from editdecay.measure.decay import success
            from editdecay.measure.knowledge import knows

            line = {"step": step, "examples_seen": step * self.examples_per_step,
                    "requests": {o.case_id: {"success": success(o), "margin": o.margin} for o in outcomes},
                    "control": {o.case_id: {"known": knows(o), "margin": o.margin} for o in control}}
            with open(self.request_path, "a", encoding="utf-8") as f:
                f.write(dumps_json(line) + "\n")
                f.flush()
        return point

    def stage_metrics(self, step: int) -> dict:
        """Metrics of the model at `step` in the stage format of result files: `aggregate` + task keys."""
        point = next(p for p in self.points if p["step"] == step)
        return {**aggregate(self.outcomes[step]), **{k: point[k] for k in TASK_KEYS}}


def measure(model, tokenizer, requests: Sequence[EditRequest], task_records: Sequence[InstructionRecord], *,
            template: str = "compact", batch_size: int = 32) -> tuple[list[RequestOutcome], TaskScore | None]:
    """E6 outcomes of `requests` and exact-match task accuracy, in eval mode (dropout off), no gradients.

    A PeftModel is measured through its base model: peft injects the adapter layers into that module tree, so
    its forward pass includes them, and it has the plain module names the architecture table describes.
    """
    model = unwrap_peft(model)
    was_training = model.training
    model.eval()
    try:
        outcomes = evaluate_requests(model, tokenizer, list(requests), batch_size=batch_size) if requests else []
        task = exact_match(model, tokenizer, task_records, template=template, batch_size=batch_size) \
            if task_records else None
    finally:
        model.train(was_training)
    return outcomes, task


def stage_from(outcomes: Sequence[RequestOutcome], task: TaskScore | None, task_name: str | None = None) -> dict:
    """The format of one model's metrics in result files (`metrics.M0`, ...): `aggregate` plus task keys."""
    return {**aggregate(outcomes), **task_keys(task, task_name)}


TASK_KEYS = ("task_accuracy", "task_prefix_accuracy", "task_token_accuracy", "task_nll", "n_task", "task_name")


def task_keys(task: TaskScore | None, name: str | None) -> dict:
    """The held-out task's keys of a curve point / stage (`TASK_KEYS`; None and n_task 0 without a task)."""
    return {"task_accuracy": task.accuracy if task else None,
            "task_prefix_accuracy": task.prefix_accuracy if task else None,
            "task_token_accuracy": task.token_accuracy if task else None,
            "task_nll": task.nll if task else None, "n_task": task.n if task else 0,
            "task_name": name if task else None}
