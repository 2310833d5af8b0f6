"""A grid whose fine-tuning stages are sharded over two processes (shared.finetune_devices: 2, FSDP over gloo on
the CPU) computes the same M_f as the in-process run: the same decay-curve steps, losses within 1e-4."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from support.models import save_tiny_model

from editdecay.grid.plan import build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import load_grid
from editdecay.grid.store import GridStore


def _grid(root: Path, model: Path, devices: int) -> Path:
    d = {"name": f"dev{devices}", "models": [{"name": str(model), "label": "tiny"}], "n_edits": [0],
         "recipes": [{"method": "full", "layers": "all", "preset": "embedded",
                      "overrides": {"max_steps": 4, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-3}}],
         "finetune_data": ["embedded"],
         "shared": {"evaluation": {"eval_every": 2}, "embedded_task": {"n_train": 24, "n_test": 4},
                    "device": "cpu", "threads": 1, "finetune_devices": devices, "cache_dir": str(root / "cache")}}
    path = root / f"grid{devices}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _mf(out: Path) -> dict:
    store = GridStore(out)
    plan = store.read_plan()
    sid = next(s for s in plan.stages.values() if s.kind == "finetune").id
    return json.loads((store.stage_dir(sid) / "run" / "result.json").read_text())


def test_sharded_finetune_stage_equals_the_in_process_one(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITDECAY_DIST_BACKEND", "gloo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = save_tiny_model(tmp_path / "tiny")
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        summary = run_grid(build_plan(load_grid(_grid(tmp_path, model, devices))), out, threads=1)
        assert summary.cells["done"] == 1, summary.failed
        runs[devices] = _mf(out)
    one, two = runs[1], runs[2]
    assert two["training"]["precision"]["devices"] == 2 and one["training"]["precision"]["devices"] == 1
    assert [p["step"] for p in two["curve"]] == [p["step"] for p in one["curve"]] == [0, 2, 4]
    assert two["training"]["final_loss"] == pytest.approx(one["training"]["final_loss"], rel=1e-4)
    assert two["metrics"]["M_f"]["task_nll"] == pytest.approx(one["metrics"]["M_f"]["task_nll"], rel=1e-4)
    assert os.path.exists(GridStore(tmp_path / "out2").root / "plan.json")
