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


def test_finetune_devices_2_runs_the_sharded_path_end_to_end(tmp_path, tokenizer):
    """`editdecay finetune --devices 2` on the CPU: two workers (gloo), the decay curve at the same steps as
    asked, one result written by process 0 with the gathered weights."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, max_position_embeddings=256, vocab_size=len(tokenizer),
                      tie_word_embeddings=False)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITDECAY_DIST_BACKEND": "gloo"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "editdecay.cli", "finetune", "--model", str(model_dir), "--method",
                           "full", "--steps", "4", "--batch-size", "4", "--task-train", "32", "--task-test", "4",
                           "--eval-every", "2", "--devices", "2", "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "done" and r["training"]["precision"]["devices"] == 2
    assert [p["step"] for p in r["curve"]] == [0, 2, 4]
    weights = load_file(str(out / "weights.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in weights
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 4      # one writer: no duplicated lines
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()
             if '"event"' not in line]
    assert steps == [1, 2, 3, 4]
