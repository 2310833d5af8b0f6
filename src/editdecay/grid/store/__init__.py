"""The output directory of a grid (`editdecay grid run --out DIR`), one module per concept:

- `plans`      DIR/plan.json, DIR/plans/<plan-id>.json, DIR/grid.yaml: what was run here
- `stage_dir`  DIR/stages/<stage-id>/: a finished stage, its manifest, atomic publication
- `locks`      DIR/stages/<stage-id>.lock: taking a stage's lock, who holds one, breaking a stale one
- `holder`     DIR/stages/<stage-id>.running.json: the lock's holder (host, pid, since, heartbeat)
- `lease`      the held lock of one stage: the only way to publish it or change its records
- `records`    DIR/stages/<stage-id>.attempts.json and .failed.json: killed starts and failures
- `results`    DIR/results/<cell-id>.json and DIR/results.parquet / .csv: cell results and the table
- `events`     DIR/logs/events-<host>-<pid>.jsonl: what each runner process did
- `status`     the state of each cell (done / running / failed / pending)

A cell result's fields are those of `core.schema.CellResult` (its docstring describes each).

`GridStore(DIR)` reads and writes all of it; it holds no state besides its path (every
answer is read from disk). Whatever must happen with a stage's lock held is done through
the `StageLease` that `take`/`try_take` return::

    with store.take(sid) as lease:
        lease.clear_failure(attempts=True)
"""

from __future__ import annotations

from pathlib import Path

from editdecay.core.schema import CELL_SCHEMA_VERSION
from editdecay.grid.store.lease import StageLease
from editdecay.grid.store.locks import STALE_AFTER_S
from editdecay.grid.store.plans import PlanFiles
from editdecay.grid.store.records import MAX_ATTEMPTS
from editdecay.grid.store.results import result_row
from editdecay.grid.store.stage_dir import MANIFEST
from editdecay.grid.store.status import STATES, CellStatus, state_counts


class GridStore(PlanFiles, CellStatus):
    """One grid output directory. Holds no state besides its path: every answer is read from disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)


__all__ = ["CELL_SCHEMA_VERSION", "GridStore", "MANIFEST", "MAX_ATTEMPTS", "STALE_AFTER_S", "STATES", "StageLease",
           "result_row", "state_counts"]
