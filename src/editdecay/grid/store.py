"""The output directory of a grid: finished stages, locks, failure records, cell results, the results table.

Layout (DIR is `editdecay grid run --out DIR`)::

    DIR/plan.json                     the plan run last (cells, stages, run-time settings), written atomically
    DIR/plans/<plan-id>.json          every plan run here, by content hash (what stage processes read)
    DIR/grid.yaml                     the grid file as given
    DIR/stages/<stage-id>/            a FINISHED stage: its outputs and `stage.json` (manifest, written last)
    DIR/stages/<stage-id>.lock        file lock, held while the stage is computed (fcntl/flock via `filelock`)
    DIR/stages/<stage-id>.running.json  the lock's holder: host, pid, since when, last heartbeat (written when the
                                      lock is taken, refreshed every HEARTBEAT_S while it computes)
    DIR/stages/<stage-id>.attempts.json  starts of the stage whose process died before it ended (killed: out of
                                      memory, time limit, node lost); at `max_attempts` it is recorded as failed
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
GPFS mounted with locking). Every record of a stage (`.failed.json`, `.attempts.json`,
`.running.json`) is written and removed only with the stage's lock held.

What the kernel cannot release is the lock of a process that is alive but hangs (or
of a client that lost its shared filesystem). Its holder record says who holds it and
its heartbeat when it last made progress; `editdecay grid status` shows such a lock as
stale and `editdecay grid unlock` breaks it (removes the lock file: the hung process
keeps a lock on a file nobody else opens).

Why a stage killed again and again is not retried forever: every start is counted on
disk before the stage computes and the count is cleared when it ends (computed, or
failed with its error recorded). A count that reaches the grid's `max_attempts` means
its process died that many times without ending (the OOM killer's SIGKILL, a time
limit): the stage is recorded as failed instead of started once more.

Cell result schema (`results/<cell-id>.json`, `kind: grid-cell`, `cell_schema_version` 2, core.schema.CellResult)::

    schema_version        editdecay result schema (core.schema.SCHEMA_VERSION; validated by core.schema.CellResult)
    kind                  "grid-cell"
    cell_schema_version   CELL_SCHEMA_VERSION
    grid                  grid name
    cell                  {id, label, axes: {model, editor, edit_data, n_edits, recipe, method, layers, targets,
                           finetune_data, seed, ...labels}}
    config                resolved configuration: {model (ModelRef), editor (full editor config, null without
                           edits), recipe (full Recipe), edited_layers, requests {data, n, seed, zsre_target, strict,
                           digest}, finetune_data, data_settings (its source's settings), held_out {spec, digest,
                           settings}, downstream (lm-eval task specs), downstream_limit, eval_every}; cell schema 1
                           had `task` and `chatterbot` (the two sources' settings) instead of data_settings/held_out
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
import threading
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from editdecay.core.cache import atomic_dir, atomic_write_json, dumps_json
from editdecay.core.errors import ConfigError
from editdecay.grid.plan import Plan

log = logging.getLogger(__name__)

from editdecay.core.schema import CELL_SCHEMA_VERSION, MODELS  # noqa: E402  (the schema owns them)

MANIFEST = "stage.json"
MANIFEST_FORMAT = 1
STATES = ("done", "running", "failed", "pending")
MAX_ATTEMPTS = 3            # starts whose process died before a stage is recorded as failed (grid: max_attempts)
HEARTBEAT_S = 30.0          # how often a stage's holder record is refreshed while it computes
STALE_AFTER_S = 900.0       # a lock whose holder shows no heartbeat for this long is stale (grid status/unlock)
WAIT_REPORT_S = 60.0        # a runner waiting for a lock says who holds it this often

_HELD: dict[str, FileLock] = {}     # stage locks this process holds, by lock path (nested takes are no-ops)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # exists, another user's
        return True
    return True


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

        Stages are run against a plan id, so a runner keeps its own plan even if the grid file is changed and
        run again in the same directory meanwhile. Returns the plan id.

        One directory holds one grid: if plan.json names another grid, ConfigError (nothing is written). The
        check and the write happen under the directory's lock (`.grid.lock`), so two grids started at once
        cannot both pass it.
        """
        from editdecay.core.cache import atomic_write_bytes, stable_hash

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".grid.lock")):
            self.check_same_grid(plan)
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

    def check_same_grid(self, plan: Plan) -> None:
        """Raise ConfigError if this directory holds the results of a grid with another name than `plan`'s.

        A changed grid of the same name is fine (finished stages are content-addressed and reused); another
        grid would overwrite plan.json and grid.yaml, and `grid status`, `gather` and the results table would
        then describe only one of the two.
        """
        if not self.plan_path.is_file():
            return
        try:
            old = json.loads(self.plan_path.read_text()).get("name")
        except (OSError, ValueError):
            return
        if old is not None and old != plan.name:
            raise ConfigError(
                f"--out {self.root} holds the results of grid {old!r}; this grid is named {plan.name!r}. One "
                f"results directory holds one grid (its plan.json, grid.yaml, status and results table): give "
                f"this grid another --out, or name it {old!r} if it is the same study")

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
        data = json.loads(path.read_text())
        if plan_id is not None:
            from editdecay.core.cache import stable_hash

            if stable_hash(data, len(plan_id)) != plan_id:     # workers run what the driver planned, nothing else
                raise ConfigError(f"{path} does not match its plan id {plan_id} (changed after it was written); "
                                  f"run `editdecay grid run GRID.yaml --out {self.root}` again")
        return _without_code(Plan.from_dict(data), path)

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

    def acquire(self, sid: str, wait: bool = True) -> bool:
        """Take the stage's lock until `release`, and write the holder record (`.running.json`).

        wait=False: returns False at once if another process holds it. wait=True: blocks until it is free,
        logging every WAIT_REPORT_S who holds it; a holder that hangs is cleared by `editdecay grid unlock`,
        after which this waiter takes a fresh lock file.
        """
        path = str(self._side(sid, ".lock"))
        if path in _HELD:
            raise RuntimeError(f"stage {sid}: this process holds its lock already")
        lock = self.lock(sid)
        while True:
            try:
                lock.acquire(timeout=WAIT_REPORT_S if wait else 0)
                break
            except Timeout:
                if not wait:
                    return False
                h = self.holder(sid)
                log.warning("stage %s: waiting for its lock, held by pid %s on %s since %s (heartbeat %s s ago); "
                            "if that process hangs, `editdecay grid unlock %s` clears it", sid, h.get("pid"),
                            h.get("host"), h.get("started"), h.get("heartbeat_age_s"), self.root)
        _HELD[path] = lock
        now = time.time()
        atomic_write_json(self._side(sid, ".running.json"), {
            "host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "started_unix": now,
            "heartbeat": _now(), "heartbeat_unix": now})
        return True

    def release(self, sid: str) -> None:
        """Remove this process's holder record and release the stage's lock (taken by `acquire`)."""
        lock = _HELD.pop(str(self._side(sid, ".lock")), None)
        try:
            if self._mine(self.running_info(sid)):
                self.clear_running(sid)
        finally:
            if lock is not None:
                lock.release()

    @staticmethod
    def _mine(record: dict | None) -> bool:
        return bool(record) and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()

    @contextlib.contextmanager
    def holding(self, sid: str, wait: bool = True) -> Iterator[bool]:
        """The stage's lock around a short change of its records. Re-entrant: a no-op where this process holds
        it already (inside `execute_stage`). Yields False, and the body must change nothing, when wait=False
        and another process holds it."""
        path = str(self._side(sid, ".lock"))
        if path in _HELD:
            yield True
            return
        lock = self.lock(sid)
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            yield False
            return
        _HELD[path] = lock
        try:
            yield True
        finally:
            _HELD.pop(path, None)
            lock.release()

    @contextlib.contextmanager
    def heartbeat(self, sid: str, every: float | None = None) -> Iterator[None]:
        """Refresh the holder record's heartbeat every `every` (HEARTBEAT_S) seconds while the body runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every or HEARTBEAT_S):
                rec = self.running_info(sid)
                if not self._mine(rec):        # the lock was broken (grid unlock): the record is not ours
                    return
                with contextlib.suppress(OSError):
                    atomic_write_json(self._side(sid, ".running.json"),
                                      {**rec, "heartbeat": _now(), "heartbeat_unix": time.time()})

        thread = threading.Thread(target=beat, name=f"heartbeat-{sid}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def holder(self, sid: str, stale_after: float = STALE_AFTER_S) -> dict:
        """Who holds the stage's lock, from its holder record: {stage, host, pid, started, heartbeat_age_s,
        held_s, alive (None: another host), stale, why}. Call only for a lock that is held."""
        rec = self.running_info(sid) or {}
        now = time.time()
        out = {"stage": sid, **{k: rec.get(k) for k in ("host", "pid", "started", "heartbeat")}}
        if rec:
            out["held_s"] = round(now - rec.get("started_unix", now), 1)
            out["heartbeat_age_s"] = round(now - rec.get("heartbeat_unix", rec.get("started_unix", now)), 1)
        else:       # lock taken by a process that wrote no record (yet): age of the lock file
            with contextlib.suppress(OSError):
                out["heartbeat_age_s"] = round(now - self._side(sid, ".lock").stat().st_mtime, 1)
        here = rec.get("host") == socket.gethostname()
        out["alive"] = pid_alive(rec["pid"]) if here and rec.get("pid") else None
        age = out.get("heartbeat_age_s")
        if out["alive"] is False:
            out.update(stale=True, why=f"its holder, pid {rec['pid']} on this host, no longer exists")
        elif age is not None and age > stale_after:
            out.update(stale=True, why=f"no heartbeat for {age:.0f} s (more than {stale_after:.0f} s): its holder "
                                       f"hangs or lost this filesystem")
        else:
            out.update(stale=False, why=None)
        return out

    def locks(self, stale_after: float = STALE_AFTER_S) -> list[dict]:
        """Every stage lock held now, with its holder (`holder`)."""
        out = []
        for path in sorted((self.root / "stages").glob("*.lock")):
            sid = path.name[:-len(".lock")]
            if self.is_locked(sid):
                out.append(self.holder(sid, stale_after))
        return out

    def unlock(self, sid: str, holder: dict | None = None) -> bool:
        """Break a stage's lock: remove its lock file and holder record. Runners then take a fresh lock file;
        the process that held it keeps a lock on the removed file, which excludes nobody (kill it: if it
        wakes up it may compute the stage a second time, though it cannot publish over a finished one).

        `holder`: what `holder(sid)` said when the lock was judged stale; if the record changed since (the
        stage changed hands meanwhile) nothing is removed and False is returned.
        """
        rec = self.running_info(sid)
        if holder is not None and (rec or {}).get("pid") != holder.get("pid"):
            return False
        with contextlib.suppress(FileNotFoundError):
            self._side(sid, ".lock").unlink()
        self.clear_running(sid)
        self.event(event="unlocked", stage=sid, holder=rec)
        return True

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

    def clear_running(self, sid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._side(sid, ".running.json").unlink()

    def running_info(self, sid: str) -> dict | None:
        try:
            return json.loads(self._side(sid, ".running.json").read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ failures

    def record_failure(self, sid: str, kind: str, error: str, traceback: str, wait: bool = True) -> bool:
        """Record a failed attempt, with the stage's lock held; never for a finished stage. Returns whether it
        was recorded (False: the stage is finished, or busy with wait=False: another runner computes it)."""
        with self.holding(sid, wait) as held:
            if not held or self.is_done(sid):
                return False
            atomic_write_json(self._side(sid, ".failed.json"), {
                "id": sid, "kind": kind, "error": error, "traceback": traceback, "time": _now(),
                "host": socket.gethostname(), "pid": os.getpid(), "attempts": len(self.attempts(sid))})
            return True

    def failure(self, sid: str) -> dict | None:
        try:
            return json.loads(self._side(sid, ".failed.json").read_text())
        except (OSError, ValueError):
            return None

    def clear_failure(self, sid: str, attempts: bool = False) -> None:
        """Remove the failure record (and with attempts=True the count of killed starts: a fresh retry), with the
        stage's lock held."""
        with self.holding(sid):
            with contextlib.suppress(FileNotFoundError):
                self._side(sid, ".failed.json").unlink()
            if attempts:
                self.clear_attempts(sid)

    def attempts(self, sid: str) -> list[dict]:
        """Starts of the stage whose process died before the attempt ended ({host, pid, started} each)."""
        try:
            return list(json.loads(self._side(sid, ".attempts.json").read_text())["attempts"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def start_attempt(self, sid: str) -> int:
        """Count a start on disk before computing (call with the lock held); returns the starts now counted."""
        runs = [*self.attempts(sid), {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}]
        atomic_write_json(self._side(sid, ".attempts.json"), {"id": sid, "attempts": runs})
        return len(runs)

    def drop_attempt(self, sid: str) -> None:
        """Uncount this process's last start (interrupted on purpose: Ctrl-C, not a crash of the stage)."""
        runs = self.attempts(sid)
        if runs and runs[-1].get("pid") == os.getpid():
            runs.pop()
            atomic_write_json(self._side(sid, ".attempts.json"), {"id": sid, "attempts": runs})

    def clear_attempts(self, sid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._side(sid, ".attempts.json").unlink()

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
            f.write(dumps_json({"time": _now(), "pid": os.getpid(), **record}) + "\n")
            f.flush()

    def events(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "logs").glob("events-*.jsonl")):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    # ------------------------------------------------------------------ status

    def cell_states(self, plan: Plan, stale_after: float = STALE_AFTER_S) -> list[dict]:
        """One entry per cell: {id, label, state, stages: {role: state}, ...}; state in STATES.

        done: its result exists. failed: one of the stages it needs failed (error and traceback included).
        running: one of its stages is locked (`running`: the holders, `holder`, with `stale` where the holder
        is gone or shows no heartbeat for `stale_after` seconds). pending: otherwise.
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
                entry["running"] = [{"kind": plan.stages[sid].kind, **self.holder(sid, stale_after)}
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
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")   # unique per writer
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path


ROW_DOWNSTREAM_METRICS = ("acc", "acc_norm", "word_perplexity", "token_perplexity")   # lm-eval task columns


def result_row(result: dict) -> dict:
    """Flatten a cell result into one table row: axes, then <model>_<score> for M0/M_e/M_f/M_ef, then decay."""
    axes = result["cell"]["axes"]
    row = {"cell": result["cell"]["id"], "label": result["cell"]["label"]}
    row.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in axes.items()})
    for stage in MODELS:
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
