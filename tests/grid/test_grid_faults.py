"""The grid runner under faults, one test per kind of fault:

- a worker killed with SIGKILL in each stage kind (statistics, target values, edit, fine-tune, evaluate) at a
  random point,
  then resumed: no finished stage is lost or computed again; a stage killed again and again (the OOM killer)
  ends as a recorded failure after `max_attempts` starts instead of being retried forever;
- every record beside a stage (`.failed.json`, `.attempts.json`) is written and removed under its lock;
- a lock whose holder hangs: `grid status` shows it stale with pid/host/time, `grid unlock` clears it and a
  waiting runner goes on;
- two different grids in one results directory are refused;
- `EditPatch.save` from two processes into one directory: unique temporary names, one consistent patch;
- `run_finetune` publishes `adapter/` and the weights atomically and removes a stale `adapter/`.

The grid is one cell (MEMIT, 4 edits, LoRA on the edited layers) of a tiny random Llama: 8 stages
(stats, targets, patch, 2 x evaluate, 2 x finetune, cell). Workers are `run_grid` in child processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from support.grids import computed_counts, grid_dict, make_corpus, write_grid
from support.models import save_tiny_model
from typer.testing import CliRunner

from editdecay.core.errors import ConfigError
from editdecay.grid.execute import execute_stage
from editdecay.grid.plan import build_plan
from editdecay.grid.runner import reset_failures, run_grid
from editdecay.grid.spec import grid_from_dict, load_grid
from editdecay.grid.store import GridStore

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SEED = int(os.environ.get("EDITDECAY_FAULT_SEED", "12"))   # of the random kill points (printed with the figures)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    w = {"root": root, "model": root / "tiny-llama", "corpus": root / "corpus.txt", "cache": root / "cache"}
    save_tiny_model(w["model"])
    make_corpus(w["corpus"])
    d = grid_dict(w, n_edits=[4])
    d["recipes"][0]["layers"] = ["edited"]
    d["shared"]["max_attempts"] = 3
    w["grid"] = write_grid(root / "one.yaml", d)
    return w


def _work(grid: str, out: str) -> None:
    import logging

    logging.disable(logging.WARNING)
    run_grid(build_plan(load_grid(Path(grid))), out, threads=1)


def start_worker(grid: Path, out: Path):
    """A grid worker (`run_grid`, local backend) in a child process forked from this one: torch and transformers
    are imported already, so it starts computing at once (a `grid run` subprocess spends seconds importing)."""
    import multiprocessing

    worker = multiprocessing.get_context("fork").Process(target=_work, args=(str(grid), str(out)), daemon=True)
    worker.start()
    return worker


def wait_running(store: GridStore, plan, worker, want, timeout: float = 90) -> str:
    """The stage (kind `want`, or the stage id `want`) that `worker` holds the lock of, once it does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert worker.is_alive(), "the worker ended before the stage started"
        for sid, st in plan.stages.items():
            if want in (st.kind, sid) and not store.is_done(sid) and (store.running_info(sid) or {}).get(
                    "pid") == worker.pid:
                return sid
        time.sleep(0.01)
    raise AssertionError(f"no {want} stage started within {timeout} s")


def kill_in(world, store, plan, want, rng, longest: float) -> dict:
    """Start a worker, SIGKILL it at a uniformly random point of the first `want` stage it computes."""
    worker = start_worker(world["grid"], store.root)
    try:
        sid = wait_running(store, plan, worker, want)
        delay = rng.uniform(0.0, longest)
        time.sleep(delay)
        done = {s for s in plan.stages if store.is_done(s)}
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.join(timeout=30)
    assert worker.exitcode == -signal.SIGKILL
    return {"kind": plan.stages[sid].kind, "stage": sid, "delay_s": round(delay, 3), "pid": worker.pid,
            "in_stage": not store.is_done(sid), "done_at_kill": done}


