"""The Slurm backend: waves of submitit job arrays, one array per stage kind in a wave.

Waves follow dependency depth (a wave waits for the previous one); each array has its
kind's resources and the Slurm parameters of the grid file's `slurm:` section.
`cluster="local"` uses submitit's local executor (subprocesses; for tests).

When a job has ended is decided from the results directory and the scheduler together,
never from accounting alone (many small clusters run without `sacct`):
- its result file exists (submitit writes it before the job's process exits): the outcome;
- `squeue` no longer lists it and, `GRACE_S` later, still no result file: the job is lost
  (killed, out of memory, time limit, node failure) and the stage is started again, up to
  `max_attempts` (`Tracker.lost`); `scontrol`/`sacct` add its state and exit code to the
  message where they can;
- `squeue` itself fails for `poll_timeout` seconds: the jobs it cannot tell about are named
  and treated as lost, so the driver never waits forever.
Each warning (squeue or sacct failing) is printed once per run.
"""

from __future__ import annotations

import getpass
import logging
import math
import subprocess
import time
from pathlib import Path

from editdecay.grid.backends import ClusterError
from editdecay.grid.backends.tracker import DRIVER_KINDS, Tracker, threads_of
from editdecay.grid.execute import Progress, StageOutcome, execute_stage
from editdecay.grid.plan import Plan
from editdecay.grid.store import GridStore
from editdecay.grid.store.marker import ResultsNotVisible, check_marker, write_marker

log = logging.getLogger(__name__)

GRACE_S = 10.0              # a job gone from squeue gets this long for its result file to show (shared filesystems)
POLL_TIMEOUT_S = 600.0      # squeue failing this long: the jobs it cannot tell about are treated as lost
COMMAND_TIMEOUT_S = 60      # one squeue / scontrol / sacct call


def waves(plan: Plan, stage_ids: list[str]) -> list[dict[str, list[str]]]:
    """Stages grouped by dependency depth (a wave needs only earlier waves), then by kind within a wave (one job
    array per kind: one resource request)."""
    depth: dict[str, int] = {}
    for sid in plan.stages:                      # plan order: dependencies first
        depth[sid] = 1 + max((depth[d] for d in plan.stages[sid].deps), default=-1)
    out: dict[int, dict[str, list[str]]] = {}
    for sid in stage_ids:
        out.setdefault(depth[sid], {}).setdefault(plan.stages[sid].kind, []).append(sid)
    return [out[k] for k in sorted(out)]


def slurm_stage(root: str, stage_id: str, plan_id: str | None, threads: int | None, token: str) -> dict:
    """What a Slurm array task runs (module-level so submitit pickles it by reference)."""
    check_marker(root, token)
    return execute_stage(root, stage_id, plan_id=plan_id, wait=True, threads=threads).to_dict()


class _Once:
    """Log each warning once per run (a scheduler that fails keeps failing at every poll)."""

    def __init__(self):
        self.said: set[str] = set()

    def warn(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            log.warning("%s", message)


class _Scheduler:
    """What the Slurm commands say about this user's jobs; None where a command cannot be run or fails."""

    def __init__(self, once: _Once):
        self.once = once
        self.sacct_works: bool | None = None

    def _run(self, cmd: list[str]) -> str | None:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.once.warn(cmd[0], f"`{' '.join(cmd)}` could not run ({type(e).__name__}: {e})")
            return None
        if p.returncode != 0:
            self.once.warn(cmd[0], f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()[:500]}")
            return None
        return p.stdout

    def queued(self) -> dict[str, str] | None:
        """{job id (array tasks as <id>_<index>): state} of every job of this user still in the queue."""
        out = self._run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser()])
        if out is None:
            return None
        return dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)

    def why_ended(self, job_id: str) -> str:
        """State and exit code of an ended job, from scontrol (recent jobs) and sacct (with accounting)."""
        parts = []
        out = self._run(["scontrol", "show", "job", "-o", job_id])
        if out:
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            parts.append(f"JobState={fields.get('JobState')} ExitCode={fields.get('ExitCode')}")
        if self.sacct_works is not False:
            out = self._run(["sacct", "-n", "-P", "-X", "-o", "State,ExitCode", "-j", job_id])
            self.sacct_works = out is not None
            if out and out.strip():
                parts.append(f"sacct: {out.strip().splitlines()[0]}")
        return "; ".join(parts) or "no state known (scontrol and sacct said nothing)"


