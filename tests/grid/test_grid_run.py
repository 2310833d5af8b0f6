"""Running grids for real on a tiny random Llama saved to disk: results, reuse, kill -9 and resume, two runners
at once, failures and --retry-failed, and the Ray and Slurm (submitit local executor) backends.

The tiny model (4 layers, d=32) uses the embedded model's tokenizer; the statistics corpus is a small text
file; fine-tuning runs 3 LoRA steps on the embedded task. Every stage is seeded, so the same grid gives the
same numbers in any process on this machine with one thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ZSRE_SAMPLE
from support.grids import computed_counts, grid_dict, make_corpus, write_grid
from support.models import save_tiny_model

from editdecay.grid.plan import build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import load_grid
from editdecay.grid.store import GridStore

ZSRE = ZSRE_SAMPLE
NUMBERS = ("metrics", "decay", "curve", "curve_base", "requests")   # what must not depend on how a grid ran


def numbers(result: dict) -> dict:
    return {k: result.get(k) for k in NUMBERS}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grid")
    w = {"root": root, "model": root / "tiny-llama", "corpus": root / "corpus.txt", "cache": root / "cache"}
    save_tiny_model(w["model"])
    make_corpus(w["corpus"])
    w["grid"] = write_grid(root / "tiny.yaml", grid_dict(w))
    return w


@pytest.fixture(scope="module")
def baseline(world):
    """The tiny grid run once, uninterrupted, in this process (local backend)."""
    plan = build_plan(load_grid(world["grid"]))
    summary = run_grid(plan, world["root"] / "base", threads=1)
    store = GridStore(world["root"] / "base")
    return {"plan": plan, "store": store, "summary": summary,
            "results": {c.id: store.read_result(c.id) for c in plan.cells}}


def test_local_run_computes_each_stage_once_and_writes_results(baseline):
    plan, store, summary = baseline["plan"], baseline["store"], baseline["summary"]
    assert summary.cells == {"done": 4, "running": 0, "failed": 0, "pending": 0}
    # 4 cells need 4 + 4*... stage uses, but the distinct stages are computed once each
    assert summary.stages["computed"] == len(plan.stages) == 14 and summary.stages["failed"] == 0
    assert set(computed_counts(store).values()) == {1} and len(computed_counts(store)) == 14
    for cell in plan.cells:
        r = baseline["results"][cell.id]
        assert r["kind"] == "grid-cell" and r["cell"]["id"] == cell.id and r["schema_version"] >= 1
        assert r["environment"]["packages"]["torch"] and r["model"]["fingerprint"]
        assert set(r["stages"]) == set(cell.stages) - {"cell"}
        if cell.axes["n_edits"] == 0:
            assert set(r["metrics"]) == {"M0", "M_f"} and r["requests"] == []
            continue
        assert set(r["metrics"]) == {"M0", "M_e", "M_f", "M_ef"}
        assert all(r["metrics"][k]["n"] == 4 for k in r["metrics"])
        assert [p["step"] for p in r["curve"]] == [0, 2, 3]           # decay curve, step 0 = M_e
        assert r["metrics"]["M_e"]["efficacy"] == r["curve"][0]["efficacy"]
        assert r["config"]["editor"]["name"] == "memit" and r["config"]["edited_layers"] == [1, 2]
        assert r["config"]["recipe"]["max_steps"] == 3 and r["config"]["requests"]["n"] == 4
        assert len(r["requests"]) == 4 and {"M0", "M_e", "M_f", "M_ef", "success", "margin", "flipped"} <= set(
            r["requests"][0])
        assert "edit_flip_ratio" in r["decay"] and "relative_decrease" in r["decay"]
        # the edit moved the edited model's margins; M0 and M_f are measured without it
        moved = [abs(q["margin"]["M_e"] - q["margin"]["M0"]) for q in r["requests"] if q["margin"]["M0"] is not None]
        assert max(moved) > 1e-3
        assert r["timings"]["patch"] > 0 and r["timings"]["targets"] > 0 and r["training"]["edited"]["steps"] == 3
        assert r["stages"]["targets"]["kind"] == "targets"
    # the two edited cells share statistics, patch, M0 evaluation; M_f is shared with the n=0 cell of its recipe
    edited = [c for c in plan.cells if c.axes["n_edits"]]
    assert edited[0].stages["patch"] == edited[1].stages["patch"]
    assert edited[0].stages["targets"] == edited[1].stages["targets"]
    # the patch took the target values stage's E3 values and its deltas are what the edit computes by itself
    from editdecay.edit.registry import load_patch

    patch = load_patch(store.stage_dir(edited[0].stages["patch"]) / "patch")
    assert patch.extra["targets"][0]["precomputed"] is True
    assert edited[0].stages["finetune_base"] != edited[1].stages["finetune_base"]
    import pandas as pd

    table = pd.read_parquet(summary.results_table)
    assert len(table) == 4 and {"M_ef_efficacy", "edit_flip_ratio", "M0_task_accuracy"} <= set(table.columns)


def test_a_second_run_reuses_everything(world, baseline):
    summary = run_grid(baseline["plan"], world["root"] / "base", threads=1)
    assert summary.already_done == 4 and summary.stages["computed"] == 0
    assert set(computed_counts(baseline["store"]).values()) == {1}


def test_two_local_workers_give_the_serial_results(world, baseline, tmp_path):
    """--workers 2: independent stages (E3 beside E1, M_f beside the patch) in processes of their own, at most two at
    once; the cell's numbers equal the serial run's, every stage computed once."""
    plan = build_plan(load_grid(_single_cell(world, tmp_path)))
    (cell,) = plan.cells
    summary = run_grid(plan, tmp_path / "two", threads=1, workers=2)
    assert (summary.cells["done"], summary.stages) == (1, {"computed": 8, "reused": 0, "failed": 0, "blocked": 0,
                                                             "busy": 0})
    store = GridStore(tmp_path / "two")
    assert set(computed_counts(store).values()) == {1}
    assert numbers(store.read_result(cell.id)) == numbers(baseline["results"][cell.id])
    events = sorted(store.events(), key=lambda e: e["time"])
    stage_pids = {e["pid"] for e in events if e["event"] == "computed" and e["kind"] != "cell"}
    assert os.getpid() not in stage_pids and len(stage_pids) == 7          # one process per stage
    # what the edit waits for comes first in plan order and runs side by side: E1 statistics and E3 target values
    first_two = [e["kind"] for e in events if e["event"] == "started"][:2]
    assert sorted(first_two) == ["stats", "targets"]
    running, most = set(), 0
    for e in events:
        if e["kind"] == "cell":
            continue
        if e["event"] == "started":
            running.add(e["stage"])
        elif e["event"] in ("computed", "failed"):
            running.discard(e["stage"])
        most = max(most, len(running))
    assert most == 2                                                     # two at once, never more


def test_workers_must_be_a_positive_count(world, tmp_path):
    from editdecay.core.errors import ConfigError

    with pytest.raises(ConfigError, match="workers=0 is not valid"):
        run_grid(build_plan(load_grid(world["grid"])), tmp_path / "none", workers=0)
    assert not (tmp_path / "none").exists()                             # refused before anything is written


def _runner(world, grid: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "editdecay.cli", "grid", "run", str(grid), "--out", str(out),
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.processes
def test_kill_9_mid_grid_then_two_runners_resume_without_recomputing(world, baseline):
    out = world["root"] / "killed"
    store = GridStore(out)
    first = _runner(world, world["grid"], out)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if (out / "logs").is_dir() and len(computed_counts(store)) >= 4:
            break
        time.sleep(0.02)
    assert first.poll() is None, f"the runner finished before it could be killed:\n{first.stdout.read()}"
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    plan = store.read_plan()
    done_at_kill = {sid for sid in plan.stages if store.is_done(sid)}
    assert 4 <= len(done_at_kill) < len(plan.stages)
    # two runners resume the same grid at the same time: another process and this one
    second = _runner(world, world["grid"], out)
    mine = run_grid(build_plan(load_grid(world["grid"])), out, threads=1)
    log = second.communicate(timeout=300)[0]
    assert second.returncode == 0, log
    assert mine.cells["done"] == 4
    counts = computed_counts(store)
    assert set(counts) == set(plan.stages) and set(counts.values()) == {1}, counts   # nothing computed twice
    assert not list((out / "stages").glob(".*.tmp"))               # half-written output of the killed run is gone
    for cell in plan.cells:
        assert numbers(store.read_result(cell.id)) == numbers(baseline["results"][cell.id]), cell.label
    resumed = [e for e in store.events() if e["event"] == "computed" and e["pid"] != first.pid]
    assert {e["stage"] for e in resumed}.isdisjoint(done_at_kill)


def test_failing_cells_are_recorded_and_the_rest_completes(world, tmp_path):
    broken = tmp_path / "broken_zsre.json"
    broken.write_text('[{"subject": "Paris", "src": "Where is Paris?"')       # cut short: not valid JSON
    grid = write_grid(tmp_path / "fail.yaml", grid_dict(
        world, n_edits=[4], edit_data=[f"zsre:{ZSRE}", f"zsre:{broken}"],
        recipes=[{"method": "lora", "preset": "embedded", "label": "lora",
                  "overrides": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "lora_r": 4, "lora_alpha": 8.0}},
                 {"method": "full", "preset": "embedded", "label": "exploding",      # loss becomes NaN
                  "overrides": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1e30,
                                "max_grad_norm": None}}]))
    plan = build_plan(load_grid(grid))
    out = tmp_path / "out"
    summary = run_grid(plan, out, threads=1)
    assert summary.cells["done"] == 1 and summary.cells["failed"] == 3
    store = GridStore(out)
    states = {c["id"]: c for c in store.cell_states(plan)}
    good = next(c for c in plan.cells if c.axes["recipe"] == "lora" and str(broken) not in c.axes["edit_data"])
    assert states[good.id]["state"] == "done" and store.read_result(good.id)["metrics"]["M_ef"]["n"] == 4
    for c in plan.cells:
        s = states[c.id]
        if c is good:
            continue
        assert s["state"] == "failed" and "Traceback (most recent call last)" in s["traceback"]
        if str(broken) in c.axes["edit_data"]:
            assert s["failed_kind"] in ("patch", "evaluate") and "broken_zsre.json" in s["error"] + s["traceback"]
            assert not store.is_done(c.stages["finetune_edited"])
        else:
            assert s["failed_kind"] == "finetune" and "nan" in s["error"].lower()

    # the unreadable data was found before any model was loaded for it
    early = {e["stage"] for e in store.events() if e["event"] == "failed" and e.get("preflight")}
    assert early == {sid for c in plan.cells if str(broken) in c.axes["edit_data"]
                     for sid in (c.stages["patch"], c.stages["eval_base"], c.stages["eval_finetuned_base"])}
    # a plain re-run leaves failed cells alone; --retry-failed reruns only them (for transient failures:
    # out of memory, a lost node); nothing that finished is computed again
    again = run_grid(plan, out, threads=1)
    assert again.stages["computed"] == 0 and len(again.skipped_failed) == 3
    before = computed_counts(store)
    retry = run_grid(plan, out, threads=1, retry_failed=True)
    assert retry.selected_cells == 3 and retry.cells["failed"] == 3 and retry.stages["failed"] >= 3
    assert all(computed_counts(store)[s] == 1 for s in before)
    # fixing the data changes its content, so the next plan has new stages (and cells) for it
    broken.write_text(ZSRE.read_text())
    fixed_plan = build_plan(load_grid(grid))
    fixed = next(c for c in fixed_plan.cells if c.axes["recipe"] == "lora" and str(broken) in c.axes["edit_data"])
    assert fixed.id not in {c.id for c in plan.cells} and good.id in {c.id for c in fixed_plan.cells}
    summary = run_grid(fixed_plan, out, threads=1)
    assert summary.cells == {"done": 2, "running": 0, "failed": 2, "pending": 0}
    assert store.read_result(fixed.id)["metrics"]["M_e"]["n"] == 4
    after = computed_counts(store)
    assert all(after[s] == 1 for s in before) and after[fixed.stages["patch"]] == 1


def _single_cell(world, tmp_path) -> Path:
    """One cell of the tiny grid (memit, n=4, LoRA on the edited layers): same stage ids as in the baseline."""
    d = grid_dict(world, n_edits=[4])
    d["recipes"][0]["layers"] = ["edited"]
    return write_grid(tmp_path / "one.yaml", d)


@pytest.mark.processes
def test_ray_backend_gives_the_same_results(world, baseline, tmp_path):
    plan = build_plan(load_grid(_single_cell(world, tmp_path)))
    (cell,) = plan.cells
    assert cell.id in baseline["results"]                            # content-addressed: the same cell
    summary = run_grid(plan, tmp_path / "ray", backend="ray", num_cpus=1, threads=1)
    assert summary.cells["done"] == 1 and summary.stages["computed"] == 8
    store = GridStore(tmp_path / "ray")
    pids = {e["pid"] for e in store.events() if e["event"] == "computed" and e["kind"] != "cell"}
    assert os.getpid() not in pids                                   # stages ran in Ray worker processes
    assert numbers(store.read_result(cell.id)) == numbers(baseline["results"][cell.id])


def test_slurm_waves_follow_dependencies(baseline):
    from editdecay.grid.backends.slurm_jobs import waves as _waves

    plan = baseline["plan"]
    waves = _waves(plan, list(plan.stages))
    assert sum(len(ids) for w in waves for ids in w.values()) == len(plan.stages)
    wave_of = {sid: i for i, w in enumerate(waves) for ids in w.values() for sid in ids}
    for sid, st in plan.stages.items():
        assert all(wave_of[d] < wave_of[sid] for d in st.deps)
    assert all(plan.stages[sid].kind == kind for w in waves for kind, ids in w.items() for sid in ids)
    assert [sorted(w) for w in waves] == [["evaluate", "finetune", "stats", "targets"], ["cell", "evaluate", "patch"],
                                          ["finetune"], ["cell"]]


@pytest.mark.processes
def test_slurm_backend_with_submitit_local_executor(world, baseline, tmp_path):
    """A fine-tune-only cell as submitit job arrays on the local executor (each job its own process)."""
    d = grid_dict(world, n_edits=[0])
    d["recipes"][0]["layers"] = ["all"]
    plan = build_plan(load_grid(write_grid(tmp_path / "zero.yaml", d)))
    (cell,) = plan.cells
    assert cell.id in baseline["results"]
    out = tmp_path / "slurm"
    summary = run_grid(plan, out, backend="slurm", cluster="local", poll=0.5, threads=1)
    assert summary.cells["done"] == 1 and summary.stages["computed"] == 2, summary
    store = GridStore(out)
    jobs = [p for p in (out / "slurm").iterdir() if p.is_dir()]
    assert jobs and any(p.name.endswith("_result.pkl") for j in jobs for p in j.iterdir())   # submitit's job files
    pids = {e["pid"] for e in store.events() if e["event"] == "computed" and e["kind"] == "finetune"}
    assert pids and os.getpid() not in pids
    assert numbers(store.read_result(cell.id)) == numbers(baseline["results"][cell.id])


def test_finished_cells_of_an_earlier_plan_are_named_when_the_grid_runs_again(world, baseline, tmp_path):
    """A results file whose cell is not in the plan (its id changed) is said, not silently ignored."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(world["root"] / "base", out)
    lines: list[str] = []
    run_grid(baseline["plan"], out, threads=1, echo=lines.append)
    assert not [x for x in lines if x.startswith("note:")]                  # nothing earlier: no note
    shutil.copy(out / "results" / f"{baseline['plan'].cells[0].id}.json", out / "results" / "old-cell-0123abcd.json")
    lines.clear()
    summary = run_grid(baseline["plan"], out, threads=1, echo=lines.append)
    notes = [x for x in lines if x.startswith("note:")]
    assert len(notes) == 1 and "1 finished cell(s)" in notes[0] and "old-cell-0123abcd" in notes[0]
    assert summary.stages["computed"] == 0                                    # and nothing else changed
