"""The grid output directory: atomic stages, half-written detection, locks across processes, cell states."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from editdecay.grid.execute import execute_stage
from editdecay.grid.plan import build_plan
from editdecay.grid.runner import reset_failures, select
from editdecay.grid.spec import grid_from_dict
from editdecay.grid.store import GridStore


def small_plan():
    return build_plan(grid_from_dict({
        "name": "store-test", "models": ["smollm2-135m"], "editors": ["memit"], "edit_data": ["worldfacts"],
        "n_edits": [0, 4], "recipes": [{"method": ["lora", "full"], "overrides": {"max_steps": 2}}],
    }))


@pytest.fixture
def store(tmp_path):
    s = GridStore(tmp_path / "grid")
    s.write_plan(small_plan(), "name: store-test\n")
    return s


def publish(store: GridStore, sid: str, kind: str, files: dict[str, str]) -> None:
    with store.take(sid) as lease, lease.building(kind) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


HOLD = textwrap.dedent("""
    import sys, time
    from editdecay.grid.store import GridStore
    store = GridStore(sys.argv[1])
    mode, sid = sys.argv[2], sys.argv[3]
    if mode == "lock":
        lease = store.take(sid)
        print("holding", flush=True)
        time.sleep(600)
    else:   # die in the middle of writing a stage's output
        with store.take(sid) as lease, lease.building("patch") as tmp:
            (tmp / "half.txt").write_text("half")
            print("holding", flush=True)
            time.sleep(600)
