"""Run a whole grid: select the work, check the data, hand the stages to a backend, summarise.

Each stage is computed by `grid.execute.execute_stage` (locking, failure records).

A failed stage stays failed for later runs (its cells are reported failed) until a
run with `retry_failed=True`, which selects only the failed cells and then, as a step of
its own (`reset_failures`), clears the records of their stages before running them.

Before any stage runs, `preflight` reads every edit and fine-tuning data set the run
needs (no model): a missing or unreadable file fails its cells at once, and nothing is
computed for them alone.
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from editdecay.core.files import MAX_RESULT_BYTES, json_or_none
from editdecay.grid.backends import make_backend
from editdecay.grid.execute import Progress, StageOutcome
from editdecay.grid.plan import Plan
from editdecay.grid.store import GridStore, state_counts

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- selecting work


@dataclass(frozen=True)
class Selection:
    cells: list[str]                 # cells this run works on
    stages: list[str]                # stages to run, in plan order (dependencies first)
    skipped_failed: list[str] = field(default_factory=list)   # cells left alone because they failed before


def select(plan: Plan, store: GridStore, *, retry_failed: bool = False, cells: list[str] | None = None) -> Selection:
    """Which cells and stages to run now; reads the results directory and changes nothing.

    Default: every cell that is not done, except cells that failed before (their failure stays recorded).
    retry_failed: only the cells that failed (`reset_failures` then clears their records so they run again).
    """
    wanted = [plan.cell(c) for c in cells] if cells is not None else list(plan.cells)
    states = {s["id"]: s for s in store.cell_states(plan)}
    failed = [c for c in wanted if states[c.id]["state"] == "failed"]
    if retry_failed:
        chosen, skipped = failed, []
    else:
        chosen = [c for c in wanted if states[c.id]["state"] != "failed"]
        skipped = [c.id for c in failed]
    chosen = [c for c in chosen if not store.is_done(c.stages["cell"])]
    stages = plan.closure([sid for c in chosen for sid in c.stages.values()])
    return Selection([c.id for c in chosen], stages, skipped)


def reset_failures(store: GridStore, stage_ids: list[str]) -> None:
    """A fresh start for these stages (`--retry-failed`): their failure records and their counts of killed starts
    are removed, each under the stage's lock (waiting for a runner that computes it right now)."""
    for sid in stage_ids:
        with store.take(sid) as lease:
            lease.clear_failure(attempts=True)


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

    runner = make_backend(backend, **backend_options)     # an unknown backend fails before anything is written
    store = GridStore(out)
    if store.plan_path.is_file():
        _check_same_grid(store, plan)
        if echo is not None:
            _note_earlier_cells(store, plan, echo)
    plan_id = store.write_plan(plan, grid_text)
    for cell in plan.cells:                       # results of cells whose last stage finished just before a kill
        store.publish_result(plan, cell.id)
    done_before = sum(store.is_done(c.stages["cell"]) for c in plan.cells)
    selection = select(plan, store, retry_failed=retry_failed, cells=cells)
    if retry_failed:
        reset_failures(store, selection.stages)
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
    counts = state_counts(states)
    table = store.gather(plan)
    failed = [{"cell": c["id"], "stage": c.get("failed_stage"), "error": c.get("error")}
              for c in states if c["state"] == "failed"]
    s = reporter.summary()
    return RunSummary(str(out), backend, counts, s["stages"], s["seconds"], attempted, done_before,
                      selection.skipped_failed, str(table) if table else None, failed)


def _note_earlier_cells(store: GridStore, plan: Plan, echo: Callable[[str], None]) -> None:
    """Say when finished cells in `store` belong to an earlier plan of the grid, not to `plan`: their ids changed
    (a setting, a data file or editdecay's id scheme), so this run computes the new cells' stages again."""
    planned = {c.id for c in plan.cells}
    earlier = [cid for cid in store.result_files() if cid not in planned]
    if earlier:
        echo(f"note: {len(earlier)} finished cell(s) in {store.root / 'results'} are not cells of this plan (e.g. "
             f"{earlier[0]}): their ids changed since they ran (a setting, a data file or editdecay's id scheme), "
             f"so the stages they need are computed again; their files stay where they are")


