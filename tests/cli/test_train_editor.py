"""`editdecay train-editor` on a tiny model: MEND's network trained on requests disjoint from the edited ones,
then used by `editdecay edit`; wrong input fails with exit code 2 before the model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.models import save_tiny_model
from typer.testing import CliRunner

from editdecay.cli import _register, app

_register()
runner = CliRunner(env={"COLUMNS": "1000"})

FACTS = [("The capital of {} is", "France", "Rome", "Paris"), ("The capital of {} is", "Japan", "Lima", "Tokyo"),
         ("{} was born in", "Marie Curie", "Tokyo", "Warsaw"), ("{} plays the sport of", "Lionel Messi", "golf",
                                                                 "football"),
         ("The official language of {} is", "Brazil", "French", "Portuguese"),
         ("The currency of {} is the", "India", "euro", "rupee")]


def _data(path: Path, facts=FACTS) -> Path:
    path.write_text(json.dumps([{"case_id": i, "requested_rewrite": {
        "prompt": p, "subject": s, "relation_id": "P0", "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"In short: {p.replace('{}', s)}"], "neighborhood_prompts": [p.replace("{}", "Peru")]}
        for i, (p, s, new, true) in enumerate(facts)]))
    return path


def _text(res) -> str:
    return " ".join((res.output + str(res.exception or "")).split())


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch) -> Path:
    path = save_tiny_model(tmp_path / "tiny")     # before the private cache: its tokenizer is the embedded model's
    monkeypatch.setenv("EDITDECAY_CACHE", str(tmp_path / "cache"))
    return path


def test_train_then_edit_with_excluded_subjects(tiny_dir, tmp_path):
    data = _data(tmp_path / "cf.json")
    edited = _data(tmp_path / "edit.json", FACTS[:2])
    net = tmp_path / "net"
    res = runner.invoke(app, ["train-editor", "--editor", "mend", "--model", str(tiny_dir), "--data",
                              f"counterfact:{data}", "--exclude", f"counterfact:{edited}", "--layers", "2,3",
                              "--train-steps", "2", "--train-rank", "4", "--train-validation", "1", "--threads", "1",
                              "--no-progress", "--out", str(net)])
    assert res.exit_code == 0, _text(res)
    assert "4 training requests" in _text(res) and "2 about 2 excluded subjects left out" in _text(res)
    record = json.loads((net / "hypernetwork.json").read_text())
    assert set(record["training"]["subjects"]).isdisjoint({"France", "Japan"})
    assert record["layers"] == [2, 3] and record["training"]["seconds"] >= 0
    out = tmp_path / "patch"
    res = runner.invoke(app, ["edit", "--editor", "mend", "--model", str(tiny_dir), "--data", f"counterfact:{edited}",
                              "--layers", "2,3", "--hypernetwork", str(net), "--hypernetwork-sha256",
                              record["tensors_sha256"], "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, _text(res)
    patch = json.loads((out / "patch.json").read_text())
    assert patch["editor"] == "mend" and len(patch["modules"]) == 6 and patch["extra"]["warnings"] == []


@pytest.mark.parametrize("args, named", [
    (["--editor", "memit"], "--editor"),
    (["--editor", "mend", "--exclude-n", "2"], "--exclude"),
    (["--editor", "mend", "--train-steps", "0"], "steps"),
    (["--editor", "mend", "--data", "nosuchsource"], "nosuchsource"),
])
def test_bad_input_exits_2_before_loading_the_model(args, named, tmp_path, monkeypatch):
    import editdecay.core.model_ref as model_ref

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(model_ref.ModelRef, "load", forbidden)
    res = runner.invoke(app, ["train-editor", *args, "--out", str(tmp_path / "net")])
    assert res.exit_code == 2, _text(res)
    assert named in _text(res) and "Traceback" not in res.output
    assert not (tmp_path / "net").exists()
