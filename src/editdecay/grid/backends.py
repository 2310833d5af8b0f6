"""Where stages run: in this process (local), as Ray tasks, or as Slurm job arrays (submitit).

Every backend computes a stage the same way, with `execute.execute_stage(root, stage_id)`
in some process that sees the grid directory; locks and atomic publication live
there, so backends only decide *where* and *when*. A stage is started once all its
dependencies are finished; a stage whose dependency failed is reported `blocked`
and not started. Cell stages only assemble JSON, so the Ray and Slurm drivers run
them themselves instead of shipping them to a worker.

- local: one stage after another, in plan order. A stage locked by another runner is
  skipped for now and waited for only when nothing else can run.
- ray:   one Ray task per stage, with the CPUs/GPUs/memory of `resources.<kind>` in the
  grid file; the driver submits a stage as soon as its dependencies are done and
  gathers the outcomes (`ray.wait`). `address=None` starts a local cluster.
- slurm: waves of stages by dependency depth (a wave waits for the previous one); one
  job array per stage kind in a wave, with that kind's resources and the Slurm
  parameters of the grid file's `slurm:` section.
  `cluster="local"` uses submitit's local executor (subprocesses; for tests).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from editdecay.core.config import check_choice
from editdecay.core.errors import ConfigError
from editdecay.grid.execute import Progress, StageOutcome, execute_stage
from editdecay.grid.plan import Plan
from editdecay.grid.store import GridStore

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray", "slurm")
DRIVER_KINDS = ("cell",)


def make_backend(name: str, **options):
    check_choice("backend", name, BACKENDS)
    cls = {"local": LocalBackend, "ray": RayBackend, "slurm": SlurmBackend}[name]
    return cls(**options)


class _Tracker:
    """Dependency bookkeeping shared by the backends: which selected stages can start now."""

    def __init__(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress):
        self.plan, self.store, self.reporter = plan, store, reporter
        self.pending = list(stage_ids)
        self.bad: set[str] = set()        # failed or blocked in this run

    def settle(self) -> list[str]:
        """Report stages that are already finished (reused) or can never run (blocked); return startable ones."""
        ready = []
        for sid in list(self.pending):
            st = self.plan.stages[sid]
            bad = [d for d in st.deps if d in self.bad]
            if bad:
                self.finish(StageOutcome(sid, st.kind, "blocked", error=f"needs {bad[0]}, which failed"))
            elif self.store.is_done(sid):
                self.finish(StageOutcome(sid, st.kind, "reused"))
            elif all(self.store.is_done(d) for d in st.deps):
                ready.append(sid)
        return ready

    def finish(self, outcome: StageOutcome) -> None:
        if outcome.stage in self.pending:
            self.pending.remove(outcome.stage)
        if outcome.state in ("failed", "blocked"):
            self.bad.add(outcome.stage)
        self.reporter.finished(outcome)


def _threads(plan: Plan, threads: int | None) -> int | None:
    return threads or plan.runtime.get("threads")


# --------------------------------------------------------------------------- local


class LocalBackend:
    name = "local"

    def __init__(self, poll: float = 1.0):
        self.poll = poll

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        t = _Tracker(plan, store, stage_ids, reporter)
        threads = _threads(plan, threads)
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


# --------------------------------------------------------------------------- ray


def _ray_resources(plan: Plan, kind: str) -> dict:
    r = plan.runtime["resources"].get(kind) or {"cpus": 1, "gpus": 0, "memory_gb": None}
    out = {"num_cpus": r["cpus"], "num_gpus": r["gpus"]}
    if r.get("memory_gb"):
        out["memory"] = int(r["memory_gb"] * 2**30)
    return out


class RayBackend:
    """Ray core: one task per stage. Starts a local cluster unless `address` (or the grid's ray.address) is given."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        import ray

        threads = _threads(plan, threads)
        settings = plan.runtime.get("ray") or {}
        address = self.address or settings.get("address")
        env = dict(settings.get("runtime_env") or {})
        if threads:
            env["env_vars"] = {**env.get("env_vars", {}), **{v: str(threads) for v in (
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
        started_here = not ray.is_initialized()
        if started_here:
            kw = {"runtime_env": env or None, "include_dashboard": False, "log_to_driver": progress}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=self.num_cpus, num_gpus=self.num_gpus, **kw)
        try:
            self._loop(plan, store, stage_ids, reporter, plan_id, threads, ray)
        finally:
            if started_here:
                ray.shutdown()

    def _loop(self, plan, store, stage_ids, reporter, plan_id, threads, ray) -> None:
        task = ray.remote(execute_stage)
        t = _Tracker(plan, store, stage_ids, reporter)
        running: dict = {}                     # ObjectRef -> stage id
        submitted: set[str] = set()
        root = str(Path(store.root).resolve())
        while t.pending:
            for sid in t.settle():
                if sid in submitted:
                    continue
                kind = plan.stages[sid].kind
                if kind in DRIVER_KINDS:
                    t.finish(execute_stage(root, sid, plan_id=plan_id, threads=threads))
                    continue
                ref = task.options(**_ray_resources(plan, kind), name=f"{kind}:{sid}").remote(
                    root, sid, plan_id=plan_id, wait=True, threads=threads)
                running[ref] = sid
                submitted.add(sid)
                reporter.started(sid, "ray task")
            if not running:
                if t.pending and not t.settle():
                    time.sleep(0.5)   # dependencies computed by another runner
                continue
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                sid = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # noqa: BLE001 -- the worker died (out of memory, node lost)
                    outcome = _lost(store, plan, sid, e)
                t.finish(outcome)


def _lost(store: GridStore, plan: Plan, sid: str, error: BaseException) -> StageOutcome:
    """A worker or job died without returning (killed for memory, node failure): record it as a failure."""
    import traceback

    kind = plan.stages[sid].kind
    msg = f"{type(error).__name__}: {error}"
    # Under the stage's lock (the dead worker's lock is free): never over a stage another runner finished.
    with store.take(sid) as lease:
        if lease.record_failure(kind, msg, "".join(traceback.format_exception(error))):
            return StageOutcome(sid, kind, "failed", error=msg)
    return StageOutcome(sid, kind, "computed")


# --------------------------------------------------------------------------- slurm


def _waves(plan: Plan, stage_ids: list[str]) -> list[dict[str, list[str]]]:
    """Stages grouped by dependency depth (a wave needs only earlier waves), then by kind within a wave (one job
    array per kind: one resource request)."""
    depth: dict[str, int] = {}
    for sid in plan.stages:                      # plan order: dependencies first
        depth[sid] = 1 + max((depth[d] for d in plan.stages[sid].deps), default=-1)
    waves: dict[int, dict[str, list[str]]] = {}
    for sid in stage_ids:
        waves.setdefault(depth[sid], {}).setdefault(plan.stages[sid].kind, []).append(sid)
    return [waves[k] for k in sorted(waves)]


def _stage_job(root: str, stage_id: str, plan_id: str | None, threads: int | None) -> dict:
    """What a Slurm array task runs (module-level so submitit pickles it by reference)."""
    return execute_stage(root, stage_id, plan_id=plan_id, wait=True, threads=threads).to_dict()


class SlurmBackend:
    """submitit job arrays. `cluster`: auto (Slurm when available, else local) | slurm | local."""

    name = "slurm"

    def __init__(self, cluster: str = "auto", poll: float = 5.0):
        if cluster not in ("auto", "slurm", "local"):
            raise ConfigError(f"slurm cluster {cluster!r}: use auto, slurm or local (submitit's local executor)")
        self.cluster, self.poll = cluster, poll

    def _executor(self, plan: Plan, store: GridStore, kind: str, threads: int | None):
        import submitit

        s = plan.runtime["slurm"]
        r = plan.runtime["resources"].get(kind) or {"cpus": 1, "gpus": 0, "memory_gb": None}
        ex = submitit.AutoExecutor(folder=str(store.root / "slurm" / "%j"),
                                   cluster=None if self.cluster == "auto" else self.cluster)
        params = {
            "name": f"editdecay-{kind}", "timeout_min": s["timeout_min"], "cpus_per_task": max(1, math.ceil(r["cpus"])),
            "gpus_per_node": math.ceil(r["gpus"]) or None, "mem_gb": r.get("memory_gb"),
            "slurm_partition": s.get("partition"), "slurm_account": s.get("account"), "slurm_qos": s.get("qos"),
            "slurm_constraint": s.get("constraint"), "slurm_array_parallelism": s["array_parallelism"],
            "slurm_additional_parameters": s.get("additional_parameters") or None,
            "slurm_setup": s.get("setup") or None,
        }
        if threads:
            params["slurm_setup"] = [*(s.get("setup") or []), f"export OMP_NUM_THREADS={threads}"]
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        threads = _threads(plan, threads)
        t = _Tracker(plan, store, stage_ids, reporter)
        root = str(Path(store.root).resolve())
        for wave in _waves(plan, stage_ids):
            ready = set(t.settle())
            waiting = {}
            for kind, group in wave.items():          # every array of a wave is submitted before waiting
                ids = [sid for sid in group if sid in ready]
                if not ids:
                    continue
                if kind in DRIVER_KINDS:
                    for sid in ids:
                        t.finish(execute_stage(root, sid, plan_id=plan_id, threads=threads))
                    continue
                ex = self._executor(plan, store, kind, threads)
                n = len(ids)
                jobs = ex.map_array(_stage_job, [root] * n, ids, [plan_id] * n, [threads] * n)
                for sid, job in zip(ids, jobs):
                    reporter.started(sid, f"job {job.job_id}")
                waiting.update(zip(ids, jobs))
            while waiting:
                for sid, job in list(waiting.items()):
                    if job.done():
                        del waiting[sid]
                        try:
                            t.finish(StageOutcome(**job.result()))
                        except Exception as e:  # noqa: BLE001 -- the job died (time limit, memory, node)
                            t.finish(_lost(store, plan, sid, e))
                if waiting:
                    time.sleep(self.poll)
        t.settle()                                # report stages left blocked by failures


__all__ = ["BACKENDS", "LocalBackend", "RayBackend", "SlurmBackend", "make_backend"]
