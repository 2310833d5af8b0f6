"""The local backend: one stage after another in this process, in plan order.

A stage locked by another runner is skipped for now and waited for only when nothing
else can run. A stage killed with this process is computed again by the next run.
"""

from __future__ import annotations

import time

from editdecay.grid.backends.tracker import Tracker, threads_of
from editdecay.grid.execute import Progress, execute_stage
from editdecay.grid.plan import Plan
from editdecay.grid.store import GridStore


class LocalBackend:
    name = "local"

    def __init__(self, poll: float = 1.0):
        self.poll = poll

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        t = Tracker(plan, store, stage_ids, reporter)
        threads = threads_of(plan, threads)
        while t.pending:
            busy = []
            moved = False
            for sid in t.settle():
                outcome = execute_stage(store.root, sid, plan_id=plan_id, wait=False, progress=progress,
                                        threads=threads, on_start=lambda sid=sid: reporter.started(sid))
                if outcome.state == "busy":
                    busy.append(sid)
                    continue
                t.finish(outcome)
                moved = True
                break           # settle again: a stage it unblocked may come earlier in plan order
            if t.pending and not moved:
                if busy:    # everything left is being computed by another runner: wait for one of them
                    reporter.echo(f"waiting for another runner to finish {busy[0]}")
                    t.finish(execute_stage(store.root, busy[0], plan_id=plan_id, wait=True, progress=progress,
                                           threads=threads, on_start=lambda: reporter.started(busy[0])))
                else:       # dependencies are being computed elsewhere
                    time.sleep(self.poll)


__all__ = ["LocalBackend"]