@pytest.mark.processes
def test_sigkill_in_every_stage_kind_then_resume_and_repeated_kills_end_as_a_failure(world, tmp_path):
    plan = build_plan(load_grid(world["grid"]))
    assert sorted(st.kind for st in plan.stages.values()) == [
        "cell", "evaluate", "evaluate", "finetune", "finetune", "patch", "stats", "targets"]
    rng = random.Random(SEED)
    # about a stage's duration here
    longest = {"stats": 0.6, "targets": 1.0, "patch": 1.0, "evaluate": 0.6, "finetune": 1.0}
    for attempt in range(4):
        # A kill that comes after its stage finished cannot be repeated on the same results directory (a
        # finished stage is never computed again), so the whole sequence starts over in a fresh directory,
        # with earlier kill points.
        store = GridStore(tmp_path / f"out{attempt}")
        kills = []
        for kind in ("stats", "targets", "patch", "evaluate", "finetune"):
            kills.append(kill_in(world, store, plan, kind, rng, longest[kind]))
            if not kills[-1]["in_stage"]:
                break
            assert not list(store.root.glob("results/*.json"))
        if all(k["in_stage"] for k in kills):
            break
        longest = {k: v / 2 for k, v in longest.items()}
    assert len(kills) == 5 and all(k["in_stage"] for k in kills), f"no kill sequence landed inside its stages: {kills}"
    # The same fine-tuning stage killed until its starts reach max_attempts (3): the OOM killer's pattern.
    oom = kills[-1]["stage"]
    while len(store.attempts(oom)) < 3:
        k = kill_in(world, store, plan, oom, rng, 0.3)
        assert k["in_stage"], k
        kills.append(k)
    assert {a["pid"] for a in store.attempts(oom)} <= {k["pid"] for k in kills}      # counted on disk, per start

    # Resume: the stage killed 3 times is not started a 4th time but recorded as failed; the rest finishes.
    summary = run_grid(plan, store.root, threads=1)
    mine = [e for e in store.events() if e["pid"] == os.getpid()]
    assert not any(e["stage"] == oom and e["event"] == "started" for e in mine)
    failure = store.failure(oom)
    assert failure and failure["error"].startswith("KilledRepeatedly") and failure["attempts"] == 3
    assert "max_attempts is 3" in failure["error"] and "--retry-failed" in failure["error"]
    (cell,) = plan.cells
    state = store.cell_states(plan)[0]
    assert summary.cells["failed"] == 1 and state["state"] == "failed" and state["failed_stage"] == oom
    assert summary.failed[0]["error"].startswith("KilledRepeatedly")
    assert run_grid(plan, store.root, threads=1).stages["computed"] == 0          # stays failed, not retried

    # --retry-failed (after "more memory"): the stage runs again, the cell completes.
    retry = run_grid(plan, store.root, threads=1, retry_failed=True)
    assert retry.cells["done"] == 1 and store.attempts(oom) == [] and store.failure(oom) is None
    result = store.read_result(cell.id)
    assert result["metrics"]["M_ef"]["n"] == 4 and len(result["requests"]) == 4

    # 0 results lost, 0 finished stages computed again, no half-written output left.
    counts = computed_counts(store)
    recomputed = sorted(s for s, n in counts.items() if n > 1)
    ever_done = set().union(*(k["done_at_kill"] for k in kills))
    lost = sorted(s for s in ever_done if not store.is_done(s))
    assert set(counts) == set(plan.stages) and recomputed == [] and lost == []
    assert not list((store.root / "stages").glob(".*.tmp"))
    killed_in = {k["kind"] for k in kills if k["in_stage"]}
    assert killed_in == {"stats", "targets", "patch", "evaluate", "finetune"}
    figures = {"seed": SEED, "workers_killed": len(kills), "kills": [
        {key: k[key] for key in ("kind", "stage", "delay_s", "in_stage")} for k in kills],
        "finished_stages_lost": len(lost), "finished_stages_recomputed": len(recomputed),
        "stages_computed": len(counts), "oom_stage_attempts": failure["attempts"]}
    print("\nfault injection:", json.dumps(figures))


