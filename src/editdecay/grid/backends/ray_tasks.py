"""The Ray backend: one Ray task per stage, with the CPUs/GPUs/memory of `resources.<kind>` in the grid file.

The driver submits a stage as soon as its dependencies are done and gathers the outcomes
(`ray.wait`). Ray does not retry a task itself (`max_retries=0`): a task whose worker,
raylet or node died is *lost* and the driver starts it again (`Tracker.lost`), so a killed
stage counts against `max_attempts` the same way on every backend. `address=None` starts a
local cluster in this process.

Before anything is shipped the driver writes its marker into the results directory
(`store.marker`); every task checks it first, so a worker that does not see that directory
stops the run with a message instead of computing into a directory nobody reads.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from editdecay.grid.backends import ClusterError
from editdecay.grid.backends.tracker import DRIVER_KINDS, Tracker, threads_of
from editdecay.grid.execute import Progress, execute_stage
from editdecay.grid.plan import Plan
from editdecay.grid.store import GridStore
from editdecay.grid.store.marker import ResultsNotVisible, check_marker, write_marker

TOKEN_FILE = Path.home() / ".ray" / "auth_token"    # where `ray start` and ray.init() keep the cluster token


def ray_stage(root: str, stage_id: str, plan_id: str | None, threads: int | None, token: str) -> object:
    """What a Ray task runs: check that this worker sees the driver's results directory, then compute."""
    check_marker(root, token)
    return execute_stage(root, stage_id, plan_id=plan_id, wait=True, threads=threads)


def _ray_resources(plan: Plan, kind: str) -> dict:
    r = plan.runtime["resources"].get(kind) or {"cpus": 1, "gpus": 0, "memory_gb": None}
    out = {"num_cpus": r["cpus"], "num_gpus": r["gpus"]}
    if r.get("memory_gb"):
        out["memory"] = int(r["memory_gb"] * 2**30)
    return out


def _reachable(address: str, timeout: float = 3.0) -> bool | None:
    """Whether something accepts TCP connections at host:port (None: not a host:port address)."""
    try:
        parts = urlsplit(f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:          # a port that is not a number
        return None
    if not host or port is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def connection_error(address: str, error: BaseException | None) -> ClusterError:
    """A ClusterError naming `address` and the likely cause of a failed connection."""
    mode = os.environ.get("RAY_AUTH_MODE")
    has_token = TOKEN_FILE.is_file() or bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if _reachable(address) is False:
        cause = (f"nothing accepts connections at {address}: no Ray cluster runs there, or its port is another "
                 f"(`ray start --head --port PORT` prints the address to use; `ray status --address ADDRESS` checks it)")
    elif mode is None and has_token:
        cause = (f"most likely token authentication: {TOKEN_FILE} exists, so a head node started with `ray start` "
                 f"without RAY_AUTH_MODE turned token authentication on by itself, and this driver (RAY_AUTH_MODE "
                 f"unset) connects without the token; set RAY_AUTH_MODE=token for `editdecay grid run` (or start "
                 f"every node of the cluster with RAY_AUTH_MODE=disabled)")
    elif mode == "token":
        cause = ("a Ray cluster answers there but refused this driver: its token differs from this driver's "
                 f"({'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else TOKEN_FILE}), or it runs another "
                 "Ray version")
    else:
        cause = ("a Ray cluster answers there but refused this driver: it may require token authentication "
                 "(RAY_AUTH_MODE=token with its token) or run another Ray version")
    detail = f" ({type(error).__name__}: {error})" if error is not None else ""
    return ClusterError(f"cannot connect to the Ray cluster at {address}: {cause}{detail}")


class RayBackend:
    """Ray core: one task per stage. Starts a local cluster unless `address` (or the grid's ray.address) is given."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 poll: float = 1.0):
        self.address, self.num_cpus, self.num_gpus, self.poll = address, num_cpus, num_gpus, poll

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        import ray

        threads = threads_of(plan, threads)
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
                if address != "auto" and _reachable(address) is False:       # fail at once, not after retries
                    raise connection_error(address, None)
                try:
                    ray.init(address=address, **kw)
                except ConnectionError as e:
                    raise connection_error(address, e) from None
            else:
                ray.init(num_cpus=self.num_cpus, num_gpus=self.num_gpus, **kw)
        try:
            self._loop(plan, store, stage_ids, reporter, plan_id, threads, ray)
        finally:
            if started_here:
                ray.shutdown()

    def _loop(self, plan, store, stage_ids, reporter, plan_id, threads, ray) -> None:
        task = ray.remote(ray_stage)
        t = Tracker(plan, store, stage_ids, reporter)
        running: dict = {}                     # ObjectRef -> stage id
        submitted: set[str] = set()            # stages with a task in flight
        root = str(Path(store.root).resolve())
        token = write_marker(root)
        while t.pending:
            for sid in t.settle():
                if sid in submitted:
                    continue
                kind = plan.stages[sid].kind
                if kind in DRIVER_KINDS:
                    t.finish(execute_stage(root, sid, plan_id=plan_id, threads=threads))
                    continue
                ref = task.options(**_ray_resources(plan, kind), name=f"{kind}:{sid}", max_retries=0,
                                   retry_exceptions=False).remote(root, sid, plan_id, threads, token)
                running[ref] = sid
                submitted.add(sid)
                reporter.started(sid, "ray task")
            if not running:
                if t.pending and not t.settle():
                    time.sleep(0.5)   # dependencies computed by another runner
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.poll)
            for ref in done:
                sid = running.pop(ref)
                submitted.discard(sid)
                try:
                    outcome = ray.get(ref)
                except ResultsNotVisible as e:       # the worker's own check: no use starting it anywhere again
                    raise ResultsNotVisible(str(getattr(e, "cause", None) or e)) from None
                except Exception as e:  # noqa: BLE001 -- the worker, its raylet or node died: lost, not failed
                    t.lost(sid, e)
                    continue
                t.finish(outcome)


__all__ = ["RayBackend", "connection_error", "ray_stage"]
