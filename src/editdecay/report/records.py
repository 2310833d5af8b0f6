"""A grid results directory read into typed records: every planned cell, with its result or why it has none.

The report never re-runs a model for its tables: everything comes from the cell
result files (schema and fields: `core/schema.py`, `CellResult`) and their per-request rows. This module
is the one place that reads and validates them, so the rest of the report can
assume a `CellRecord` in state "done" has well-formed request rows.

Which cells exist comes from `plan.json` (the plan run last), so a cell that
failed or never ran is still listed and reported as missing. Result files of
cells that are not in that plan (left by earlier plans in the same directory)
are counted but not reported. Without `plan.json` every `results/*.json` is a
cell and nothing can be said about cells without a result.

A cell whose result exists but cannot be used (unreadable JSON, another schema,
malformed request rows) becomes state "invalid" with the reason; one bad file
never stops the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from editdecay.core.errors import ConfigError
from editdecay.core.schema import MODELS, CellRequestRow, ResultSchemaError, read_result
from editdecay.grid.store import STATES as GRID_STATES

log = logging.getLogger(__name__)

EDITED_MODELS = ("M_e", "M_ef")
SCORES = ("efficacy", "paraphrase", "neighborhood")
SCORE_ABBR = {"efficacy": "ES", "paraphrase": "PS", "neighborhood": "NS"}
STATES = GRID_STATES          # grid/store/status.py: done, running, failed, pending, invalid (result unusable)


@dataclass(frozen=True)
class RequestRecord:
    """One edit request of one cell, under the four models (E7's per-request survival table)."""

    case_id: str
    success: Mapping[str, bool]                          # model -> efficacy >= threshold
    margin: Mapping[str, float | None]                   # model -> NLL(true) - NLL(new) on the rewrite prompt
    scores: Mapping[str, Mapping[str, float | None]]     # model -> {efficacy, paraphrase, neighborhood}
    flipped: bool                                        # stored flag: success under M_e, not under M_ef

    @property
    def survived(self) -> bool:
        """Edited successfully and still successful after fine-tuning."""
        return bool(self.success["M_e"] and self.success["M_ef"])


@dataclass(frozen=True)
class CellRecord:
    """One cell of the plan. `result` is the parsed cell-result JSON (state "done" only)."""

    id: str
    label: str
    axes: Mapping
    state: str
    result: Mapping | None = None
    requests: tuple[RequestRecord, ...] = ()
    error: str | None = None            # why there is no usable result (failed / invalid)
    failed_stage: str | None = None
    failed_kind: str | None = None
    path: str | None = None             # the result file read

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def n_edits(self) -> int:
        return int(self.axes.get("n_edits") or 0)

    @property
    def has_edits(self) -> bool:
        return self.n_edits > 0

    def metrics(self, model: str) -> Mapping:
        """Stored aggregate metrics of one model ({} when absent)."""
        return ((self.result or {}).get("metrics") or {}).get(model) or {}


@dataclass(frozen=True)
class ResultsSet:
    """Everything the report reads from one grid output directory."""

    root: Path
    grid: str
    cells: tuple[CellRecord, ...]
    plan_found: bool
    runtime: Mapping = field(default_factory=dict)       # the plan's run-time settings (cache_dir, ...)
    stray_results: tuple[str, ...] = ()                  # results/*.json of cells not in the plan
    notes: tuple[str, ...] = ()                          # what the loader had to say (no plan, stray files)

    @property
    def done(self) -> tuple[CellRecord, ...]:
        return tuple(c for c in self.cells if c.done)

    @property
    def edited_done(self) -> tuple[CellRecord, ...]:
        return tuple(c for c in self.cells if c.done and c.has_edits and c.requests)

    @property
    def not_done(self) -> tuple[CellRecord, ...]:
        return tuple(c for c in self.cells if not c.done)

    def counts(self) -> dict[str, int]:
        return {s: sum(c.state == s for c in self.cells) for s in STATES}


def load_results(root: str | Path) -> ResultsSet:
    """Read a grid output directory (`editdecay grid run --out DIR`) into a `ResultsSet`."""
    from editdecay.grid.store import GridStore

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"results directory {str(root)!r} does not exist or is not a directory; give the --out "
                          f"directory of `editdecay grid run`")
    store = GridStore(root)
    notes: list[str] = []
    result_files = store.result_files()
    if not os.path.lexists(store.plan_path):     # present but unreadable (a link to a device): read_plan names it
        if not result_files:
            raise ConfigError(f"{root} holds neither plan.json nor results/*.json; it is not a grid output directory")
        notes.append("no plan.json: the report lists the cells that have result files; cells that failed or never "
                     "ran cannot be named")
        cells = tuple(_from_file(cid, path) for cid, path in result_files.items())
        grid = next((c.result.get("grid") for c in cells if c.result), None) or root.name
        return ResultsSet(root, grid, cells, False, {}, (), tuple(notes))

    plan = store.read_plan()
    cells = []
    for entry in store.cell_states(plan):
        cell = plan.cell(entry["id"])
        if entry["state"] == "done":
            path = store.result_path(cell.id)
            if not path.is_file():      # the cell stage finished but its result was not published yet
                path = store.stage_dir(cell.stages["cell"]) / "result.json"
            rec = _from_file(cell.id, path, label=cell.label, axes=cell.axes)
        elif entry["state"] == "invalid":
            rec = CellRecord(cell.id, cell.label, cell.axes, "invalid", error=entry["error"], path=entry["result"])
        else:
            rec = CellRecord(cell.id, cell.label, cell.axes, entry["state"], error=_first_line(entry.get("error")),
                             failed_stage=entry.get("failed_stage"), failed_kind=entry.get("failed_kind"))
        cells.append(rec)
    planned = {c.id for c in plan.cells}
    stray = tuple(cid for cid in result_files if cid not in planned)
    if stray:
        notes.append(f"{len(stray)} result file(s) in results/ belong to cells of earlier plans, not to plan.json; "
                     f"they are not reported")
    return ResultsSet(root, plan.name, tuple(cells), True, dict(plan.runtime), stray, tuple(notes))