# --------------------------------------------------------------------------- records under the stage lock

HOLD = textwrap.dedent("""
    import sys, time
    from editdecay.grid.store import GridStore
    store = GridStore(sys.argv[1])
    lease = store.take(sys.argv[2])         # the lock and its holder record, as a worker takes them
    print("holding", flush=True)
    time.sleep(600)
""")


def small_plan(name: str = "faults", n_edits=(0, 4)):
    return build_plan(grid_from_dict({
        "name": name, "models": ["smollm2-135m"], "editors": ["memit"], "edit_data": ["worldfacts"],
        "n_edits": list(n_edits), "recipes": [{"method": "lora", "overrides": {"max_steps": 2}}],
    }))


@pytest.fixture
def store(tmp_path):
    s = GridStore(tmp_path / "grid")
    s.write_plan(small_plan())
    return s


def hold(store: GridStore, sid: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(store.root), sid], stdout=subprocess.PIPE, text=True,
                         env=ENV)
    assert p.stdout.readline().strip() == "holding"
    return p


def stop(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def test_failure_records_change_only_under_the_stage_lock(store):
    plan = store.read_plan()
    sid = next(s for s, st in plan.stages.items() if st.kind == "stats")
    p = hold(store, sid)
    try:
        # a runner that does not hold the lock (preflight) records nothing while another computes the stage
        assert store.try_take(sid) is None
        assert store.failure(sid) is None
        # clearing (--retry-failed) waits for the holder
        (store.root / "stages" / f"{sid}.failed.json").write_text(json.dumps({"error": "old"}))
        t = threading.Thread(target=reset_failures, args=(store, [sid]))
        t.start()
        t.join(0.5)
        assert t.is_alive() and store.failure(sid) == {"error": "old"}
    finally:
        stop(p)
    t.join(30)
    assert not t.is_alive() and store.failure(sid) is None
    # a finished stage never gets a failure record (a dead worker's stage that another runner finished)
    with store.take(sid) as lease:
        with lease.building("stats") as tmp:
            (tmp / "x.txt").write_text("done")
        assert not lease.record_failure("stats", "WorkerCrashedError: lost", "tb")
    assert store.failure(sid) is None
    from editdecay.grid.backends.tracker import Tracker
    from editdecay.grid.execute import Progress

    lost = Tracker(plan, store, [sid], Progress(plan, 1))
    assert not lost.lost(sid, RuntimeError("worker died")) and lost.reporter.outcomes[-1].state == "computed"


def test_a_hung_local_lock_holder_is_shown_and_only_force_unlock_frees_waiting_runners(store):
    from editdecay.cli import _register, app

    _register()
    cli = CliRunner()
    plan = store.read_plan()
    sid = next(s for s, st in plan.stages.items() if st.kind == "patch")     # its statistics are not done
    p = hold(store, sid)
    try:
        os.kill(p.pid, signal.SIGSTOP)                                       # alive, hangs, holds the lock
        waiter = {}
        t = threading.Thread(target=lambda: waiter.update(out=execute_stage(store.root, sid, wait=True)))
        t.start()
        res = cli.invoke(app, ["grid", "status", str(store.root), "--json"])
        assert res.exit_code == 0, res.output
        (lock,) = json.loads(res.output)["locks"]
        assert lock["stage"] == sid and lock["pid"] == p.pid and lock["alive"] is True and not lock["stale"]
        assert lock["host"] and lock["started"]
        res = cli.invoke(app, ["grid", "unlock", str(store.root), "--stage", sid])
        assert res.exit_code == 2 and "not stale" in res.output and "--force" in res.output
        time.sleep(1.2)
        res = cli.invoke(app, ["grid", "status", str(store.root), "--stale-after", "1"])
        assert res.exit_code == 0 and "silent lock" in res.output and str(p.pid) in res.output
        running = [c for c in store.cell_states(plan, stale_after=1) if c["state"] == "running"]
        # a live process of this host is never stale: it may be slow, and breaking its lock loses its work
        assert running and not running[0]["running"][0]["stale"] and "no heartbeat" in running[0]["running"][0]["why"]
        assert t.is_alive()                                   # the other runner waits for the hung holder
        for age in ("0", "-5"):
            res = cli.invoke(app, ["grid", "unlock", str(store.root), "--stale-after", age])
            assert res.exit_code == 2 and f"--stale-after {float(age)!r}" in res.output, res.output
        res = cli.invoke(app, ["grid", "unlock", str(store.root), "--stale-after", "1"])
        assert res.exit_code == 0 and "no stale lock" in res.output and store.is_locked(sid)
        res = cli.invoke(app, ["grid", "unlock", str(store.root), "--stage", sid, "--force"])
        assert res.exit_code == 0 and f"unlocked {sid}" in res.output and str(p.pid) in res.output
        t.join(30)
        assert not t.is_alive() and waiter["out"].state == "blocked"        # it took the lock and went on
        assert not store.is_locked(sid) and store.running_info(sid) is None
        assert any(e["event"] == "unlocked" and e["stage"] == sid for e in store.events())
    finally:
        stop(p)


def test_heartbeat_refreshes_the_holder_record(store):
    sid = next(iter(store.read_plan().stages))
    lease = store.take(sid)
    try:
        first = store.running_info(sid)["heartbeat_unix"]
        with lease.heartbeat(every=0.05):
            time.sleep(0.3)
        assert store.running_info(sid)["heartbeat_unix"] > first
    finally:
        lease.release()
    assert store.running_info(sid) is None and not store.is_locked(sid)


def test_two_grids_in_one_results_directory_are_refused(store, tmp_path):
    from editdecay.cli import _register, app

    _register()
    before = store.plan_path.read_bytes()
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"name": "another-study", "models": ["smollm2-135m"], "editors": ["memit"],
                                 "edit_data": ["worldfacts"], "n_edits": [4],
                                 "recipes": [{"method": "lora", "overrides": {"max_steps": 2}}]}))
    res = CliRunner().invoke(app, ["grid", "run", str(other), "--out", str(store.root)])
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and "'faults'" in msg and "'another-study'" in msg and "another --out" in msg
    assert store.plan_path.read_bytes() == before and not (store.root / "grid.yaml").exists()
    with pytest.raises(ConfigError, match="one grid"):
        run_grid(small_plan("another-study"), store.root)
    store.write_plan(small_plan(n_edits=(4,)))            # the same grid, changed: allowed (stages are reused)


