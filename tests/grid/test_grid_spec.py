"""Grid files and plans: validation errors that name the key, cells and shared stages, no model, no network."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
from support import ROOT
from typer.testing import CliRunner

from editdecay.core.errors import ConfigError
from editdecay.grid.plan import build_plan
from editdecay.grid.spec import grid_from_dict, load_grid

STUDY = ROOT / "examples" / "grids" / "study.yaml"
DEMO = ROOT / "examples" / "grids" / "demo.yaml"
EMBEDDED_STUDY = ROOT / "examples" / "grids" / "embedded-study.yaml"
EMBEDDED_STUDY_V3 = ROOT / "examples" / "grids" / "embedded-study-v3.yaml"


def small(**changes) -> dict:
    d = {
        "name": "small",
        "models": ["smollm2-135m"],
        "editors": ["memit", "alphaedit"],
        "edit_data": ["worldfacts"],
        "n_edits": [0, 8],
        "recipes": [{"method": ["lora", "full"], "layers": ["all", "edited"], "overrides": {"max_steps": 4}}],
    }
    d.update(changes)
    return d


def error_of(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        build_plan(grid_from_dict(d))
    return " ".join(str(e.value).split())


# --------------------------------------------------------------------------- validation


def test_unknown_key_is_named_with_a_suggestion():
    msg = error_of(small(recipes=[{"method": "lora", "layerz": "all"}]))
    assert "recipes[0].layerz: unknown field" in msg and "did you mean 'layers'" in msg


def test_bad_values_name_key_value_and_choices():
    msg = error_of(small(recipes=[{"method": ["lora", "lorra"]}]))
    assert "recipes[0].method" in msg and "'lorra'" in msg and "did you mean 'lora'" in msg
    assert "full, lora, dora" in msg
    msg = error_of(small(n_edits=[8, -1]))
    assert "n_edits" in msg and "-1" in msg
    msg = error_of(small(editors=["memit", "rome"]))
    assert "editors[1].name" in msg and "'rome'" in msg and "memit, alphaedit" in msg
    msg = error_of(small(recipes=[{"method": "lora", "layers": ["edited", "nonedited"]}]))
    assert "recipes[0].layers" in msg and "did you mean 'non-edited'" in msg
    msg = error_of(small(edit_data=["zsre"]))
    assert "edit_data" in msg and "give a file" in msg
    msg = error_of(small(models=[]))
    assert "models" in msg


def test_several_problems_are_all_reported():
    msg = error_of(small(seeds=[-3], finetune_data=["commonsense"], shared={"downstream": ["mmlu"]}))
    assert "3 problems" in msg and "seeds" in msg and "finetune_data" in msg and "shared.downstream" in msg


def test_cross_field_rules():
    assert "no editor is given" in error_of(small(editors=[]))
    assert "no edit data" in error_of(small(edit_data=[]))
    assert "listed twice" in error_of(small(n_edits=[8, 8]))
    msg = error_of(small(recipes=[{"method": ["lora", "dora"], "label": "mine"}]))
    assert "label='mine'" in msg and "expands to 2" in msg
    msg = error_of(small(recipes=[{"method": "lora", "overrides": {"seed": 3}}]))
    assert "'seed' cannot be an override" in msg and "seeds" in msg


def test_overrides_are_checked_against_the_real_config_classes():
    msg = error_of(small(recipes=[{"method": "lora", "overrides": {"learning_rat": 1e-4}}]))
    assert "recipes[0]" in msg and "learning_rat" in msg and "did you mean 'learning_rate'" in msg
    msg = error_of(small(recipes=[{"method": "lora", "overrides": {"lora_r": 0}}]))
    assert "lora_r=0" in msg
    msg = error_of(small(editors=[{"name": "memit", "overrides": {"mom2_update_weight": -1}}]))
    assert "editors[0]" in msg and "mom2_update_weight" in msg
    msg = error_of(small(editors=[{"name": "alphaedit", "overrides": {"nullspace_treshold": 0.1}}]))
    assert "nullspace_treshold" in msg


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [smollm2-135m\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")


def test_layer_spellings():
    plan = build_plan(grid_from_dict(small(n_edits=[8], editors=[{"name": "memit", "overrides": {"layers": "2-4"}}],
                                           recipes=[{"method": "lora", "layers": [[5, 6], "7-8", "edited"]}])))
    layers = sorted({json.dumps(c.axes["layers"]) for c in plan.cells})
    assert layers == ['"edited"', "[5, 6]", "[7, 8]"]
    patch = plan.stages[plan.cells[0].stages["patch"]]
    assert patch.spec.editor.config["layers"] == [2, 3, 4]


# --------------------------------------------------------------------------- plans


def test_small_grid_cells_and_sharing():
    plan = build_plan(grid_from_dict(small()))
    cells = plan.cells
    # 2 editors x 1 data x n=8 x 4 recipes, plus fine-tune-only cells: 2 recipes on all layers and 2 on the
    # edited layers (both editors edit layers 3-7 of the embedded model: one cell each, shared)
    edited = [c for c in cells if c.axes["n_edits"] == 8]
    zero = [c for c in cells if c.axes["n_edits"] == 0]
    assert len(edited) == 8 and len(zero) == 4
    assert {c.axes["editor"] for c in zero} == {None, "L3-4-5-6-7"}
    uses = plan.uses()
    stats = [s for s in plan.stages.values() if s.kind == "stats"]
    assert len(stats) == 1 and len(uses[stats[0].id]) == 8          # one statistics run for both editors
    patches = [s for s in plan.stages.values() if s.kind == "patch"]
    assert len(patches) == 2 and all(len(uses[p.id]) == 4 for p in patches)   # one patch per editor, 4 recipes
    # E3 reads no statistics and both editors' E3 settings agree: one target values stage, beside E1, for both
    targets = [s for s in plan.stages.values() if s.kind == "targets"]
    assert len(targets) == 1 and len(uses[targets[0].id]) == 8 and targets[0].deps == ()
    assert all(p.deps == (stats[0].id, targets[0].id) and p.spec.targets == targets[0].id for p in patches)
    m_f = [s for s in plan.stages.values() if s.kind == "finetune" and s.spec.patch is None]
    assert len(m_f) == 4                                               # one M_f per recipe, shared by editors
    for s in m_f:
        assert len(uses[s.id]) == 3                                    # 2 editors' cells + the n=0 cell
    for c in edited:
        assert set(c.stages) == {"stats", "targets", "patch", "eval_base", "finetune_base", "eval_finetuned_base",
                                 "finetune_edited", "cell"}
    for c in zero:
        assert set(c.stages) == {"finetune_base", "cell"}
    # every stage's dependencies come before it
    seen = set()
    for sid, s in plan.stages.items():
        assert all(d in seen for d in s.deps)
        seen.add(sid)


def test_stage_ids_are_content_addresses():
    base = build_plan(grid_from_dict(small()))
    again = build_plan(grid_from_dict(small()))
    assert list(base.stages) == list(again.stages) and [c.id for c in base.cells] == [c.id for c in again.cells]
    # how-settings (device, threads, batch sizes, cache location, resources) change no id
    how = build_plan(grid_from_dict(small(shared={"device": "cpu", "threads": 3, "cache_dir": "/tmp/elsewhere",
                                                  "evaluation": {"batch_size": 7}},
                                          resources={"default": {"cpus": 4, "gpus": 1}})))
    assert list(how.stages) == list(base.stages)
    # a recipe change touches the fine-tuning stages and what reads them, never statistics or patches
    lr = build_plan(grid_from_dict(small(recipes=[{"method": ["lora", "full"], "layers": ["all", "edited"],
                                                   "overrides": {"max_steps": 4, "learning_rate": 3e-4}}])))
    kept = set(lr.stages) & set(base.stages)
    assert {base.stages[s].kind for s in kept} == {"stats", "targets", "patch", "evaluate"}
    assert all(base.stages[s].spec.finetune is None for s in kept if base.stages[s].kind == "evaluate")
    # a seed changes patches and fine-tuning, not the statistics
    seeded = build_plan(grid_from_dict(small(seeds=[1])))
    assert {base.stages[s].kind for s in set(seeded.stages) & set(base.stages)} == {"stats"}


def test_plan_roundtrips_through_json():
    from editdecay.grid.plan import Plan

    plan = build_plan(grid_from_dict(small()))
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.stages == plan.stages and back.cells == plan.cells and back.runtime == plan.runtime


def test_study_grid_lists_every_cell_and_shares_stages():
    plan = build_plan(load_grid(STUDY))
    s = plan.summary()
    models, editors, data, ns, recipes = 5, 2, 2, (100, 1000, 10000), 5
    edited = [c for c in plan.cells if c.axes["n_edits"] > 0]
    assert len(edited) == models * editors * data * len(ns) * recipes == 300
    combos = {(c.axes["model_label"], c.axes["editor"], c.axes["edit_data_label"], c.axes["n_edits"],
               c.axes["recipe"]) for c in edited}
    labels = ["gpt2-xl", "gpt-j-6b", "llama-2-7b", "llama-3.1-8b-instruct", "r1-distill-llama-8b"]
    recipe_names = ["full-all", "lora-all", "dora-all", "lora-edited", "lora-non-edited"]
    assert combos == set(itertools.product(labels, ["memit", "alphaedit"], ["zsre", "counterfact"], ns, recipe_names))
    # n_edits = 0: one fine-tune-only cell per model and recipe (both editors edit the same layers)
    assert len(plan.cells) - len(edited) == models * recipes
    k = s["by_kind"]
    assert k["stats"]["stages"] == models                                  # one E1 run per model and layer set
    assert k["patch"]["stages"] == models * editors * data * len(ns)       # shared by the 5 recipes
    m_f = [x for x in plan.stages.values() if x.kind == "finetune" and x.spec.patch is None]
    assert len(m_f) == models * recipes                                    # one M_f per model x recipe
    assert k["finetune"]["stages"] == models * recipes + 300               # + one M_ef per edited cell
    # the study's presets (docs/PROTOCOL.md) are resolved without loading any model
    layers = {x.spec.model.name: list(x.spec.statistics.layers) for x in plan.stages.values() if x.kind == "stats"}
    assert layers["openai-community/gpt2-xl"] == [13, 14, 15, 16, 17]
    assert layers["EleutherAI/gpt-j-6b"] == [3, 4, 5, 6, 7, 8]
    assert layers["meta-llama/Llama-2-7b-hf"] == [4, 5, 6, 7, 8]
    llama3 = next(x for x in plan.stages.values() if x.kind == "patch"
                  and x.spec.model.name == "meta-llama/Llama-3.1-8B-Instruct")
    assert llama3.spec.editor.config["v_lr"] == 0.1
    full = next(x for x in plan.stages.values() if x.kind == "finetune" and x.spec.recipe.method == "full")
    assert full.spec.recipe.targets == "all" and full.spec.recipe.learning_rate == 5e-6


def test_demo_grid_is_the_v3_zsre_lora_cell_at_demo_size():
    """`make demo` is the embedded study v3's zsRE LoRA cell (MEMIT, LoRA on all layers, chatterbot choice records,
    token accuracy), shorter: the recipe differs from v3's only in its length and the speed settings, the data
    settings only in the held-out size."""
    plan = build_plan(load_grid(DEMO))
    assert {c.axes["model"] for c in plan.cells} == {"smollm2-135m"}
    assert {(c.axes["editor"], c.axes["method"], c.axes["layers"]) for c in plan.cells} == set(
        itertools.product(["memit"], ["lora"], ["all"]))
    assert {c.axes["finetune_data"] for c in plan.cells} == {"chatterbot"}
    assert {c.axes["edit_data_label"] for c in plan.cells} == {"zsre"} and {c.axes["n_edits"] for c in plan.cells} == {20}
    v3 = build_plan(load_grid(EMBEDDED_STUDY_V3))

    def finetune_config(p):
        ft = next(s for s in p.stages.values() if s.kind == "finetune" and s.spec.recipe.method == "lora"
                  and s.spec.recipe.layers == "all" and s.spec.recipe.epochs in (None, 1))
        length = ("epochs", "max_steps", "dtype", "group_by_length")
        return ({k: v for k, v in ft.spec.recipe.to_dict().items() if k not in length},
                {k: v for k, v in ft.spec.data.settings.items() if k != "n_test"})

    assert finetune_config(plan) == finetune_config(v3)
    demo_recipe = next(s.spec.recipe for s in plan.stages.values() if s.kind == "finetune")
    assert (demo_recipe.max_steps, demo_recipe.dtype, demo_recipe.group_by_length) == (16, "bfloat16", True)


def test_embedded_study_v3_plans_both_data_sets_at_the_stated_dose():
    """The v3 grid: 2 editors x {worldfacts, zsRE} x 6 recipes; one epoch (three for the dose arm); its curve
    checkpoints are every eighth of an epoch of the 1026 chatterbot training records at batch 8 (129 steps)."""
    plan = build_plan(load_grid(EMBEDDED_STUDY_V3))
    assert len(plan.cells) == 24
    assert {c.axes["edit_data_label"] for c in plan.cells} == {"worldfacts", "zsre"}
    finetunes = [s.spec for s in plan.stages.values() if s.kind == "finetune"]
    assert {(s.recipe.method, s.recipe.epochs, s.recipe.max_steps) for s in finetunes} == {
        ("full", 1, None), ("lora", 1, None), ("dora", 1, None), ("lora", 3, None)}
    every = finetunes[0].eval_every
    from support.models import tok

    from editdecay.data.instructions import tokenize
    from editdecay.data.sources import held_out_task, load_source

    recipe = finetunes[0].recipe
    task = held_out_task("chatterbot", load_grid(EMBEDDED_STUDY_V3).shared.chatterbot.to_dict())
    examples = tokenize(load_source("chatterbot", task=task), tok(), cutoff_len=recipe.cutoff_len,
                        template=recipe.template, train_on_prompt=recipe.train_on_prompt).examples
    steps_per_epoch = -(-len(examples) // recipe.batch_size)
    assert steps_per_epoch == 128          # the number the grid file's comment derives its checkpoints from
    assert every[:3] == (2, 4, 8)
    assert every[3:] == tuple(k * steps_per_epoch // 8 for k in range(1, 25))
    assert every[-1] == 3 * steps_per_epoch and (steps_per_epoch in every)


PLAN_PROBE = textwrap.dedent("""
    import json, socket, sys, time
    def no_network(*a, **k):
        raise AssertionError("grid plan touched the network")
    socket.socket.connect = no_network
    socket.create_connection = no_network
    t0 = time.perf_counter()
    import editdecay.core.models
    def no_model(*a, **k):
        raise AssertionError("grid plan loaded a model")
    editdecay.core.models.load_model = no_model
    from typer.testing import CliRunner
    from editdecay.cli import _register, app
    _register()
    res = CliRunner().invoke(app, ["grid", "plan", sys.argv[1], "--json"])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    heavy = sorted(m for m in sys.modules if m.startswith(("transformers", "peft", "datasets", "accelerate")))
    print(json.dumps({"seconds": seconds, "cells": len(out["cells"]), "stages": len(out["stages"]),
                      "heavy": heavy[:5], "summary": out["summary"]}))
