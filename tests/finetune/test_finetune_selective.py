"""Selective fine-tuning is exact: what the recipe excludes stays bit-identical (GPT-2 Conv1D and Llama)."""

from __future__ import annotations

import pytest
import torch
from support.models import snapshot, tiny_model, tok

from editdecay.core.arch import arch_for
from editdecay.data.embedded_task import EmbeddedTask
from editdecay.data import load_source
from editdecay.data.instructions import tokenize
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.train import train
from editdecay.finetune.trainable import adapted_modules, merge, resolve_plan

EDITED = (1, 2)


def small_data():
    src = load_source("embedded", task=EmbeddedTask(n_train=16, n_test=4))
    return tokenize(src, tok(), cutoff_len=64, template="compact")


def fit(model, recipe, edited=EDITED):
    plan = resolve_plan(recipe, model, edited)
    return plan, train(model, tok(), recipe, small_data(), plan=plan, progress=False)


def layer_of(name: str, arch) -> int | None:
    """Block index of a parameter name, read with the table's block template."""
    head, _, _ = arch.block.partition("{}")
    if head not in name:
        return None
    return int(name.split(head, 1)[1].split(".", 1)[0])


def planned(name: str, plan) -> bool:
    return any(name.startswith(m + ".") for m in plan.modules)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", ["edited", "non-edited"])
def test_full_fine_tuning_changes_only_the_chosen_layers(family, layers):
    model = tiny_model(family)
    arch = arch_for(model)
    before = snapshot(model)
    plan, out = fit(model, Recipe(method="full", layers=layers, max_steps=3, learning_rate=1e-2, batch_size=4))
    chosen = set(EDITED) if layers == "edited" else {0, 3}
    assert set(plan.layers) == chosen
    after = dict(model.named_parameters())
    for name, old in before.items():
        if layer_of(name, arch) in chosen and planned(name, plan):
            if name.endswith("weight"):
                assert not torch.equal(after[name], old), f"{name} should have trained"
        else:
            assert torch.equal(after[name], old), f"{name} changed but is outside the plan"
    # The edited MLP output module is part of "edited layers" (docs/PROTOCOL.md: the study's code missed it).
    if layers == "edited":
        assert arch.mlp_out_name(1) in plan.modules
        assert f"{arch.mlp_out_name(1)}.weight" in out.trainable_parameters
    else:
        assert not any(layer_of(n, arch) in EDITED for n in out.trainable_parameters)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("layers", ["edited", "non-edited"])
def test_adapters_exist_only_where_the_recipe_says(family, method, layers):
    model = tiny_model(family)
    arch = arch_for(model)
    before = snapshot(model)
    recipe = Recipe(method=method, layers=layers, targets="mlp" if layers == "edited" else "all-linear",
                    max_steps=3, learning_rate=1e-2, batch_size=4, lora_r=4, lora_alpha=8.0)
    plan, out = fit(model, recipe)
    assert sorted(adapted_modules(out.model)) == sorted(plan.modules)
    chosen = set(EDITED) if layers == "edited" else {0, 3}
    assert {layer_of(m, arch) for m in plan.modules} == chosen
    # Only adapter tensors train, and only inside the plan.
    for name in out.trainable_parameters:
        assert "lora_" in name
        assert any(f".{m}." in name for m in plan.modules), name
    assert any("lora_magnitude_vector" in n for n in out.trainable_parameters) == (method == "dora")
    # Base weights are untouched until merging...
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in out.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], before[n]) for n in before)
    # ...and merging changes exactly the planned modules.
    merged = dict(merge(out.model).named_parameters())
    assert set(merged) == set(before)
    for name, old in before.items():
        if planned(name, plan) and name.endswith("weight"):
            assert not torch.equal(merged[name], old), f"{name} should carry the merged adapter"
        else:
            assert torch.equal(merged[name], old), f"{name} changed but has no adapter"


def test_full_with_targets_all_trains_whole_blocks_and_the_rest():
    model = tiny_model("llama")
    before = snapshot(model)
    plan, out = fit(model, Recipe(method="full", targets="all", layers=(3,), max_steps=2, learning_rate=1e-2,
                                  batch_size=4))
    assert plan.whole_blocks and not plan.outside_blocks
    assert set(out.trainable_parameters) == {n for n in before if n.startswith("model.layers.3.")}
    assert "model.layers.3.input_layernorm.weight" in out.trainable_parameters
    everything = tiny_model("llama")
    _, out_all = fit(everything, Recipe(method="full", targets="all", max_steps=1, batch_size=4))
    assert set(out_all.trainable_parameters) == {n for n, _ in everything.named_parameters()}