""")


def hold(store: GridStore, mode: str, sid: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(store.root), mode, sid], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def kill9(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def test_a_stage_is_published_whole_with_a_manifest(store):
    sid = "patch-0000"
    assert not store.is_done(sid)
    publish(store, sid, "patch", {"patch/patch.json": "{}", "outputs.json": json.dumps({"n": 3})})
    m = store.manifest(sid)
    assert m["id"] == sid and m["kind"] == "patch" and m["outputs"] == {"n": 3}
    assert m["files"] == {"outputs.json": 8, "patch/patch.json": 2}
    assert not list((store.root / "stages").glob(".patch-0000*"))    # no temporaries left


def test_half_written_stages_are_detected_and_moved_aside(store):
    sid = "patch-0001"
    publish(store, sid, "patch", {"a.txt": "complete", "outputs.json": "{}"})
    (store.stage_dir(sid) / "a.txt").write_text("trunc")            # a file that differs from its manifest
    assert not store.is_done(sid)
    with store.take(sid) as lease:
        assert lease.discard_broken() and not store.stage_dir(sid).exists()
    publish(store, sid, "patch", {"a.txt": "complete"})
    (store.stage_dir(sid) / "stage.json").unlink()                  # no manifest: never finished
    with store.take(sid) as lease:
        assert not store.is_done(sid) and lease.discard_broken()
    d = store.stage_dir(sid)
    d.mkdir()
    (d / "stage.json").write_text(json.dumps({"format": 1, "id": "patch-other", "files": {}}))
    assert not store.is_done(sid)                                   # a manifest of another stage


def test_a_writer_killed_mid_stage_publishes_nothing(store):
    sid = "patch-0002"
    p = hold(store, "write", sid)
    kill9(p)
    assert not store.is_done(sid)
    left = list((store.root / "stages").glob(f".{sid}.*"))
    assert len(left) == 1 and (left[0] / "half.txt").exists()       # the half-written output stays hidden
    with store.take(sid) as lease:
        assert lease.clean_temporaries() == 1
    assert not list((store.root / "stages").glob(f".{sid}.*"))


def test_locks_exclude_other_processes_and_die_with_them(store):
    plan = store.read_plan()
    sid = next(s for s, st in plan.stages.items() if st.kind == "stats")
    p = hold(store, "lock", sid)
    try:
        assert store.is_locked(sid)
        t0 = time.perf_counter()
        out = execute_stage(store.root, sid, wait=False)
        assert out.state == "busy" and time.perf_counter() - t0 < 5
        cells = {c["id"]: c for c in store.cell_states(plan)}
        users = [c.id for c in plan.cells if sid in plan.closure(c.stages.values())]
        assert users and all(cells[c]["state"] == "running" for c in users)
        assert cells[users[0]]["running"][0]["stage"] == sid
    finally:
        kill9(p)
    assert not store.is_locked(sid)                                 # the kernel released it with the process


def test_a_stage_with_unfinished_dependencies_is_not_started(store):
    plan = store.read_plan()
    sid = next(s for s, st in plan.stages.items() if st.kind == "patch")
    out = execute_stage(store.root, sid)
    assert out.state == "blocked" and plan.stages[sid].deps[0] in out.error
    assert not store.is_done(sid) and store.failure(sid) is None


def test_cell_states_and_selection(store):
    plan = store.read_plan()
    assert {c["state"] for c in store.cell_states(plan)} == {"pending"}
    # a failed statistics stage fails every cell with edits, and only those
    stats = next(s for s, st in plan.stages.items() if st.kind == "stats")
    with store.take(stats) as lease:
        lease.record_failure("stats", "RuntimeError: boom", "Traceback (most recent call last):\n...boom\n")
    # a fine-tune-only cell whose result exists is done
    zero = next(c for c in plan.cells if c.axes["n_edits"] == 0)
    result = {"kind": "grid-cell", "grid": plan.name, "cell": {"id": zero.id, "label": zero.label, "axes": zero.axes},
              "metrics": {}}
    publish(store, zero.stages["cell"], "cell", {"result.json": json.dumps(result)})
    states = {c["id"]: c for c in store.cell_states(plan)}
    for c in plan.cells:
        want = "done" if c is zero else "failed" if c.axes["n_edits"] else "pending"
        assert states[c.id]["state"] == want, c.label
    failed = [c for c in states.values() if c["state"] == "failed"]
    assert failed[0]["error"] == "RuntimeError: boom" and "Traceback" in failed[0]["traceback"]
    assert failed[0]["failed_kind"] == "stats"

    sel = select(plan, store)                                       # failed cells stay failed, done ones are skipped
    assert set(sel.cells) == {c.id for c in plan.cells if c.axes["n_edits"] == 0 and c is not zero}
    assert set(sel.skipped_failed) == {c["id"] for c in failed}
    assert stats not in sel.stages
    retry = select(plan, store, retry_failed=True)                  # only the failed cells
    assert set(retry.cells) == {c["id"] for c in failed} and stats in retry.stages
    assert store.failure(stats) is not None                         # selecting changes nothing
    reset_failures(store, retry.stages)                             # the run's own step clears them
    assert store.failure(stats) is None

    assert store.publish_result(plan, zero.id) and store.read_result(zero.id) == result


def test_status_command_json(store):
    from editdecay.cli import _register, app

    _register()
    plan = store.read_plan()
    stats = next(s for s, st in plan.stages.items() if st.kind == "stats")
    with store.take(stats) as lease:
        lease.record_failure("stats", "ValueError: bad", "Traceback ...")
    res = CliRunner().invoke(app, ["grid", "status", str(store.root), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert {"id", "state"} <= set(out["cells"][0])
    assert sorted(c["state"] for c in out["cells"]) == ["failed", "failed", "pending", "pending"]
    assert out["counts"] == {"done": 0, "running": 0, "failed": 2, "pending": 2}
    res = CliRunner().invoke(app, ["grid", "status", str(store.root), "--errors"])
    assert res.exit_code == 0 and "ValueError: bad" in res.output
    res = CliRunner().invoke(app, ["grid", "status", str(store.root / "nothing")])
    assert res.exit_code == 2 and "nothing' does not exist" in " ".join(res.output.split())
    (store.root / "empty").mkdir()
    res = CliRunner().invoke(app, ["grid", "status", str(store.root / "empty")])
    assert res.exit_code == 2 and "not a grid output directory" in " ".join(res.output.split())
