"""Compute one stage safely, in whatever process: locking, failure records, progress lines.

`execute_stage` is the one way any backend computes a stage, in whatever process:

    finished already?            -> "reused"   (nothing is read or computed)
    take the stage's file lock   (busy and wait=False -> "busy": the caller tries again later);
                                 write the holder record (host, pid, since, heartbeat)
    finished meanwhile?          -> "reused"   (another runner computed it while we waited)
    a dependency not finished?   -> "blocked"
    started max_attempts times already, each time killed before it ended?
                                 -> "failed", recorded (out of memory: the OOM killer's SIGKILL leaves no error)
    count this start on disk, remove half-written output of killed attempts, compute into a temporary
    directory (heartbeat refreshed meanwhile), publish it atomically, clear the count
                                 -> "computed", or "failed" with error and traceback recorded beside the stage

So killing a runner at any moment (kill -9 included) loses at most the stage it was
computing, which the next runner detects (no manifest) and computes again, up to
`max_attempts` starts; and two runners on one grid never compute the same stage twice.
Every record beside a stage is written through the stage's lease (its lock, held).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from editdecay.core.devices import set_threads
from editdecay.core.memory import set_host_memory_share
from editdecay.grid.plan import Plan
from editdecay.grid.store import MAX_ATTEMPTS, GridStore, StageLease

log = logging.getLogger(__name__)

OUTCOMES = ("computed", "reused", "failed", "blocked", "busy")


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    kind: str
    state: str                      # one of OUTCOMES
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def execute_stage(root: str | Path, stage_id: str, *, plan_id: str | None = None, wait: bool = True,
                  progress: bool = False, threads: int | None = None, memory_share: float | None = None,
                  on_start: Callable[[], None] | None = None) -> StageOutcome:
    """Compute one stage of the grid in `root` unless it is finished (see module docstring).

    `threads`: torch CPU threads of this process; `memory_share`: the share of the host's available memory this
    process plans CPU batches with (1/N for N stages at once; None: all), core.memory.set_host_memory_share.

    Never raises for a failure of the stage itself: the error is recorded and returned. Only
    KeyboardInterrupt/SystemExit propagate (the lock is released and nothing is published).
    """
    store = GridStore(root)
    plan = store.read_plan(plan_id)
    stage = plan.stages[stage_id]
    if store.is_done(stage_id):
        return StageOutcome(stage_id, stage.kind, "reused")
    lease = store.take(stage_id) if wait else store.try_take(stage_id)
    if lease is None:
        return StageOutcome(stage_id, stage.kind, "busy")
    with lease:
        if store.is_done(stage_id):
            store.event(event="reused", stage=stage_id, kind=stage.kind)
            return StageOutcome(stage_id, stage.kind, "reused")
        missing = [d for d in stage.deps if not store.is_done(d)]
        if missing:
            return StageOutcome(stage_id, stage.kind, "blocked", error=f"dependency {missing[0]} is not finished")
        killed = store.attempts(stage_id)
        limit = int(plan.runtime.get("max_attempts") or MAX_ATTEMPTS)
        if len(killed) >= limit:
            return _killed_too_often(store, lease, plan, killed, limit)
        lease.discard_broken()
        lease.clean_temporaries()
        lease.clear_failure()
        attempt = lease.start_attempt()
        if on_start is not None:
            on_start()
        try:
            with lease.heartbeat():
                outcome = _compute(store, lease, plan, progress, threads, attempt, memory_share)
        except (KeyboardInterrupt, SystemExit):
            lease.drop_attempt()                # stopped on purpose, not a crash of the stage
            raise
        lease.clear_attempts()                  # the attempt ended: computed, or failed with its error recorded
        return outcome


def _killed_too_often(store: GridStore, lease: StageLease, plan: Plan, killed: list[dict],
                      limit: int) -> StageOutcome:
    """Record a stage whose process died `limit` times before its attempt ended as failed (not started again)."""
    stage_id = lease.sid
    kind = plan.stages[stage_id].kind
    resources = (plan.runtime.get("resources") or {}).get(kind) or {}
    error = (f"KilledRepeatedly: stage {kind} was started {len(killed)} times and its process died each time "
             f"before the attempt ended, with no error recorded (killed: out of memory -- the OOM killer's "
             f"SIGKILL --, a time limit or a lost node); max_attempts is {limit}. Give it more memory "
             f"(resources.{kind}.memory_gb, now {resources.get('memory_gb')}) or a smaller batch, then rerun "
             f"with --retry-failed")
    starts = "\n".join(f"  start {i + 1}: pid {a.get('pid')} on {a.get('host')} at {a.get('started')}"
                       for i, a in enumerate(killed))
    lease.record_failure(kind, error, f"{error}\nstarts that died:\n{starts}\n")
    store.event(event="failed", stage=stage_id, kind=kind, seconds=0.0, error=error, attempts=len(killed))
    return StageOutcome(stage_id, kind, "failed", 0.0, error)


def _compute(store: GridStore, lease: StageLease, plan: Plan, progress: bool, threads: int | None,
             attempt: int, memory_share: float | None = None) -> StageOutcome:
    from editdecay.core.seeding import seed_everything
    from editdecay.grid.stages import EXECUTORS, StageContext

    stage_id = lease.sid
    stage = plan.stages[stage_id]
    set_threads(threads or plan.runtime.get("threads"))
    set_host_memory_share(memory_share)
    if not progress:
        _quiet_libraries()
    store.event(event="started", stage=stage_id, kind=stage.kind, attempt=attempt)   # 2+: earlier starts were killed
    t0 = time.perf_counter()
    error = None
    try:
        seed_everything(stage.spec.seed)          # StaleSpecError for a stage of an older plan: recorded
        with lease.building(stage.kind) as tmp:
            EXECUTORS[stage.kind](StageContext(stage, plan, store, tmp, progress=progress))
    except Exception as e:  # noqa: BLE001 -- every failure of a stage is recorded, the grid goes on
        error = f"{type(e).__name__}: {e}"
        lease.record_failure(stage.kind, error, traceback.format_exc())
    seconds = round(time.perf_counter() - t0, 3)
    if error is not None:
        # Outside the except block: the traceback no longer pins the failed stage's model and tensors.
        _release_memory()
        store.event(event="failed", stage=stage_id, kind=stage.kind, seconds=seconds, error=error)
        return StageOutcome(stage_id, stage.kind, "failed", seconds, error)
    store.event(event="computed", stage=stage_id, kind=stage.kind, seconds=seconds)
    if stage.kind == "cell":
        for cell in plan.cells:
            if cell.stages["cell"] == stage_id:
                store.publish_result(plan, cell.id)
    return StageOutcome(stage_id, stage.kind, "computed", seconds)


def _quiet_libraries() -> None:
    """No per-file progress bars from transformers when stage progress is off (one line per stage is the progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _release_memory() -> None:
    """After a failure (out of memory in particular) free what the failed stage held before the next one."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per finished stage, with counts; also counts outcomes for the run summary."""

    def __init__(self, plan: Plan, total: int, echo: Callable[[str], None] | None = None):
        self.plan, self.total = plan, total
        self.counts = {k: 0 for k in OUTCOMES}
        self.outcomes: list[StageOutcome] = []
        self.t0 = time.perf_counter()
        self.echo = echo or (lambda line: None)

    def started(self, stage_id: str, where: str = "") -> None:
        st = self.plan.stages[stage_id]
        self.echo(f"[{self.done_count:>{len(str(self.total))}}/{self.total}] start    {st.kind:<8} {st.label}"
                  + (f" ({where})" if where else ""))

    @property
    def done_count(self) -> int:
        return sum(self.counts[k] for k in ("computed", "reused", "failed", "blocked"))

    def finished(self, outcome: StageOutcome) -> None:
        self.outcomes.append(outcome)
        self.counts[outcome.state] += 1
        st = self.plan.stages[outcome.stage]
        detail = f"{outcome.seconds:.1f} s" if outcome.state == "computed" else (outcome.error or "")
        self.echo(f"[{self.done_count:>{len(str(self.total))}}/{self.total}] {outcome.state:<8} {st.kind:<8} "
                  f"{st.label}  {detail}".rstrip())

    def summary(self) -> dict:
        return {"stages": dict(self.counts), "seconds": round(time.perf_counter() - self.t0, 2)}


__all__ = ["OUTCOMES", "Progress", "StageOutcome", "execute_stage"]
