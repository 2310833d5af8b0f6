"""The grid on real engines under failure: a one-node Slurm cluster without and with accounting, a two-node Ray
cluster, and the local backend. Started here by the fixtures below (cluster_engines.py; seconds each).

In every test a stage's process is killed from outside mid-stage (after its start is counted on disk), or a
Ray node's raylet is killed under it, and the run must: end by itself; complete every cell (the same run on
Ray and Slurm, the next run locally, where the driver itself was killed); compute every stage exactly once;
start the killed stage at most `max_attempts` times; leave no holder record of a dead process behind.
The figures of each run (stage counts from the stage records, seconds) are printed.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from support.cluster_engines import (
    RayCluster,
    finish_driver,
    make_world,
    parent_of,
    start_driver,
    start_slurm,
    stage_counts,
    tempfile_dir,
    wait_counted,
    write_engine_grid,
)

pytestmark = pytest.mark.processes

from editdecay.grid.plan import build_plan
from editdecay.grid.spec import load_grid
from editdecay.grid.store import GridStore

RUN_TIMEOUT_S = 300          # a run that has not ended by then hangs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("engines"))


def _slurm(accounting: bool):
    cluster = start_slurm(accounting=accounting)
    print(f"\nslurm {'with' if accounting else 'without'} accounting: started in {cluster.seconds} s")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_plain():
    """One-node Slurm without accounting (no sacct): many small clusters run so."""
    yield from _slurm(accounting=False)


@pytest.fixture(scope="module")
def slurm_accounting():
    """One-node Slurm with accounting (slurmdbd on a MariaDB of its own)."""
    yield from _slurm(accounting=True)


@pytest.fixture(scope="module")
def ray_cluster():
    from pathlib import Path

    cluster = RayCluster(Path(tempfile_dir("edray")))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    print(f"\nray: two nodes started in {cluster.seconds} s")
    yield cluster
    cluster.stop()


def check_recovered(store, plan, killed: dict, summary: dict | None, max_attempts: int, label: str,
                    seconds: float) -> dict:
    """The acceptance of a run in which one stage's process was killed: figures, or an AssertionError."""
    counts = stage_counts(store)
    sid = killed["stage"]
    figures = {"engine": label, "killed": killed["what"], "kind": plan.stages[sid].kind, "seconds": round(seconds, 1),
               "cells": summary and summary["cells"], "stage_counts": {plan.stages[s].kind + ":" + s[-6:]: c
                                                                      for s, c in counts.items()}}
    print("\nengine failure:", json.dumps(figures))
    assert summary is not None and summary["cells"] == {"done": len(plan.cells), "running": 0, "failed": 0,
                                                        "pending": 0}, summary
    assert set(counts) == set(plan.stages)
    assert all(c["computed"] == 1 for c in counts.values()), counts          # nothing finished computed again
    # killed: an attempt that died (counted on disk); lost: the driver saw its process end without an outcome (a
    # worker whose raylet was killed may still finish its stage: lost, yet not killed)
    assert max(counts[sid]["killed"], counts[sid]["lost"]) == 1, counts[sid]
    assert counts[sid]["attempts"] <= max_attempts and store.failure(sid) is None
    assert all(c["killed"] == 0 for s, c in counts.items() if s != sid)
    assert store.attempts(sid) == []                                         # the count ends with the attempt
    assert not list((store.root / "stages").glob("*.running.json"))         # no dead holder's record left
    for cell in plan.cells:
        assert store.read_result(cell.id)["cell"]["id"] == cell.id
    return figures


def _grid(world, tmp_path, name="engines", **kw):
    grid = write_engine_grid(world, tmp_path / "grid.yaml", name, **kw)
    return grid, build_plan(load_grid(grid))


@pytest.mark.parametrize("cluster", ["slurm_plain", "slurm_accounting"])
def test_slurm_job_killed_mid_stage_is_computed_again_by_the_same_run(world, cluster, request, tmp_path):
    slurm = request.getfixturevalue(cluster)
    grid, plan = _grid(world, tmp_path)
    out = tmp_path / "out"
    store = GridStore(out)
    t0 = time.perf_counter()
    driver = start_driver(grid, out, "slurm", slurm.env, "--slurm-cluster", "slurm")
    sid, pid = wait_counted(store, plan, "finetune")
    os.kill(pid, signal.SIGKILL)
    summary, log = finish_driver(driver, out, RUN_TIMEOUT_S)
    assert driver.returncode == 0, log[-3000:]
    assert "ended without a result" in log and "lost 1 of at most 3" in log
    if not slurm.accounting:
        assert log.count("accounting storage is disabled") <= 1                  # said once, not every poll
    check_recovered(store, plan, {"stage": sid, "what": "job's python process (kill -9)"}, summary, 3,
                    f"slurm {'with' if slurm.accounting else 'without'} accounting", time.perf_counter() - t0)


def test_slurm_stage_killed_max_attempts_times_is_recorded_failed_and_the_run_ends(world, slurm_plain, tmp_path):
    slurm = slurm_plain
    grid, plan = _grid(world, tmp_path, max_attempts=2)
    out = tmp_path / "out"
    store = GridStore(out)
    driver = start_driver(grid, out, "slurm", slurm.env, "--slurm-cluster", "slurm")
    sid, pid = wait_counted(store, plan, "finetune")
    os.kill(pid, signal.SIGKILL)
    _, pid2 = wait_counted(store, plan, sid, where=lambda p: p != pid)
    os.kill(pid2, signal.SIGKILL)
    summary, log = finish_driver(driver, out, RUN_TIMEOUT_S)
    assert driver.returncode == 1 and summary["cells"]["failed"] == 1 and summary["cells"]["done"] == 1, log[-3000:]
    failure = store.failure(sid)
    assert failure["error"].startswith(("Lost", "KilledRepeatedly")) and "max_attempts is 2" in failure["error"]
    assert stage_counts(store)[sid]["lost"] == 2 and stage_counts(store)[sid]["computed"] == 0     # 2 starts, both lost
    # (--retry-failed then clears the record and runs it: test_grid_faults, the same on every backend)


