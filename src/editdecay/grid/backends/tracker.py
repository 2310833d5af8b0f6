"""What every backend's driver shares: which selected stages can start now, and what a lost stage becomes.

A stage is *lost* when its process ended without returning an outcome: killed from
outside (kill -9, the OOM killer, a time limit), or its node or raylet died. That is
not a failure of the stage: it counts as an attempt (`execute_stage` counted the start on
disk before computing) and the driver runs the stage again, until `max_attempts`.
"""

from __future__ import annotations

import traceback
from typing import Collection

from editdecay.grid.execute import Progress, StageOutcome
from editdecay.grid.plan import Plan
from editdecay.grid.store import MAX_ATTEMPTS, GridStore

DRIVER_KINDS = ("cell",)        # stages the Ray and Slurm drivers compute themselves (they only assemble JSON)


class Tracker:
    """Dependency bookkeeping of one run: pending stages, those failed or blocked, and losses per stage."""

    def __init__(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress):
        self.plan, self.store, self.reporter = plan, store, reporter
        self.pending = list(stage_ids)
        self.bad: set[str] = set()        # failed or blocked in this run
        self.losses: dict[str, int] = {}  # stage -> times its process was lost in this run

    def settle(self, running: Collection[str] = ()) -> list[str]:
        """Report stages that are already finished (reused) or can never run (blocked); return startable ones.
        `running`: stages this driver has started and not yet collected (their outcome reports them)."""
        ready = []
        for sid in list(self.pending):
            if sid in running:
                continue
            st = self.plan.stages[sid]
            bad = [d for d in st.deps if d in self.bad]
            if bad:
                self.finish(StageOutcome(sid, st.kind, "blocked", error=f"needs {bad[0]}, which failed"))
            elif self.store.is_done(sid):
                self.finish(StageOutcome(sid, st.kind, "reused"))
            elif all(self.store.is_done(d) for d in st.deps):
                ready.append(sid)
        return ready

    def finish(self, outcome: StageOutcome) -> None:
        if outcome.stage in self.pending:
            self.pending.remove(outcome.stage)
        if outcome.state in ("failed", "blocked"):
            self.bad.add(outcome.stage)
        self.reporter.finished(outcome)

    def lost(self, sid: str, why: str | BaseException) -> bool:
        """The process of `sid` ended without an outcome. Returns True if the stage is to be started again;
        otherwise it is finished (by that process or another runner) or, lost `max_attempts` times in this run,
        recorded as failed -- and reported either way."""
        kind = self.plan.stages[sid].kind
        n = self.losses[sid] = self.losses.get(sid, 0) + 1
        limit = int(self.plan.runtime.get("max_attempts") or MAX_ATTEMPTS)
        text = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
        self.reporter.echo(f"lost     {kind:<8} {self.plan.stages[sid].label}: {text.splitlines()[0][:300]} "
                           f"(lost {n} of at most {limit} times)")
        self.store.event(event="lost", stage=sid, kind=kind, error=text[:2000], losses=n)
        # The dead process's lock is free: taking it clears its holder record. Busy: a process that was reported
        # lost still computes it, or another runner does; the next start waits for that lock.
        lease = self.store.try_take(sid)
        if lease is None:
            return True
        with lease:
            if self.store.is_done(sid):
                self.finish(StageOutcome(sid, kind, "computed"))
                return False
            if n < limit:
                return True
            error = (f"Lost: stage {kind} was started {n} times in this run and its process ended each time without "
                     f"an outcome (killed, out of memory, a time limit, a lost node); max_attempts is {limit}. "
                     f"Last: {text.splitlines()[0][:500]}")
            tb = text if isinstance(why, str) else "".join(traceback.format_exception(why))
            lease.record_failure(kind, error, tb)
        self.store.event(event="failed", stage=sid, kind=kind, seconds=0.0, error=error, losses=n)
        self.finish(StageOutcome(sid, kind, "failed", error=error))
        return False


def threads_of(plan: Plan, threads: int | None) -> int | None:
    return threads or plan.runtime.get("threads")


__all__ = ["DRIVER_KINDS", "Tracker", "threads_of"]
