"""Run stages safely and a whole grid: selection, locking, failure records, progress, results table.

`execute_stage` is the one way any backend computes a stage, in whatever process:

    finished already?            -> "reused"   (nothing is read or computed)
    take the stage's file lock   (busy and wait=False -> "busy": the caller tries again later)
    finished meanwhile?          -> "reused"   (another runner computed it while we waited)
    a dependency not finished?   -> "blocked"
    remove half-written output of killed attempts, compute into a temporary directory, publish it atomically
                                 -> "computed", or "failed" with error and traceback recorded beside the stage

So killing a runner at any moment (kill -9 included) loses at most the stage it was
computing, which the next runner detects (no manifest) and computes again; and two
runners on one grid never compute the same stage twice.

A failed stage stays failed for later runs (its cells are reported failed) until a
run with `retry_failed=True`, which clears the records of the failed cells' stages and
runs only those cells.

Before any stage runs, `preflight` reads every edit and fine-tuning data set the run
needs (no model): a missing or unreadable file fails its cells at once, and nothing is
computed for them alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .plan import Plan
from .store import GridStore

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


def set_threads(threads: int | None) -> None:
    """Pin torch (and the BLAS libraries it starts afterwards) to `threads` CPU threads in this process."""
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def execute_stage(root: str | Path, stage_id: str, *, plan_id: str | None = None, wait: bool = True,
                  progress: bool = False, threads: int | None = None,
                  on_start: Callable[[], None] | None = None) -> StageOutcome:
    """Compute one stage of the grid in `root` unless it is finished (see module docstring).

    Never raises for a failure of the stage itself: the error is recorded and returned. Only
    KeyboardInterrupt/SystemExit propagate (the lock is released and nothing is published).
    """
    from filelock import Timeout

    store = GridStore(root)
    plan = store.read_plan(plan_id)
    stage = plan.stages[stage_id]
    if store.is_done(stage_id):
        return StageOutcome(stage_id, stage.kind, "reused")
    lock = store.lock(stage_id, timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        return StageOutcome(stage_id, stage.kind, "busy")
    try:
        if store.is_done(stage_id):
            store.event(event="reused", stage=stage_id, kind=stage.kind)
            return StageOutcome(stage_id, stage.kind, "reused")
        missing = [d for d in stage.deps if not store.is_done(d)]
        if missing:
            return StageOutcome(stage_id, stage.kind, "blocked", error=f"dependency {missing[0]} is not finished")
        store.discard_broken(stage_id)
        store.clean_temporaries(stage_id)
        store.clear_failure(stage_id)
        if on_start is not None:
            on_start()
        return _compute(store, plan, stage_id, progress, threads)
    finally:
        lock.release()


def _compute(store: GridStore, plan: Plan, stage_id: str, progress: bool, threads: int | None) -> StageOutcome:
    from .stages import EXECUTORS, StageContext, seed_everything, stage_seed

    stage = plan.stages[stage_id]
    set_threads(threads or plan.runtime.get("threads"))
    if not progress:
        _quiet_libraries()
    store.mark_running(stage_id)
    store.event(event="started", stage=stage_id, kind=stage.kind)
    t0 = time.perf_counter()
    error = None
    try:
        seed_everything(stage_seed(stage))
        with store.building(stage_id, stage.kind) as tmp:
            EXECUTORS[stage.kind](StageContext(stage, plan, store, tmp, progress=progress))
    except Exception as e:  # noqa: BLE001 -- every failure of a stage is recorded, the grid goes on
        error = f"{type(e).__name__}: {e}"
        store.record_failure(stage_id, stage.kind, error, traceback.format_exc())
    finally:
        store.clear_running(stage_id)
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


# --------------------------------------------------------------------------- selecting work


@dataclass(frozen=True)
class Selection:
    cells: list[str]                 # cells this run works on
    stages: list[str]                # stages to run, in plan order (dependencies first)
    skipped_failed: list[str] = field(default_factory=list)   # cells left alone because they failed before


def select(plan: Plan, store: GridStore, *, retry_failed: bool = False, cells: list[str] | None = None) -> Selection:
    """Which cells and stages to run now.

    Default: every cell that is not done, except cells that failed before (their failure stays recorded).
    retry_failed: only the cells that failed; their failure records are cleared so they run again.
    """
    wanted = [plan.cell(c) for c in cells] if cells is not None else list(plan.cells)
    states = {s["id"]: s for s in store.cell_states(plan)}
    failed = [c for c in wanted if states[c.id]["state"] == "failed"]
    if retry_failed:
        chosen = failed
        for c in chosen:
            for sid in plan.closure(c.stages.values()):
                store.clear_failure(sid)
        skipped: list[str] = []
    else:
        chosen = [c for c in wanted if states[c.id]["state"] != "failed"]
        skipped = [c.id for c in failed]
    chosen = [c for c in chosen if not store.is_done(c.stages["cell"])]
    stages = plan.closure([sid for c in chosen for sid in c.stages.values()])
    return Selection([c.id for c in chosen], stages, skipped)


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


# --------------------------------------------------------------------------- a whole grid


@dataclass(frozen=True)
class RunSummary:
    out: str
    backend: str
    cells: dict                  # state -> count, after the run
    stages: dict                 # outcome -> count, this run
    seconds: float
    selected_cells: int          # cells this run set out to finish (before the data check)
    already_done: int            # cells finished before this run (nothing of theirs ran)
    skipped_failed: list[str]
    results_table: str | None
    failed: list[dict]           # {cell, stage, error} of cells failed after the run

    def to_dict(self) -> dict:
        return asdict(self)


def run_grid(plan: Plan, out: str | Path, *, backend: str = "local", grid_text: str | None = None,
             retry_failed: bool = False, cells: list[str] | None = None, threads: int | None = None,
             progress: bool = False, echo: Callable[[str], None] | None = None, **backend_options) -> RunSummary:
    """Run (or resume) a grid into `out` with a backend: local (in-process), ray or slurm (backends.py)."""
    from .backends import make_backend

    runner = make_backend(backend, **backend_options)     # an unknown backend fails before anything is written
    store = GridStore(out)
    if store.plan_path.is_file():
        _check_same_grid(store, plan)
    plan_id = store.write_plan(plan, grid_text)
    for cell in plan.cells:                       # results of cells whose last stage finished just before a kill
        store.publish_result(plan, cell.id)
    done_before = sum(store.is_done(c.stages["cell"]) for c in plan.cells)
    selection = select(plan, store, retry_failed=retry_failed, cells=cells)
    attempted = len(selection.cells)
    early = preflight(plan, store, selection.stages)
    if early:           # cells whose data cannot be read are failed now; nothing is computed for them alone
        kept = select(plan, store, cells=selection.cells)
        selection = Selection(kept.cells, kept.stages, selection.skipped_failed)
    reporter = Progress(plan, len(selection.stages) + len(early), echo)
    for outcome in early:
        reporter.finished(outcome)
    runner.run(plan, store, selection.stages, reporter, plan_id=plan_id, threads=threads, progress=progress)
    for cell in plan.cells:
        store.publish_result(plan, cell.id)
    states = store.cell_states(plan)
    counts = {s: sum(1 for c in states if c["state"] == s) for s in ("done", "running", "failed", "pending")}
    table = store.gather(plan)
    failed = [{"cell": c["id"], "stage": c.get("failed_stage"), "error": c.get("error")}
              for c in states if c["state"] == "failed"]
    s = reporter.summary()
    return RunSummary(str(out), backend, counts, s["stages"], s["seconds"], attempted, done_before,
                      selection.skipped_failed, str(table) if table else None, failed)


def preflight(plan: Plan, store: GridStore, stage_ids: list[str]) -> list[StageOutcome]:
    """Read every edit and fine-tuning data set the stages need (no model, a few seconds at most) and record a
    failure for each stage whose data cannot be read, before hours go into fine-tuning runs whose cells could
    never finish. Hub datasets (`hf:`) are left to their stage."""
    from ..data import load_edit_data
    from ..finetune.data import load_source
    from ..finetune.task import EmbeddedTask
    from .plan import check_data_digest

    def edit_data(r: dict):
        check_data_digest(r["data"], r.get("digest"))
        return load_edit_data(r["data"], zsre_target=r["zsre_target"], strict=r["strict"])

    def finetune_data(c: dict):
        check_data_digest(c["data"], c.get("data_digest"))
        return load_source(c["data"], task=EmbeddedTask(**c["task"]) if c["task"] else None)

    readers: dict[str, list[str]] = {}      # data key -> stages reading it
    loaders: dict[str, Callable[[], object]] = {}
    for sid in stage_ids:
        st = plan.stages[sid]
        if store.is_done(sid):
            continue
        c = st.config
        if st.kind in ("patch", "evaluate"):
            r = c["requests"]
            key = json.dumps(["edit", r["data"], r.get("digest"), r["zsre_target"], r["strict"]])
            loaders[key] = lambda r=r: edit_data(r)
        elif st.kind == "finetune" and not c["data"].startswith("hf:"):
            key = json.dumps(["finetune", c["data"], c.get("data_digest"), c["task"]])
            loaders[key] = lambda c=c: finetune_data(c)
        else:
            continue
        readers.setdefault(key, []).append(sid)
    out = []
    for key, sids in readers.items():
        try:
            loaders[key]()
        except Exception as e:  # noqa: BLE001 -- recorded per stage, like a failure while computing
            error = f"{type(e).__name__}: {e}"
            tb = traceback.format_exc()
            for sid in sids:
                kind = plan.stages[sid].kind
                store.record_failure(sid, kind, error, tb)
                store.event(event="failed", stage=sid, kind=kind, seconds=0.0, error=error, preflight=True)
                out.append(StageOutcome(sid, kind, "failed", 0.0, error))
    return out


def _check_same_grid(store: GridStore, plan: Plan) -> None:
    """A directory may be re-used with a changed grid (finished stages are content-addressed), but say so."""
    try:
        old = json.loads(store.plan_path.read_text())
    except (OSError, ValueError):
        return
    before = {c["id"] for c in old.get("cells", [])}
    now = {c.id for c in plan.cells}
    if before != now:
        log.warning("the grid in %s changed since its last run: %d cells kept, %d new, %d no longer in the grid "
                    "(finished stages are reused wherever they match)", store.root, len(before & now),
                    len(now - before), len(before - now))


__all__ = ["OUTCOMES", "Progress", "RunSummary", "Selection", "StageOutcome", "execute_stage", "preflight",
           "run_grid", "select", "set_threads"]
