"""`editdecay edit` and `editdecay finetune` on each device give the CPU's results.

Each test runs once per device: `cpu` everywhere (it checks the test itself and the CPU path), `cuda`
only where a CUDA device exists (marker `gpu`; skipped otherwise). A tiny Llama directory, a small
statistics corpus and 4 CounterFact-style requests keep a run to seconds; every run has a cache of its
own, so statistics, keys, targets and the solve are all computed on the device under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.edits import REQUESTS, write_corpus
from support.models import save_tiny_model
from typer.testing import CliRunner

from editdecay.cli import _register, app

_register()
runner = CliRunner()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("devices")
    data = [{"case_id": i, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject, "relation_id": "P0",
                                                  "target_new": {"str": r.target_new},
                                                  "target_true": {"str": r.target_true}},
             "paraphrase_prompts": [f"In short, {r.prompt.format(r.subject)}"],
             "neighborhood_prompts": [r.prompt.format("Germany")]} for i, r in enumerate(REQUESTS)]
    (root / "cf.json").write_text(json.dumps(data))
    return {"model": save_tiny_model(root / "tiny"), "corpus": write_corpus(root / "corpus.txt"),
            "data": root / "cf.json", "root": root}


def edit(world: dict, device: str, out: Path, monkeypatch) -> dict:
    monkeypatch.setenv("EDITDECAY_CACHE", str(out.parent / f"cache-{out.name}"))
    res = runner.invoke(app, ["edit", "--model", str(world["model"]), "--data", f"counterfact:{world['data']}",
                              "--layers", "1,2", "--stats-corpus", str(world["corpus"]), "--stats-tokens", "700", "--mom2-update-weight", "10",
                              "--clamp-norm-factor", "4",
                              "--device", device, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def cpu_patch(world) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        edit(world, "cpu", world["root"] / "cpu-patch", mp)
    return world["root"] / "cpu-patch"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("device", DEVICES)
def test_edit_on_the_device_matches_the_cpu(world, cpu_patch, device, tmp_path, monkeypatch):
    result = edit(world, device, tmp_path / "patch", monkeypatch)
    assert result["config"]["device"] == device
    got, want = load_file(str(tmp_path / "patch" / "patch.safetensors")), load_file(str(cpu_patch / "patch.safetensors"))
    assert set(got) == set(want) and len(got) == 2          # layers 1 and 2
    for name in want:
        assert torch.isfinite(got[name]).all()
        # The E3 optimisation amplifies float32 round-off a little over 25 Adam steps: same direction and size.
        assert _cosine(got[name], want[name]) > 0.999, name
        assert abs(float(got[name].norm() / want[name].norm()) - 1) < 1e-2, name
    cpu = json.loads((cpu_patch / "result.json").read_text())["metrics"]
    for model in ("M0", "M_e"):
        assert result["metrics"][model]["margin"] == pytest.approx(cpu[model]["margin"], rel=1e-3, abs=1e-4)
    assert result["metrics"]["M_e"]["margin"] > result["metrics"]["M0"]["margin"]   # the edit moved the model


@pytest.mark.parametrize("device", DEVICES)
def test_lora_finetuning_on_the_device_matches_the_cpu(world, cpu_patch, device, tmp_path):
    def finetune(dev: str, out: Path) -> dict:
        res = runner.invoke(app, ["finetune", "--model", str(world["model"]), "--patch", str(cpu_patch),
                                  "--method", "lora", "--data", "embedded", "--task-train", "40", "--task-test", "8",
                                  "--steps", "3", "--batch-size", "4", "--eval-every", "0", "--save", "none",
                                  "--no-progress", "--device", dev, "--out", str(out)])
        assert res.exit_code == 0, res.output
        return json.loads((out / "result.json").read_text())

    got, want = finetune(device, tmp_path / "on-device"), finetune("cpu", tmp_path / "reference")
    assert got["environment"]["device"].startswith(device)
    assert got["training"]["final_loss"] == pytest.approx(want["training"]["final_loss"], rel=1e-3)
    for model in ("M0", "M_e", "M_ef"):
        assert got["metrics"][model]["n"] == want["metrics"][model]["n"] == len(REQUESTS)
        assert got["metrics"][model]["margin"] == pytest.approx(want["metrics"][model]["margin"], rel=1e-3, abs=1e-4)
    assert got["metrics"]["M_ef"]["margin"] != got["metrics"]["M_e"]["margin"]    # training moved the model