def preflight(plan: Plan, store: GridStore, stage_ids: list[str]) -> list[StageOutcome]:
    """Read every edit and fine-tuning data set the stages need (no model, a few seconds at most) and record a
    failure for each stage whose data cannot be read, before hours go into fine-tuning runs whose cells could
    never finish. Sources read over the network (`hf:`) are left to their stage. An edit stage whose n_edits is
    more than the data's usable requests fails here too (`data.sources.subset`), never running fewer edits than its
    cell says."""
    from editdecay.data import sources as data_sources
    from editdecay.grid.specs import EvaluateSpec, FinetuneSpec, PatchSpec

    def finetune_data(spec: FinetuneSpec):
        spec.data.check()
        return data_sources.load_source(spec.data.spec, task=spec.data.task() if spec.data.has_held_out() else None)

    readers: dict[str, list[str]] = {}      # data key -> stages reading it
    loaders: dict[str, Callable[[], object]] = {}
    for sid in stage_ids:
        if store.is_done(sid):
            continue
        spec = plan.stages[sid].spec
        if isinstance(spec, (PatchSpec, EvaluateSpec)):
            r = spec.requests.replace(n=None, seed=None)          # the whole data set, as every cell reads it
            key = json.dumps(["edit", r.to_dict()], sort_keys=True)
            loaders[key] = r.load
        elif isinstance(spec, FinetuneSpec) and data_sources.source_of(spec.data.spec).offline:
            key = json.dumps(["finetune", spec.data.to_dict()], sort_keys=True)
            loaders[key] = lambda spec=spec: finetune_data(spec)
        else:
            continue
        readers.setdefault(key, []).append(sid)
    def count_check(sid: str, data) -> None:
        spec = plan.stages[sid].spec
        if isinstance(spec, (PatchSpec, EvaluateSpec)):
            data_sources.subset(data, spec.requests.n, spec.requests.seed, field="n_edits")

    out = []
    for key, sids in readers.items():
        failures: list[tuple[list[str], str, str]] = []      # (stages, error, traceback)
        try:
            data = loaders[key]()
        except Exception as e:  # noqa: BLE001 -- recorded per stage, like a failure while computing
            failures.append((sids, f"{type(e).__name__}: {e}", traceback.format_exc()))
        else:
            for sid in sids:
                try:
                    count_check(sid, data)
                except Exception as e:  # noqa: BLE001
                    failures.append(([sid], f"{type(e).__name__}: {e}", traceback.format_exc()))
        for failed, error, tb in failures:
            for sid in failed:
                kind = plan.stages[sid].kind
                lease = store.try_take(sid)
                if lease is None:
                    continue        # being computed by another runner right now: its outcome counts
                with lease:
                    if not lease.record_failure(kind, error, tb):
                        continue    # finished meanwhile
                store.event(event="failed", stage=sid, kind=kind, seconds=0.0, error=error, preflight=True)
                out.append(StageOutcome(sid, kind, "failed", 0.0, error))
    return out


def _check_same_grid(store: GridStore, plan: Plan) -> None:
    """A directory may be re-used with a changed version of its grid (finished stages are content-addressed), but
    say so. Another grid (another name) is refused, before anything is written (`GridStore.check_same_grid`)."""
    store.check_same_grid(plan)
    old = json_or_none(store.plan_path, limit=MAX_RESULT_BYTES)
    if old is None:
        return
    if old.get("format") != plan.format:
        log.warning("%s was planned by another version of editdecay (plan format %s, now %s): its stages do not "
                    "match this version's, so every stage is computed anew; the earlier stages and results stay on "
                    "disk and are not reported (results of cells not in plan.json are listed as stray)",
                    store.root, old.get("format"), plan.format)
        return
    cells = old.get("cells")
    before = {c.get("id") for c in cells if isinstance(c, dict)} if isinstance(cells, list) else set()
    now = {c.id for c in plan.cells}
    if before != now:
        log.warning("the grid in %s changed since its last run: %d cells kept, %d new, %d no longer in the grid "
                    "(finished stages are reused wherever they match)", store.root, len(before & now),
                    len(now - before), len(before - now))


__all__ = ["RunSummary", "Selection", "preflight", "reset_failures", "run_grid", "select"]