def test_ray_worker_killed_mid_stage_is_computed_again_by_the_same_run(world, ray_cluster, tmp_path):
    grid, plan = _grid(world, tmp_path)
    out = tmp_path / "out"
    store = GridStore(out)
    t0 = time.perf_counter()
    driver = start_driver(grid, out, "ray", ray_cluster.env, "--address", ray_cluster.address)
    sid, pid = wait_counted(store, plan, "finetune")
    os.kill(pid, signal.SIGKILL)
    summary, log = finish_driver(driver, out, RUN_TIMEOUT_S)
    assert driver.returncode == 0 and "WorkerCrashedError" in log, log[-3000:]
    check_recovered(store, plan, {"stage": sid, "what": "ray worker (kill -9)"}, summary, 3, "ray, 2 nodes",
                    time.perf_counter() - t0)


def test_ray_second_raylet_killed_mid_stage_the_stage_completes_on_the_head(world, ray_cluster, tmp_path):
    grid, plan = _grid(world, tmp_path)
    out = tmp_path / "out"
    store = GridStore(out)
    t0 = time.perf_counter()
    raylet = ray_cluster.raylet("node2")
    driver = start_driver(grid, out, "ray", ray_cluster.env, "--address", ray_cluster.address)
    sid, _ = wait_counted(store, plan, "finetune", where=lambda pid: parent_of(pid) == raylet)
    os.kill(raylet, signal.SIGKILL)
    summary, log = finish_driver(driver, out, RUN_TIMEOUT_S)
    assert driver.returncode == 0, log[-3000:]
    check_recovered(store, plan, {"stage": sid, "what": "raylet of the second node (kill -9)"}, summary, 3,
                    "ray, 2 nodes", time.perf_counter() - t0)


def test_local_runner_killed_mid_stage_the_next_run_completes(world, tmp_path):
    grid, plan = _grid(world, tmp_path)
    out = tmp_path / "out"
    store = GridStore(out)
    t0 = time.perf_counter()
    driver = start_driver(grid, out, "local", dict(os.environ))
    sid, pid = wait_counted(store, plan, "finetune")
    assert pid == driver.pid                                                # locally the driver computes
    os.kill(pid, signal.SIGKILL)
    driver.wait(timeout=60)
    summary, log = finish_driver(start_driver(grid, out, "local", dict(os.environ)), out, RUN_TIMEOUT_S)
    check_recovered(store, plan, {"stage": sid, "what": "the local runner (kill -9)"}, summary, 3, "local",
                    time.perf_counter() - t0)


# --------------------------------------------------------------------------- clear errors


def test_a_worker_that_does_not_see_the_results_directory_stops_the_run_with_its_name(world, ray_cluster, tmp_path,
                                                                                      monkeypatch):
    """The driver's marker is not where the worker looks (as when --out is on a disk of the driver's node only)."""
    from editdecay.grid.backends import ray_tasks
    from editdecay.grid.runner import run_grid
    from editdecay.grid.store.marker import ResultsNotVisible

    grid, plan = _grid(world, tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(ray_tasks, "write_marker", lambda root: "a-token-written-elsewhere")
    out = tmp_path / "out"
    with pytest.raises(ResultsNotVisible) as e:
        run_grid(plan, out, backend="ray", address=ray_cluster.address, threads=1)
    msg = " ".join(str(e.value).split())
    assert str(out.resolve()) in msg and "has no marker file" in msg and "every node mounts" in msg
    assert not any(GridStore(out).is_done(s) for s in plan.stages)           # nothing computed out of sight


def test_ray_connection_failures_name_the_address_and_the_likely_cause(world, ray_cluster, tmp_path):
    from support.cluster_engines import free_ports

    grid, _ = _grid(world, tmp_path)
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_MODE"}
    env["RAY_gcs_server_port_wait_time_s"] = "2"          # Ray's own retries: 20 s by default
    driver = start_driver(grid, tmp_path / "auth", "ray", env, "--address", ray_cluster.address)
    _, log = finish_driver(driver, tmp_path / "auth", 120)
    msg = " ".join(log.split())
    assert driver.returncode == 2 and "Traceback" not in log, log[-3000:]
    assert f"cannot connect to the Ray cluster at {ray_cluster.address}" in msg and "RAY_AUTH_MODE=token" in msg
    (port,) = free_ports(1)
    driver = start_driver(grid, tmp_path / "port", "ray", env, "--address", f"127.0.0.1:{port}")
    _, log = finish_driver(driver, tmp_path / "port", 120)
    assert driver.returncode == 2 and f"nothing accepts connections at 127.0.0.1:{port}" in " ".join(log.split())


def test_a_refused_slurm_submission_names_the_command_and_its_stderr(world, slurm_plain, tmp_path, monkeypatch):
    import yaml

    from editdecay.grid.backends import ClusterError
    from editdecay.grid.runner import run_grid

    slurm = slurm_plain
    grid = write_engine_grid(world, tmp_path / "grid.yaml", "engines")
    d = yaml.safe_load(grid.read_text())
    d["slurm"]["partition"] = "no-such-partition"
    grid.write_text(yaml.safe_dump(d))
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    with pytest.raises(ClusterError) as e:
        run_grid(build_plan(load_grid(grid)), tmp_path / "out", backend="slurm", cluster="slurm", threads=1)
    msg = str(e.value)
    assert "`sbatch " in msg and "exited 1" in msg and "invalid partition" in msg.lower(), msg
