"""The mechanism measure on a tiny Llama with a synthetic edit: a fine-tuning update constructed to undo the
edit exactly gives ratio 1 and cosine -1 at every key, one constructed orthogonal to the keys gives ratio 0,
a LoRA adapter built to undo the edit gives the same numbers unmerged and merged, an untrained layer is
reported as such, and the Spearman relation to survival on hand-made values."""

from __future__ import annotations

import pytest
import torch
from support.edits import synthetic_patch
from support.models import tiny_model, tok

from editdecay.core.arch import get_module
from editdecay.edit.context import ContextTemplates
from editdecay.edit.keys import compute_keys
from editdecay.measure.interference import interference, ratios, relate, snapshot

LAYERS = (1, 2)
NAMES = {l: f"model.layers.{l}.mlp.down_proj" for l in LAYERS}


def edited():
    model = tiny_model("llama", scale=4.0)
    patch = synthetic_patch(model)
    patch.apply(model)
    keys = compute_keys(model, tok(), list(patch.requests), list(LAYERS), ContextTemplates((("{}",),)))
    deltas = {l: patch.deltas[NAMES[l]] for l in LAYERS}
    return model, patch, keys, deltas


def measure(model, before, deltas, keys, patch, trained=LAYERS):
    return interference(model, before, NAMES, deltas, keys, [r.case_id for r in patch.requests], conv1d=False,
                        trained=trained)


def test_an_update_that_undoes_the_edit_has_ratio_one_and_cosine_minus_one():
    model, patch, keys, deltas = edited()
    before = snapshot(model, NAMES)
    with torch.no_grad():
        for l in LAYERS:
            get_module(model, NAMES[l]).weight -= deltas[l]
    res = measure(model, before, deltas, keys, patch)
    for l in LAYERS:
        for r in res["layers"][l]["per_request"].values():
            assert r["ratio"] == pytest.approx(1.0, abs=1e-4) and r["cosine"] == pytest.approx(-1.0, abs=1e-5)
            assert r["projection"] == pytest.approx(-1.0, abs=1e-4)
    assert all(v["ratio"] == pytest.approx(1.0, abs=1e-4) for v in res["per_request"].values())


def test_an_update_orthogonal_to_the_keys_has_ratio_zero_and_an_untrained_layer_says_so():
    model, patch, keys, deltas = edited()
    before = snapshot(model, NAMES)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l in LAYERS:
            k = keys[l]                                                           # (d_k, n)
            null = torch.eye(k.shape[0]) - k @ torch.linalg.pinv(k)               # projector off the keys
            w = get_module(model, NAMES[l]).weight
            big = torch.randn(w.shape, generator=gen) * 10 @ null                 # (d, d_k), large, k-orthogonal
            assert (big @ k).abs().max() < 1e-3 * big.abs().max()
            w += big
    res = measure(model, before, deltas, keys, patch, trained=(1,))
    assert all(r["ratio"] < 1e-4 for r in res["layers"][1]["per_request"].values())
    assert res["layers"][2] == {"trained": False, "module": NAMES[2], "note": res["layers"][2]["note"]}
    assert "not a measurement" in res["layers"][2]["note"]


def test_lora_built_to_undo_the_edit_gives_the_same_numbers_unmerged_and_merged():
    from peft import LoraConfig, get_peft_model

    model, patch, keys, deltas = edited()
    before = snapshot(model, NAMES)
    r = 32
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=["down_proj"],
                                                  layers_to_transform=list(LAYERS), lora_dropout=0.0))
    with torch.no_grad():
        for l in LAYERS:
            u, s, vh = torch.linalg.svd(-deltas[l], full_matrices=False)         # -delta = U S Vh, rank <= 32
            layer = get_module(peft_model.get_base_model(), NAMES[l])
            layer.lora_B["default"].weight.copy_(u[:, :r] * s[:r])               # (d, r)
            layer.lora_A["default"].weight.copy_(vh[:r])                          # (r, d_k)
    unmerged = measure(peft_model, before, deltas, keys, patch)
    merged = measure(peft_model.merge_and_unload(), before, deltas, keys, patch)
    for l in LAYERS:
        for c, row in unmerged["layers"][l]["per_request"].items():
            assert row["cosine"] == pytest.approx(-1.0, abs=1e-4) and row["ratio"] == pytest.approx(1.0, abs=1e-3)
            assert merged["layers"][l]["per_request"][c]["ratio"] == pytest.approx(row["ratio"], abs=1e-4)


def test_ratios_by_hand_and_relation_to_survival():
    e = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    f = torch.tensor([[0.0, 5.0], [0.0, 0.0], [1.0, 1.0]])
    r = ratios(e, f)
    assert r[0]["ratio"] == pytest.approx(1.0) and r[0]["cosine"] == pytest.approx(0.8)
    assert r[1] == {"ratio": 0.0, "cosine": None, "projection": 0.0}
    assert r[2]["ratio"] is None and r[2]["cosine"] is None
    per = {"a": {"ratio": 0.1}, "b": {"ratio": 0.2}, "c": {"ratio": 0.9}, "d": {"ratio": 1.5}, "e": {"ratio": None}}
    rel = relate(per, {"a": True, "b": True, "c": False, "d": False, "e": True})
    assert rel["n"] == 4 and rel["rho"] == pytest.approx(-0.8944, abs=1e-3)     # survivors have small ratios
    assert relate(per, {"a": True, "b": True, "c": True})["rho"] is None      # survival constant: undefined


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_fine_tuning_runs_record_the_measure_per_layer_and_request(tmp_path, method):
    import json

    from editdecay.core.models import wrap
    from editdecay.finetune import EmbeddedTask, Recipe, load_source
    from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune

    model = tiny_model("llama", scale=4.0)
    patch = synthetic_patch(model)
    task = EmbeddedTask(n_train=16, n_test=4)
    recipe = Recipe(method=method, layers=(1,), targets="mlp", max_steps=3, batch_size=4, lora_r=4,
                    learning_rate=5e-2 if method == "lora" else 1e-3, template="compact", cutoff_len=64)
    r = run_finetune(wrap(model, tok(), name="tiny-llama", source="config"), recipe, load_source("embedded", task=task),
                     tmp_path / method, save="none",
                     edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply,
                                          deltas=patch.deltas),
                     measures=Measures(task=task), progress=False)
    mech = json.loads((r.out / "result.json").read_text())["mechanism"]
    assert mech["layers"]["2"]["trained"] is False and "per_request" not in mech["layers"]["2"]
    rows = mech["layers"]["1"]["per_request"]
    assert set(rows) == {"0", "1", "2", "3"}
    assert all(x["ratio"] > 0 and -1 <= x["cosine"] <= 1 for x in rows.values())        # training moved layer 1
    assert mech["per_request"]["0"]["ratio"] == rows["0"]["ratio"]                       # layer 2 is not averaged in
    assert set(mech["relation"]) == {"ratio", "cosine"} and mech["relation"]["ratio"]["n"] <= 4
