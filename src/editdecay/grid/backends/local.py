"""The local backend: the stages on this machine, one after another in this process, or `workers` at once.

workers = 1: one stage after another in this process, in plan order. A stage locked by another runner is
skipped for now and waited for only when nothing else can run. A stage killed with this process is computed
again by the next run.

workers = N > 1: up to N independent stages at once, each in a fresh process of its own (spawned, so no torch
state or thread pool is shared with this one), started in plan order as soon as their dependencies are done;
each process runs one torch thread unless `threads` says otherwise, so N workers use N cores, and plans its CPU
batches with 1/N of the host's available memory (core.memory.set_host_memory_share). Cell stages only
assemble JSON and run in this process. A stage process that ends without an outcome (killed, out of memory)
is a lost stage, started again up to `shared.max_attempts` (tracker.py), as on Ray and Slurm. Every stage is
computed by `execute_stage` either way, so the results are the serial run's (tests/grid/test_grid_run.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from editdecay.core.errors import ConfigError
from editdecay.grid.backends.tracker import DRIVER_KINDS, Tracker, threads_of
from editdecay.grid.execute import Progress, StageOutcome, execute_stage
from editdecay.grid.plan import Plan
from editdecay.grid.store import GridStore

BUSY_RETRY_SECONDS = 5.0      # a stage another runner holds is tried again after this long


class LocalBackend:
    name = "local"

    def __init__(self, poll: float = 1.0, workers: int = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers={workers!r} is not valid; use 1 (one stage at a time, in this process) or "
                              f"more (that many stages at once, each in a process of its own)")
        self.poll = poll
        self.workers = workers

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        t = Tracker(plan, store, stage_ids, reporter)
        threads = threads_of(plan, threads)
        if self.workers > 1:
            _Pool(self.workers, t, store, plan_id, threads or 1, self.poll).run()
            return
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


def _stage_process(root: str, sid: str, plan_id: str | None, threads: int, memory_share: float, conn) -> None:
    """Body of one stage process: compute the stage, send its outcome back as a dict."""
    outcome = execute_stage(root, sid, plan_id=plan_id, wait=False, progress=False, threads=threads,
                            memory_share=memory_share)
    conn.send(outcome.to_dict())
    conn.close()


@dataclass
class _Running:
    process: object
    conn: object


class _Pool:
    """Up to `workers` stage processes at once, fed in plan order as dependencies finish."""

    def __init__(self, workers: int, tracker: Tracker, store: GridStore, plan_id: str | None, threads: int,
                 poll: float):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.workers, self.t, self.store, self.plan_id, self.threads = workers, tracker, store, plan_id, threads
        self.poll = min(poll, 0.2)
        self.running: dict[str, _Running] = {}
        self.busy_until: dict[str, float] = {}

    def run(self) -> None:
        try:
            while self.t.pending:
                moved = self._collect()
                moved = self._start() or moved
                if not moved:
                    time.sleep(self.poll)
        finally:
            for r in self.running.values():          # interrupted: stop the stages started here
                r.process.terminate()
                r.process.join()

    def _collect(self) -> bool:
        moved = False
        for sid, r in list(self.running.items()):
            if r.conn.poll():
                try:
                    outcome = StageOutcome(**r.conn.recv())
                except EOFError:          # the process closed its end without an outcome: lost
                    outcome = None
                r.process.join()
            elif not r.process.is_alive():
                r.process.join()
                outcome = None
            else:
                continue
            del self.running[sid]
            moved = True
            if outcome is None:
                self.t.lost(sid, f"stage process {r.process.pid} exited with code {r.process.exitcode} "
                                 f"without an outcome")
            elif outcome.state == "busy":
                self.busy_until[sid] = time.monotonic() + BUSY_RETRY_SECONDS
            else:
                self.t.finish(outcome)
        return moved

    def _start(self) -> bool:
        moved = False
        now = time.monotonic()
        for sid in self.t.settle(running=self.running):
            if self.busy_until.get(sid, 0) > now:
                continue
            if self.t.plan.stages[sid].kind in DRIVER_KINDS:      # JSON assembly: here, at once
                outcome = execute_stage(self.store.root, sid, plan_id=self.plan_id, wait=False, threads=self.threads,
                                        on_start=lambda sid=sid: self.t.reporter.started(sid))
                if outcome.state == "busy":
                    self.busy_until[sid] = now + BUSY_RETRY_SECONDS
                else:
                    self.t.finish(outcome)
                moved = True
                continue
            if len(self.running) >= self.workers:
                break
            receive, send = self.ctx.Pipe(duplex=False)
            process = self.ctx.Process(target=_stage_process, name=f"editdecay-stage-{sid}",
                                       args=(str(self.store.root), sid, self.plan_id, self.threads,
                                             1.0 / self.workers, send))
            process.start()
            send.close()                  # the child holds the sending end; EOF here when it dies
            self.running[sid] = _Running(process, receive)
            self.t.reporter.started(sid, where=f"worker pid {process.pid}")
            moved = True
        return moved


__all__ = ["BUSY_RETRY_SECONDS", "LocalBackend"]
