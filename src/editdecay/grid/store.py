"""The output directory of a grid: finished stages, locks, failure records, cell results, the results table.

Layout (DIR is `editdecay grid run --out DIR`)::

    DIR/plan.json                     the plan run last (cells, stages, run-time settings), written atomically
    DIR/plans/<plan-id>.json          every plan run here, by content hash (what stage processes read)
    DIR/grid.yaml                     the grid file as given
    DIR/stages/<stage-id>/            a FINISHED stage: its outputs and `stage.json` (manifest, written last)
    DIR/stages/<stage-id>.lock        file lock, held while the stage is computed (fcntl/flock via `filelock`)
    DIR/stages/<stage-id>.running.json  host, pid, start time of the process computing it (informational)
    DIR/stages/<stage-id>.failed.json   error and traceback of the last failed attempt
    DIR/stages/.<stage-id>.*.tmp/     a stage being written (or left by a killed process; removed before redoing)
    DIR/results/<cell-id>.json        one result per cell (schema below), written atomically
    DIR/results.parquet, results.csv  one row per finished cell, gathered from results/
    DIR/logs/events-<host>-<pid>.jsonl  what each runner process did: stage computed / reused / failed

Why a stage can never look finished when it is not: its outputs are written into a
temporary directory, `stage.json` is written last (listing every file with its
size), and the directory is renamed into place in one step. A stage directory
whose manifest is missing, names another stage or lists a file that is missing or
has another size is treated as half-written: moved aside and computed again.

Why two runners never compute one stage twice: a runner takes the stage's lock and
re-checks whether it is finished before computing. The lock is an OS file lock,
released by the kernel when its process dies (kill -9 included); it works on local
disks and on shared filesystems with working POSIX/flock locks (NFSv4, Lustre and
GPFS mounted with locking).

Cell result schema (`results/<cell-id>.json`, `kind: grid-cell`, `cell_schema_version` 1)::

    schema_version        editdecay result schema (results.RESULT_SCHEMA_VERSION)
    kind                  "grid-cell"
    cell_schema_version   CELL_SCHEMA_VERSION
    grid                  grid name
    cell                  {id, label, axes: {model, editor, edit_data, n_edits, recipe, method, layers, targets,
                           finetune_data, seed, ...labels}}
    config                resolved configuration: {model, editor (full editor config, null without edits),
                           recipe (full Recipe), edited_layers, requests {data, n, seed, zsre_target, strict},
                           finetune_data, task, downstream (task specs), downstream_limit, eval_every}
    stages                role -> {id, kind, created, seconds, host}: the stages this cell's numbers come from
    model                 ModelIdentity of the base model (weights fingerprint)
    data                  edit data identity and rejections (null without edits)
    metrics               {M0, M_e, M_f, M_ef}: each `metrics.aggregate` (efficacy, paraphrase, neighborhood as
                           fractions, n, ...) plus task_accuracy / task_prefix_accuracy / n_task (the embedded
                           task) and, when lm-eval tasks are configured, downstream {lm-eval task: {metric: value,
                           <metric>_stderr, ..., n (documents scored)}} (acc/acc_norm for multiple choice;
                           word_perplexity, byte_perplexity, bits_per_byte, token_perplexity, n_tokens for ppl:)
                           and downstream_score (mean acc over the tasks that have one: the study's DS);
                           M_e and M_ef are absent for n_edits = 0
    decay                 {edit_flip_ratio: {value, n_flipped, n_success_edited, n, ...},
                           relative_decrease: {efficacy, paraphrase, neighborhood},
                           downstream: {M0, M_e, M_f, M_ef, delta_edit, delta_finetune (embedded task accuracy),
                                        tasks: {lm-eval task: {metric: {M0, M_e, M_f, M_ef, delta_edit,
                                                delta_finetune, delta_finetune_base}}},
                                        score: {the same for downstream_score}}} (E7); delta_edit = M_e - M0,
                           delta_finetune = M_ef - M_e, delta_finetune_base = M_f - M0
    downstream            how lm-eval tasks were scored: {spec {tasks, limit, num_fewshot, batch_size}, tasks
                           (lm-eval names), provenance {lm_eval_version, limit, num_fewshot, tasks: {name: {spec,
                           version, num_fewshot, output_type, n_documents, digest}}}}; null without lm-eval tasks
    curve                 decay curve of M_ef: [{step, efficacy, paraphrase, neighborhood, task_accuracy, ...}],
                           step 0 = M_e; `curve_base`: the same for M_f (step 0 = M0)
    requests              per-request survival table: [{case_id, M0, M_e, M_f, M_ef (RequestOutcome dicts),
                           success: {M0, M_e, M_f, M_ef}, margin: {...}, flipped}]
    training              {base: summary of M_f's training, edited: summary of M_ef's}
    timings               seconds per stage role
    environment           results.environment() of the process that assembled the result
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from editdecay.core.cache import atomic_dir, atomic_write_json
from editdecay.core.errors import ConfigError
from editdecay.grid.plan import Plan

log = logging.getLogger(__name__)

CELL_SCHEMA_VERSION = 1
MANIFEST = "stage.json"
MANIFEST_FORMAT = 1
STATES = ("done", "running", "failed", "pending")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _without_code(plan: Plan, path: Path) -> Plan:
    """`plan` with no shell lines (slurm.setup) or code installs (ray.runtime_env) left in its runtime."""
    import dataclasses

    runtime = json.loads(json.dumps(plan.runtime))
    rejected = {}
    for section, key in (("slurm", "setup"), ("ray", "runtime_env")):
        value = (runtime.get(section) or {}).get(key)
        if value:
            rejected[f"{section}.{key}"] = value
            runtime[section][key] = type(value)()
    if not rejected:
        return plan
    log.warning("%s: %s from the results directory's copy of the grid rejected (not run); the grid file given to "
                "`grid run` is the only source of them", path, ", ".join(rejected))
    runtime["rejected"] = rejected
    return dataclasses.replace(plan, runtime=runtime)


class GridStore:
    """One grid output directory. Holds no state besides its path: every answer is read from disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ plan

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    def write_plan(self, plan: Plan, grid_text: str | None = None) -> str:
        """Write the plan as plans/<plan-id>.json (never changed afterwards) and as plan.json (the latest).

        Stages are run against a plan id, so a runner keeps its own plan even if another grid is started
        in the same directory meanwhile. Returns the plan id.
        """
        from editdecay.core.cache import atomic_write_bytes, stable_hash

        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("stages", "results", "logs", "plans"):
            (self.root / sub).mkdir(exist_ok=True)
        data = plan.to_dict()
        plan_id = stable_hash(data, 16)
        if not (self.root / "plans" / f"{plan_id}.json").is_file():
            atomic_write_json(self.root / "plans" / f"{plan_id}.json", data)
        atomic_write_json(self.plan_path, data)
        if grid_text is not None:
            atomic_write_bytes(self.root / "grid.yaml", grid_text.encode())
        return plan_id

    def read_plan(self, plan_id: str | None = None) -> Plan:
        """The plan with this id, or the latest one (plan.json).

        A results directory is data, not a grid file: whatever runs as shell or installs code (Slurm
        `setup` lines, Ray `runtime_env`) is rejected from its copy -- dropped from `runtime` and kept under
        `runtime["rejected"]` for display -- so only a grid file the user gives to `grid run` can run them.
        """
        path = self.plan_path if plan_id is None else self.root / "plans" / f"{plan_id}.json"
        if not path.is_file():
            raise ConfigError(f"{self.root} is not a grid output directory (no {path.name}); run "
                              f"`editdecay grid run GRID.yaml --out {self.root}` first")
        return _without_code(Plan.from_dict(json.loads(path.read_text())), path)

    # ------------------------------------------------------------------ stages

    def stage_dir(self, sid: str) -> Path:
        return self.root / "stages" / sid

    def _side(self, sid: str, suffix: str) -> Path:
        return self.root / "stages" / f"{sid}{suffix}"

    def manifest(self, sid: str) -> dict | None:
        """The manifest of a finished stage, or None if it is not finished (or half-written)."""
        d = self.stage_dir(sid)
        try:
            m = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if m.get("id") != sid or m.get("format") != MANIFEST_FORMAT:
            return None
        for name, size in m.get("files", {}).items():
            try:
                if (d / name).stat().st_size != size:
                    return None
            except OSError:
                return None
        return m

    def is_done(self, sid: str) -> bool:
        return self.manifest(sid) is not None

    def discard_broken(self, sid: str) -> bool:
        """Move a half-written stage directory aside (call with the stage's lock held). True if one was found."""
        d = self.stage_dir(sid)
        if d.exists() and self.manifest(sid) is None:
            aside = d.with_name(f".{sid}.broken-{int(time.time())}-{os.getpid()}")
            log.warning("stage %s is incomplete (manifest missing or files differ); moving it to %s and "
                        "computing it again", sid, aside.name)
            os.rename(d, aside)
            shutil.rmtree(aside, ignore_errors=True)
            return True
        return False

    def clean_temporaries(self, sid: str) -> int:
        """Remove output directories left by killed attempts of `sid` (call with its lock held)."""
        n = 0
        for p in (self.root / "stages").glob(f".{sid}.*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:           # e.g. a half-written .running.json or .failed.json
                p.unlink(missing_ok=True)
            n += 1
        return n

    @contextlib.contextmanager
    def building(self, sid: str, kind: str) -> Iterator[Path]:
        """Yield an empty directory for the outputs of `sid`; on success write its manifest and rename it into
        place. On error (or kill) nothing is published."""
        with atomic_dir(self.stage_dir(sid)) as tmp:
            t0 = time.perf_counter()
            yield tmp
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"format": MANIFEST_FORMAT, "id": sid, "kind": kind, "files": files, "created": _now(),
                    "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid()}
            extra = tmp / "outputs.json"
            if extra.is_file():
                meta["outputs"] = json.loads(extra.read_text())
            atomic_write_json(tmp / MANIFEST, meta)

    def lock(self, sid: str, timeout: float = -1) -> FileLock:
        self.stage_dir(sid).parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._side(sid, ".lock")), timeout=timeout)

    def is_locked(self, sid: str) -> bool:
        """True while some process holds the stage's lock (it is being computed)."""
        path = self._side(sid, ".lock")
        if not path.exists():
            return False
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        lock.release()
        return False

    def mark_running(self, sid: str) -> None:
        atomic_write_json(self._side(sid, ".running.json"),
                          {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()})

    def clear_running(self, sid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._side(sid, ".running.json").unlink()

    def running_info(self, sid: str) -> dict | None:
        try:
            return json.loads(self._side(sid, ".running.json").read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ failures

    def record_failure(self, sid: str, kind: str, error: str, traceback: str) -> None:
        atomic_write_json(self._side(sid, ".failed.json"), {
            "id": sid, "kind": kind, "error": error, "traceback": traceback, "time": _now(),
            "host": socket.gethostname(), "pid": os.getpid()})

    def failure(self, sid: str) -> dict | None:
        try:
            return json.loads(self._side(sid, ".failed.json").read_text())
        except (OSError, ValueError):
            return None

    def clear_failure(self, sid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._side(sid, ".failed.json").unlink()

    # ------------------------------------------------------------------ results and events

    def result_path(self, cell_id: str) -> Path:
        return self.root / "results" / f"{cell_id}.json"

    def read_result(self, cell_id: str) -> dict | None:
        try:
            return json.loads(self.result_path(cell_id).read_text())
        except (OSError, ValueError):
            return None

    def publish_result(self, plan: Plan, cell_id: str) -> bool:
        """Copy a finished cell stage's result to results/<cell-id>.json (atomically) if it is not there yet."""
        cell = plan.cell(cell_id)
        if not self.is_done(cell.stages["cell"]):
            return False
        target = self.result_path(cell_id)
        src = self.stage_dir(cell.stages["cell"]) / "result.json"
        if not target.is_file() or target.stat().st_size != src.stat().st_size:
            from editdecay.core.cache import atomic_write_bytes

            atomic_write_bytes(target, src.read_bytes())
        return True

    def event(self, **record) -> None:
        """Append one line to this process's event log (one file per process: no interleaving on shared disks)."""
        path = self.root / "logs" / f"events-{socket.gethostname()}-{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": _now(), "pid": os.getpid(), **record}) + "\n")
            f.flush()

    def events(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "logs").glob("events-*.jsonl")):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    # ------------------------------------------------------------------ status

    def cell_states(self, plan: Plan) -> list[dict]:
        """One entry per cell: {id, label, state, stages: {role: state}, ...}; state in STATES.

        done: its result exists. failed: one of the stages it needs failed (error and traceback included).
        running: one of its stages is locked by a live process. pending: otherwise.
        """
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
                entry["state"] = "done"
                entry["result"] = str(self.result_path(cell.id))
            elif any(s == "running" for s in states.values()):
                entry["state"] = "running"
                entry["running"] = [{"stage": sid, "kind": plan.stages[sid].kind, **(self.running_info(sid) or {})}
                                    for sid, s in states.items() if s == "running"]
            elif any(s == "failed" for s in states.values()):
                sid = next(sid for sid, s in states.items() if s == "failed")
                f = self.failure(sid) or {}
                entry.update(state="failed", failed_stage=sid, failed_kind=plan.stages[sid].kind,
                             error=f.get("error"), traceback=f.get("traceback"))
            out.append(entry)
        return out

    # ------------------------------------------------------------------ results table

    def gather(self, plan: Plan) -> Path | None:
        """Write results.parquet and results.csv with one row per finished cell; returns the parquet path."""
        import pandas as pd

        rows = [result_row(r) for c in plan.cells if (r := self.read_result(c.id)) is not None]
        if not rows:
            return None
        df = pd.DataFrame(rows)
        from editdecay.core.cache import atomic_write_bytes

        atomic_write_bytes(self.root / "results.csv", df.to_csv(index=False).encode())
        path = self.root / "results.parquet"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path


