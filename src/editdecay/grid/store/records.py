"""Attempt and failure records of a stage, read side (they are written only through the stage's lease).

    DIR/stages/<stage-id>.attempts.json  starts of the stage whose process died before the attempt ended
                                         (killed: out of memory, time limit, node lost)
    DIR/stages/<stage-id>.failed.json    error and traceback of the last failed attempt

Why a stage killed again and again is not retried forever: every start is counted on
disk before the stage computes and the count is cleared when the attempt ends (computed,
or failed with its error recorded). A count that reaches the grid's `max_attempts` means
its process died that many times without ending (the OOM killer's SIGKILL, a time limit):
the stage is recorded as failed instead of started once more.
"""

from __future__ import annotations

from pathlib import Path

from editdecay.core.files import json_or_none
from editdecay.grid.store.stage_dir import StageDirectories

MAX_ATTEMPTS = 3            # starts whose process died before a stage is recorded as failed (grid: max_attempts)
FAILED = ".failed.json"
ATTEMPTS = ".attempts.json"


class StageRecords(StageDirectories):
    """What happened to the unfinished stages of the grid directory `root`: failures and killed starts."""

    root: Path

    def failure(self, sid: str) -> dict | None:
        """The last failed attempt: {id, kind, error, traceback, time, host, pid, attempts}, or None."""
        return json_or_none(self.beside(sid, FAILED))

    def attempts(self, sid: str) -> list[dict]:
        """Starts of the stage whose process died before the attempt ended ({host, pid, started} each)."""
        runs = (json_or_none(self.beside(sid, ATTEMPTS)) or {}).get("attempts")
        return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


__all__ = ["MAX_ATTEMPTS", "StageRecords"]