def _first_line(text: str | None) -> str | None:
    if not text:
        return text
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else None)


def _from_file(cell_id: str, path: Path, *, label: str | None = None, axes: Mapping | None = None) -> CellRecord:
    """A "done" record from a result file, or an "invalid" one that says what is wrong with it."""
    def invalid(why: str) -> CellRecord:
        log.warning("cell %s: %s", cell_id, why)
        return CellRecord(cell_id, label or cell_id, axes or {}, "invalid", error=why, path=str(path))

    try:
        typed = read_result(path, kind="grid-cell")
    except ResultSchemaError as e:
        return invalid(str(e))
    result = typed.model_dump(mode="json")
    requests = tuple(_request(row) for row in typed.requests)
    return CellRecord(typed.cell.id or cell_id, label or typed.cell.label, axes or typed.cell.axes, "done", result,
                      requests, path=str(path))


def _request(row: CellRequestRow) -> RequestRecord:
    outcomes = {m: row.outcome(m) for m in MODELS}
    scores = {m: {s: (outcomes[m] or {}).get(s) for s in SCORES} for m in MODELS}
    flipped = row.flipped if row.flipped is not None else bool(row.success["M_e"] and not row.success["M_ef"])
    return RequestRecord(row.case_id, {m: bool(row.success[m]) for m in MODELS},
                         {m: row.margin.get(m) for m in MODELS}, scores, bool(flipped))


def training_data(config: Mapping):
    """A cell's fine-tuning data (`config.finetune_data`) loaded again with its source's settings, and the held-out
    task it was scored on (or None). Cell schema 2 records them as `data_settings` and `held_out`; schema 1 as
    `task` and `chatterbot` (the settings of the grid sections of those names)."""
    from editdecay.data.source import HELD_OUT
    from editdecay.data.sources import held_out_task, load_source, source_of

    spec = config["finetune_data"]
    source = source_of(spec)
    if "data_settings" in config:
        settings = config["data_settings"]
        held = config.get("held_out")
        held_task = held_out_task(held["spec"], held.get("settings")) if held else None
    else:
        by_section = {"embedded_task": config.get("task"), "chatterbot": config.get("chatterbot")}
        settings = by_section.get(source.settings_key)
        held_task = held_out_task("embedded", config["task"]) if config.get("task") else None
    task = held_out_task(spec, settings) if HELD_OUT in source.roles else None
    return load_source(spec, task=task), held_task


__all__ = ["CellRecord", "EDITED_MODELS", "MODELS", "RequestRecord", "ResultsSet", "SCORES", "SCORE_ABBR",
           "load_results", "training_data"]
