"""The state of each cell of a grid directory (done / running / failed / pending), from its stages on disk."""

from __future__ import annotations

from pathlib import Path

from editdecay.grid.plan import Plan
from editdecay.grid.store.locks import STALE_AFTER_S, StageLocks, check_stale_after
from editdecay.grid.store.results import CellResults

STATES = ("done", "running", "failed", "pending", "invalid")


def state_counts(cells: list[dict]) -> dict[str, int]:
    """{state: number of cells} for `cell_states` entries: done, running, failed and pending always, invalid only
    when some cell is (a result that cannot be used is the exception, and `grid run` publishes it again)."""
    counts = {s: sum(1 for c in cells if c["state"] == s) for s in STATES}
    if not counts["invalid"]:
        del counts["invalid"]
    return counts


class CellStatus(StageLocks, CellResults):
    """Cell states of the grid directory `root`."""

    root: Path

    def cell_states(self, plan: Plan, stale_after: float = STALE_AFTER_S) -> list[dict]:
        """One entry per cell: {id, label, state, stages: {role: state}, ...}; state in STATES.

        done: its result exists and follows the schema (core.schema.CellResult), or its cell stage finished and
        the result is not published yet. invalid: its cell stage finished, but results/<cell-id>.json cannot be
        used (cut short, not JSON, another schema: `error` says why; the next `grid run` publishes it again).
        failed: one of the stages it needs failed (error and traceback included).
        running: one of its stages is locked (`running`: the holders, `holder`, with `stale` where the holder
        is gone or shows no heartbeat for `stale_after` seconds). pending: otherwise.
        """
        check_stale_after(stale_after)
        stage_state: dict[str, str] = {}

        def state_of(sid: str) -> str:
            if sid not in stage_state:
                if self.is_done(sid):
                    stage_state[sid] = "done"
                elif self.is_locked(sid):
                    stage_state[sid] = "running"
                elif self.failure(sid) is not None:
                    stage_state[sid] = "failed"
                else:
                    stage_state[sid] = "pending"
            return stage_state[sid]

        out = []
        for cell in plan.cells:
            entry = {"id": cell.id, "label": cell.label, "state": "pending",
                     "stages": {role: state_of(sid) for role, sid in cell.stages.items()}}
            needed = plan.closure(cell.stages.values())
            states = {sid: state_of(sid) for sid in needed}
            if states[cell.stages["cell"]] == "done":
                why = self.checked_result(cell.id)[1]
                entry["state"] = "invalid" if why else "done"
                entry["result"] = str(self.result_path(cell.id))
                if why:
                    entry["error"] = why
            elif any(s == "running" for s in states.values()):
                entry["state"] = "running"
                entry["running"] = [{"kind": plan.stages[sid].kind, **self.holder(sid, stale_after)}
                                    for sid, s in states.items() if s == "running"]
            elif any(s == "failed" for s in states.values()):
                sid = next(sid for sid, s in states.items() if s == "failed")
                f = self.failure(sid) or {}
                entry.update(state="failed", failed_stage=sid, failed_kind=plan.stages[sid].kind,
                             error=f.get("error"), traceback=f.get("traceback"))
            out.append(entry)
        return out


__all__ = ["CellStatus", "STATES", "state_counts"]