""")


def test_planning_the_study_loads_no_model_and_is_fast():
    """`grid plan` of the 325-cell study grid in a fresh interpreter: no model code, no network, seconds."""
    res = subprocess.run([sys.executable, "-c", PLAN_PROBE, str(STUDY)], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []                      # transformers / peft were never imported
    assert out["cells"] == 325 and out["stages"] == out["summary"]["stages"]
    assert out["seconds"] < 30, out                # ~2-4 s on one idle core (importing torch is most of it)


def test_cli_plan_json_lists_cells_and_stage_users(tmp_path):
    from editdecay.cli import _register, app

    _register()
    grid = tmp_path / "g.yaml"
    import yaml

    grid.write_text(yaml.safe_dump(small()))
    res = CliRunner().invoke(app, ["grid", "plan", str(grid), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["cells"]) == 12 and {"id", "label", "axes", "stages"} <= set(out["cells"][0])
    ids = {c["id"] for c in out["cells"]}
    for st in out["stages"]:
        assert st["cells"] and set(st["cells"]) <= ids
    stats = [st for st in out["stages"] if st["kind"] == "stats"]
    assert len(stats) == 1 and len(stats[0]["cells"]) == 8
    res = CliRunner().invoke(app, ["grid", "plan", str(grid)])
    assert res.exit_code == 0 and "12 cells" in res.output and "shared" in res.output
    grid.write_text(yaml.safe_dump(small(recipes=[{"method": "lorra"}])))
    res = CliRunner().invoke(app, ["grid", "plan", str(grid)])
    assert res.exit_code == 2 and "did you mean 'lora'" in res.output and "Traceback" not in res.output


def test_missing_local_files_are_warnings_of_the_plan(tmp_path):
    from editdecay.grid.plan import missing_files

    warnings = missing_files(build_plan(load_grid(STUDY)))     # the study's data is not downloaded here
    assert len(warnings) == 3 and all("examples/grids/data/" in w for w in warnings)
    assert any("edit data" in w and "zsre_mend_eval.json" in w for w in warnings)
    assert any("fine-tuning data" in w and "commonsense_170k.json" in w for w in warnings)
    data = tmp_path / "cf.json"
    data.write_text("[]")
    plan = build_plan(grid_from_dict(small(edit_data=["counterfact:cf.json"]), base_dir=tmp_path))
    assert missing_files(plan) == []                            # relative to the grid file's directory
    assert {c.axes["edit_data"] for c in plan.cells if c.axes["n_edits"]} == {f"counterfact:{data}"}


def test_data_content_is_part_of_the_stage_ids(tmp_path):
    from editdecay.core.errors import DataError
    from editdecay.data.sources import check_digest as check_data_digest

    data = tmp_path / "cf.json"
    data.write_text("[1]")
    grid = small(edit_data=["counterfact:cf.json"], n_edits=[8])
    first = build_plan(grid_from_dict(grid, base_dir=tmp_path))
    patch = first.stages[first.cells[0].stages["patch"]]
    check_data_digest(patch.spec.requests.data, patch.spec.requests.digest)   # unchanged: fine
    data.write_text("[2]")
    with pytest.raises(DataError, match="changed since this grid was planned"):
        check_data_digest(patch.spec.requests.data, patch.spec.requests.digest)
    second = build_plan(grid_from_dict(grid, base_dir=tmp_path))
    changed = set(first.stages) ^ set(second.stages)
    assert {first.stages.get(s, second.stages.get(s)).kind for s in changed} == {"targets", "patch", "evaluate",
                                                                                 "finetune", "cell"}
    assert not any(s.kind == "finetune" and s.spec.patch is None for s in
                   (first.stages.get(x) or second.stages[x] for x in changed))          # M_f does not read edit data


@pytest.mark.parametrize("name", ["./models/tiny", "models/tiny/v2", "~/no-such-model-dir-for-editdecay"])
def test_a_path_that_does_not_exist_is_a_missing_model_directory_not_a_hub_id(tmp_path, name):
    # One rule (core.paths.looks_like_path) tells paths from hub ids, for planning as for loading.
    from editdecay.grid.plan import missing_files

    plan = build_plan(grid_from_dict(small(models=[{"name": name, "family": "llama"}], n_edits=[0]), base_dir=tmp_path))
    warnings = missing_files(plan)
    assert len(warnings) == 1 and warnings[0].startswith("model directory /") and "does not exist" in warnings[0]


def test_an_unknown_cell_id_names_the_closest_one_and_where_the_ids_are_listed():
    plan = build_plan(load_grid(DEMO))
    real = plan.cells[0].id
    with pytest.raises(ConfigError) as err:
        plan.cell(real[:-2] + "zz")
    assert repr(real) in str(err.value) and "grid plan" in str(err.value)


def test_grid_run_refuses_unknown_cell_ids_before_it_writes_anything(tmp_path):
    """Every unknown id is named, a bare settings hash names its cell, and the output directory stays untouched."""
    from editdecay.cli import _register, app

    _register()
    plan = build_plan(load_grid(DEMO))
    real = plan.cells[0].id
    with pytest.raises(ConfigError) as err:
        plan.check_cells([real, "nope-1", real.rsplit("-", 1)[1]])
    msg = str(err.value)
    assert "'nope-1'" in msg and f"did you mean {real!r}" in msg and msg.startswith("cells ")
    plan.check_cells([real])                                        # a known id passes
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["grid", "run", str(DEMO), "--out", str(out), "--cell", "x-1", "--cell", "y-2"])
    assert res.exit_code != 0 and "'x-1'" in res.output and "'y-2'" in res.output and "Traceback" not in res.output
    assert not out.exists()