ROW_DOWNSTREAM_METRICS = ("acc", "acc_norm", "word_perplexity", "token_perplexity")   # lm-eval task columns


def result_row(result: dict) -> dict:
    """Flatten a cell result into one table row: axes, then <model>_<score> for M0/M_e/M_f/M_ef, then decay."""
    axes = result["cell"]["axes"]
    row = {"cell": result["cell"]["id"], "label": result["cell"]["label"]}
    row.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in axes.items()})
    for stage in ("M0", "M_e", "M_f", "M_ef"):
        m = result["metrics"].get(stage) or {}
        for key in ("efficacy", "paraphrase", "neighborhood", "harmonic_mean", "task_accuracy", "task_token_accuracy",
                    "task_nll", "n", "n_task"):
            row[f"{stage}_{key}"] = m.get(key)
        if m.get("downstream") is not None:
            row[f"{stage}_downstream_score"] = m.get("downstream_score")
            for task, values in m["downstream"].items():
                for key in ROW_DOWNSTREAM_METRICS:
                    if key in values:
                        row[f"{stage}_{task}_{key}"] = values[key]
    decay = result.get("decay") or {}
    efr = decay.get("edit_flip_ratio") or {}
    row["edit_flip_ratio"] = efr.get("value")
    row["n_flipped"] = efr.get("n_flipped")
    for key, value in (decay.get("relative_decrease") or {}).items():
        row[f"relative_decrease_{key}"] = value
    return row


__all__ = ["CELL_SCHEMA_VERSION", "GridStore", "MANIFEST", "STATES", "result_row"]
