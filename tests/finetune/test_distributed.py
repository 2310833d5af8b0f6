"""Sharded fine-tuning (finetune.distributed, FSDP2) in two CPU processes over gloo equals one process.

Same micro-batches, loss normalised by the step's labelled tokens, gradients summed over the processes: the
losses of every step and the final weights agree with the single-process run to within 1e-5 (relative, the
reduction order of float32 sums differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dist_case import build_case  # noqa: E402

TOL = 1e-5


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"step"' in line
            and '"event"' not in line]


def test_two_gloo_processes_train_like_one(tmp_path):
    from safetensors.torch import load_file

    from editdecay.finetune.train import train
    from editdecay.finetune.trainable import resolve_plan

    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITDECAY_DIST_BACKEND": "gloo",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    two = tmp_path / "two"
    two.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "dist_worker.py"), str(two)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model, tok, recipe, data = build_case()
    one_log = tmp_path / "one.jsonl"
    outcome = train(model, tok, recipe, data, plan=resolve_plan(recipe, model), log_path=one_log, progress=False)

    got = json.loads((two / "outcome.json").read_text())
    assert got["world"] == 2 and got["steps"] == outcome.steps == recipe.max_steps
    assert got["tokens"] == outcome.tokens
    l1, l2 = _losses(one_log), _losses(two / "log.jsonl")
    assert len(l1) == len(l2) == recipe.max_steps
    assert l1 == pytest.approx(l2, rel=TOL)
    assert l1[-1] < l1[0]                                       # it trained
    sharded = load_file(str(two / "weights.safetensors"))
    mine = dict(outcome.model.state_dict())
    assert set(sharded) == set(mine)
    changed = 0
    for name, w in mine.items():
        torch.testing.assert_close(sharded[name], w, rtol=TOL, atol=TOL * max(1.0, float(w.abs().max())),
                                   msg=lambda m, n=name: f"{n}: {m}")
        changed += int((w != build_case()[0].state_dict()[name]).any()) if name.endswith("weight") else 0
    assert changed > 0
