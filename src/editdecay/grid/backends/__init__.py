"""Where stages run: in this process (local), as Ray tasks, or as Slurm jobs (submitit).

Every backend computes a stage the same way, with `execute.execute_stage(root, stage_id)`
in some process that sees the grid directory; locks and atomic publication live
there, so backends only decide *where* and *when*. A stage is started once all its
dependencies are finished; a stage whose dependency failed is reported `blocked`
and not started. Cell stages only assemble JSON, so the Ray and Slurm drivers run
them themselves instead of shipping them to a worker.

The same semantics on every backend (`tracker.py`):
- an exception raised by the stage's own code is a recorded failure (`execute_stage`
  records it): the cell is failed until `--retry-failed`;
- a stage whose process is killed from outside (kill -9, out of memory, a time limit,
  a lost node or raylet) counts as an attempt and is computed again -- by the same run
  on Ray and Slurm (the driver resubmits it), by the next run locally (the driver was
  the process that died) -- until `shared.max_attempts` starts, after which it is
  recorded as failed; a finished stage is never computed again.

- local: one stage after another, in plan order (`local.py`).
- ray:   one Ray task per stage, with the resources of `resources.<kind>` (`ray_tasks.py`).
- slurm: waves of job arrays by dependency depth (`slurm_jobs.py`).
"""

from __future__ import annotations

from editdecay.core.config import check_choice
from editdecay.core.errors import EditDecayError

BACKENDS = ("local", "ray", "slurm")


class ClusterError(EditDecayError):
    """The cluster cannot be reached or refuses the work: the message names the address or command and the cause."""


def make_backend(name: str, **options):
    """The backend `name` (one of BACKENDS) with its options. Raises ConfigError for an unknown name."""
    check_choice("backend", name, BACKENDS)
    if name == "local":
        from editdecay.grid.backends.local import LocalBackend as cls
    elif name == "ray":
        from editdecay.grid.backends.ray_tasks import RayBackend as cls
    else:
        from editdecay.grid.backends.slurm_jobs import SlurmBackend as cls
    return cls(**options)


__all__ = ["BACKENDS", "ClusterError", "make_backend"]
