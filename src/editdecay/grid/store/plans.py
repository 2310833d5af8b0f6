"""The plan files of a grid directory: what was run there, by content hash.

    DIR/plan.json                 the plan run last (cells, stages, run-time settings), written atomically
    DIR/plans/<plan-id>.json      every plan run here, by content hash (what stage processes read)
    DIR/grid.yaml                 the grid file as given
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from filelock import FileLock

from editdecay.core.cache import atomic_write_bytes, atomic_write_json, stable_hash
from editdecay.core.errors import ConfigError
from editdecay.core.files import MAX_RESULT_BYTES, json_or_none, path_problem, read_json
from editdecay.grid.plan import Plan

log = logging.getLogger(__name__)

SUBDIRS = ("stages", "results", "logs", "plans")


class PlanFiles:
    """Write and read the plans of the grid directory `root`."""

    root: Path

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    def write_plan(self, plan: Plan, grid_text: str | None = None) -> str:
        """Write the plan as plans/<plan-id>.json (never changed afterwards) and as plan.json (the latest).

        Stages are run against a plan id, so a runner keeps its own plan even if the grid file is changed and
        run again in the same directory meanwhile. Returns the plan id.

        One directory holds one grid: if plan.json names another grid, ConfigError (nothing is written). The
        check and the write happen under the directory's lock (`.grid.lock`), so two grids started at once
        cannot both pass it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".grid.lock")):
            self.check_same_grid(plan)
            for sub in SUBDIRS:
                (self.root / sub).mkdir(exist_ok=True)
            data = plan.to_dict()
            plan_id = stable_hash(data, 16)
            if not (self.root / "plans" / f"{plan_id}.json").is_file():
                atomic_write_json(self.root / "plans" / f"{plan_id}.json", data)
            atomic_write_json(self.plan_path, data)
            if grid_text is not None:
                atomic_write_bytes(self.root / "grid.yaml", grid_text.encode())
        return plan_id

    def check_same_grid(self, plan: Plan) -> None:
        """Raise ConfigError if this directory holds the results of a grid with another name than `plan`'s.

        A changed grid of the same name is fine (finished stages are content-addressed and reused); another
        grid would overwrite plan.json and grid.yaml, and `grid status`, `gather` and the results table would
        then describe only one of the two.
        """
        old = (json_or_none(self.plan_path, limit=MAX_RESULT_BYTES) or {}).get("name")
        if old is not None and old != plan.name:
            raise ConfigError(
                f"--out {self.root} holds the results of grid {old!r}; this grid is named {plan.name!r}. One "
                f"results directory holds one grid (its plan.json, grid.yaml, status and results table): give "
                f"this grid another --out, or name it {old!r} if it is the same study")

    def read_plan(self, plan_id: str | None = None) -> Plan:
        """The plan with this id, or the latest one (plan.json). Raises ConfigError if there is none, or if the
        file no longer matches its id.

        A results directory is data, not a grid file: whatever runs as shell or installs code (Slurm
        `setup` lines, Ray `runtime_env`) is rejected from its copy -- dropped from `runtime` and kept under
        `runtime["rejected"]` for display -- so only a grid file the user gives to `grid run` can run them.
        """
        path = self.plan_path if plan_id is None else self.root / "plans" / f"{plan_id}.json"
        if not os.path.lexists(path):
            where = (f"{self.root} is not a grid output directory (no {path.name})" if self.root.is_dir() else
                     f"results directory {str(self.root)!r} {path_problem(self.root) or 'is not a directory'}")
            raise ConfigError(f"{where}; run `editdecay grid run GRID.yaml --out {self.root}` first")
        data = read_json(path, "plan", limit=MAX_RESULT_BYTES, expect=dict)
        if plan_id is not None and stable_hash(data, len(plan_id)) != plan_id:
            # workers run what the driver planned, nothing else
            raise ConfigError(f"{path} does not match its plan id {plan_id} (changed after it was written); "
                              f"run `editdecay grid run GRID.yaml --out {self.root}` again")
        return _without_code(Plan.from_dict(data, where=str(path)), path)


def _without_code(plan: Plan, path: Path) -> Plan:
    """`plan` with no shell lines (slurm.setup) or code installs (ray.runtime_env) left in its runtime."""
    runtime = json.loads(json.dumps(plan.runtime))
    rejected = {}
    for section, key in (("slurm", "setup"), ("ray", "runtime_env")):
        block = runtime.get(section)
        value = block.get(key) if isinstance(block, dict) else None
        if value:
            rejected[f"{section}.{key}"] = value
            runtime[section][key] = type(value)()
    if not rejected:
        return plan
    log.warning("%s: %s from the results directory's copy of the grid rejected (not run); the grid file given to "
                "`grid run` is the only source of them", path, ", ".join(rejected))
    runtime["rejected"] = rejected
    return dataclasses.replace(plan, runtime=runtime)


__all__ = ["PlanFiles"]