class SlurmBackend:
    """submitit job arrays. `cluster`: auto (Slurm when available, else local) | slurm | local."""

    name = "slurm"

    def __init__(self, cluster: str = "auto", poll: float = 5.0, grace: float = GRACE_S,
                 poll_timeout: float = POLL_TIMEOUT_S):
        if cluster not in ("auto", "slurm", "local"):
            from editdecay.core.errors import ConfigError

            raise ConfigError(f"slurm cluster {cluster!r}: use auto, slurm or local (submitit's local executor)")
        self.cluster, self.poll, self.grace, self.poll_timeout = cluster, poll, grace, poll_timeout

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

    def _submit(self, ex, kind: str, ids: list[str], root: str, plan_id, threads, token) -> list:
        """One job array; a refused submission becomes a ClusterError naming the command and its stderr."""
        import submitit

        n = len(ids)
        try:
            return ex.map_array(slurm_stage, [root] * n, ids, [plan_id] * n, [threads] * n, [token] * n)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
            cause = e.__cause__
            command = " ".join(map(str, cause.cmd)) if isinstance(cause, subprocess.CalledProcessError) else "sbatch"
            code = f" exited {cause.returncode}" if isinstance(cause, subprocess.CalledProcessError) else " failed"
            raise ClusterError(f"Slurm refused the {kind} job array ({n} stage(s)): `{command}`{code}: "
                               f"{str(e).strip()[:2000] or type(e).__name__}") from None

    def run(self, plan: Plan, store: GridStore, stage_ids: list[str], reporter: Progress, *,
            plan_id: str | None = None, threads: int | None = None, progress: bool = False) -> None:
        threads = threads_of(plan, threads)
        t = Tracker(plan, store, stage_ids, reporter)
        root = str(Path(store.root).resolve())
        token = write_marker(root)
        once = _Once()
        sched = _Scheduler(once)
        for wave in waves(plan, stage_ids):
            todo = {sid for group in wave.values() for sid in group}
            waiting: dict[str, object] = {}             # stage id -> submitit job
            while True:
                ready = set(t.settle())
                for kind, group in wave.items():        # every array of a wave is submitted before waiting
                    ids = [sid for sid in group if sid in ready and sid in todo and sid not in waiting]
                    if not ids:
                        continue
                    if kind in DRIVER_KINDS:
                        for sid in ids:
                            t.finish(execute_stage(root, sid, plan_id=plan_id, threads=threads))
                        continue
                    ex = self._executor(plan, store, kind, threads)
                    jobs = self._submit(ex, kind, ids, root, plan_id, threads, token)
                    for sid, job in zip(ids, jobs):
                        reporter.started(sid, f"job {job.job_id}")
                    waiting.update(zip(ids, jobs))
                todo &= set(t.pending)
                if not waiting:
                    break
                ended = self._wait(waiting, sched, store, plan, t)
                for sid, lost in ended.items():
                    if lost is not None and t.lost(sid, lost):
                        continue            # started again at the top of the loop
                    todo.discard(sid)
        t.settle()                                # report stages left blocked by failures

    def _wait(self, waiting: dict, sched: _Scheduler, store: GridStore, plan: Plan, t: Tracker) -> dict:
        """Poll until at least one job has ended; returns {stage id: None (outcome reported) or why it was lost}."""
        gone_since: dict[str, float] = {}
        blind_since: float | None = None
        while True:
            queue = None if self._local(waiting) else sched.queued()
            now = time.monotonic()
            blind_since = (blind_since or now) if queue is None else None
            ended: dict = {}
            for sid, job in list(waiting.items()):
                if job.paths.result_pickle.exists():
                    ended[sid] = self._outcome(job, sid, plan, t)
                elif self._local(waiting):
                    if job.done():                      # the local executor's process has exited
                        ended[sid] = f"job {job.job_id} ended without a result (its process was killed)"
                elif queue is not None and str(job.job_id) not in queue:
                    first = gone_since.setdefault(sid, now)
                    if now - first >= self.grace:
                        ended[sid] = (f"Slurm job {job.job_id} ended without a result ({sched.why_ended(job.job_id)});"
                                      f" its log: {job.paths.stderr}")
                elif queue is None and now - blind_since >= self.poll_timeout:
                    ended[sid] = (f"Slurm job {job.job_id}: squeue failed for {self.poll_timeout:.0f} s, so its state "
                                  f"is unknown; treated as lost (`scancel {job.job_id}` if it still runs)")
            for sid in ended:
                del waiting[sid]
            if ended:
                return ended
            time.sleep(self.poll)

    def _local(self, waiting: dict) -> bool:
        return any(type(job).__name__ == "LocalJob" for job in waiting.values())

    @staticmethod
    def _outcome(job, sid: str, plan: Plan, t: Tracker):
        """Report the outcome in a finished job's result file; returns None, or why the job is lost."""
        try:
            t.finish(StageOutcome(**job.result()))
            return None
        except Exception as e:  # noqa: BLE001 -- execute_stage itself raised in the job (not the stage's code)
            said = [line.split("ResultsNotVisible:", 1)[1].strip() for line in str(e).splitlines()
                    if "ResultsNotVisible:" in line]
            if said:                                # the job's own check: no use submitting it again
                raise ResultsNotVisible(said[-1]) from None
            return e


__all__ = ["SlurmBackend", "slurm_stage", "waves"]