# --------------------------------------------------------------------------- atomic outputs outside the grid

SAVER = textwrap.dedent("""
    import sys, torch
    from editdecay.data import load_edit_data
    from editdecay.edit.patch import EditPatch
    seed, out = int(sys.argv[1]), sys.argv[2]
    g = torch.Generator().manual_seed(seed)
    deltas = {f"m.{i}": torch.randn(256, 256, generator=g) for i in range(4)}
    patch = EditPatch(deltas=deltas, layers=(1,), editor="memit", config={},
                      requests=load_edit_data("worldfacts", limit=1).requests, extra={"writer": seed})
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(25):
        patch.save(out)
""")


def test_two_concurrent_patch_saves_into_one_directory_leave_one_whole_patch(tmp_path):
    from editdecay.edit.patch import EditPatch

    out = tmp_path / "patch"
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(seed), str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for seed in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:                                          # both start saving at once
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    patch = EditPatch.load(out)                              # tensors and metadata of the same save
    g = torch.Generator().manual_seed(patch.extra["writer"])
    assert all(torch.equal(patch.deltas[f"m.{i}"], torch.randn(256, 256, generator=g)) for i in range(4))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".patch.lock")) == [
        "patch.json", "patch.safetensors"]


def test_finetune_publishes_outputs_atomically_and_removes_a_stale_adapter(tmp_path, monkeypatch):
    from support.models import tiny_model, tok

    from editdecay.core.models import wrap
    from editdecay.data.embedded_task import EmbeddedTask
    from editdecay.data import load_source
    from editdecay.finetune.recipe import Recipe
    from editdecay.finetune.run import Measures, run_finetune

    task = EmbeddedTask(n_train=8, n_test=4)
    source = load_source("embedded", task=task)

    def run(method, save, **kw):
        lm = wrap(tiny_model("llama"), tok(), name="tiny-llama", source="config")
        recipe = Recipe(method=method, layers=(1,), targets="mlp", max_steps=1, batch_size=4, lora_r=4,
                        template="compact", cutoff_len=48)
        return run_finetune(lm, recipe, source, tmp_path / "out", measures=Measures(task=task), save=save,
                            progress=False, **kw)

    run("lora", "adapter")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    # the same directory, overwritten by a full fine-tuning run: the old run's adapter/ must not stay behind
    run("full", "merged", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "curve.jsonl", "result.json", "train_log.jsonl", "weights.safetensors"]

    # a save that dies half-way leaves neither a half-written weights file nor a half-written adapter/
    import safetensors.torch
    from peft import PeftModel

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)               # half a file, then the disk is full
        raise OSError(28, "No space left on device")

    def dying_save_pretrained(self, directory, **kw):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "adapter_config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    for method, save, target, attr, fake in (
            ("full", "merged", "weights.safetensors", (safetensors.torch, "save_file"), dying_save_file),
            ("lora", "adapter", "adapter", (PeftModel, "save_pretrained"), dying_save_pretrained)):
        with monkeypatch.context() as m:
            m.setattr(*attr, fake)
            with pytest.raises(OSError, match="No space"):
                run(method, save, overwrite=True)
        left = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert target not in left and not [n for n in left if n.endswith(".tmp")], (method, left)


CACHE_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from editdecay.core.cache import Cache
    with Cache(Path(sys.argv[1])).lock("stats", "item"):
        print("holding", flush=True)
        time.sleep(600)
""")


def test_a_hung_cache_lock_holder_is_named_and_removing_its_lock_frees_waiters(tmp_path, monkeypatch, caplog):
    """The same kind in the cache (E1 statistics, the embedded model's conversion): a waiter names the holder
    and the way out instead of waiting silently forever."""
    import logging

    from editdecay.core import cache as cache_mod

    monkeypatch.setattr(cache_mod, "LOCK_REPORT_S", 0.2)
    p = subprocess.Popen([sys.executable, "-c", CACHE_HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         env=ENV)
    try:
        assert p.stdout.readline().strip() == "holding"
        os.kill(p.pid, signal.SIGSTOP)
        waiter = cache_mod.Cache(tmp_path).lock("stats", "item")
        got = []
        t = threading.Thread(target=lambda: got.append(waiter.__enter__()))
        with caplog.at_level(logging.WARNING, logger="editdecay.core.cache"):
            t.start()
            t.join(0.8)
            assert t.is_alive() and not got
            lock_file = tmp_path / "stats" / "item.lock"
            said = " ".join(r.getMessage() for r in caplog.records)
            assert f"pid {p.pid}" in said and str(lock_file) in said and "remove" in said
            lock_file.unlink()                                  # what the message says to do
            t.join(30)
        assert not t.is_alive() and got == [None]
        holder = json.loads((tmp_path / "stats" / "item.lock.holder.json").read_text())
        assert holder["pid"] == os.getpid()                     # the waiter holds it now
        waiter.__exit__(None, None, None)
        assert not (tmp_path / "stats" / "item.lock.holder.json").exists()
    finally:
        stop(p)
