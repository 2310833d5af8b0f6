"""The scale settings in a grid: adaptive E1 (`shared.statistics.tolerance`), the optimiser fields of a recipe and
`shared.finetune_devices`. Unset, they leave every stage spec as it was (no new key, so no stage id changes);
set, they change the stages whose output they change and nothing else. No model is loaded."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from editdecay.grid.plan import build_plan
from editdecay.grid.spec import grid_from_dict

NEW_KEYS = {"tolerance", "stats_tolerance", "optimizer", "master_weights", "finetune_devices"}


def small(**shared) -> dict:
    return {"name": "small", "models": ["smollm2-135m"], "editors": ["memit", "alphaedit"],
            "edit_data": ["worldfacts"], "n_edits": [0, 8],
            "recipes": [{"method": ["lora", "full"], "layers": ["all", "edited"], "overrides": {"max_steps": 4}}],
            "shared": shared}


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_unset_scale_fields_leave_no_key_in_any_stage_spec():
    plan = build_plan(grid_from_dict(small()))
    assert not NEW_KEYS & _keys([s.config for s in plan.stages.values()])


def test_finetune_devices_is_how_a_stage_runs_not_what_it_computes():
    base = build_plan(grid_from_dict(small()))
    sharded = build_plan(grid_from_dict(small(finetune_devices=2)))
    assert list(sharded.stages) == list(base.stages)
    assert sharded.runtime["finetune_devices"] == 2 and base.runtime["finetune_devices"] == 1


def test_statistics_tolerance_changes_statistics_and_what_reads_them():
    base = build_plan(grid_from_dict(small()))
    adaptive = build_plan(grid_from_dict(small(statistics={"tolerance": 0.3})))
    kept = {base.stages[s].kind for s in set(adaptive.stages) & set(base.stages)}
    # M0 evaluations, M_f and E3 target values do not read the statistics; statistics, patches, M_ef and edited
    # cells do
    assert kept == {"targets", "evaluate", "finetune", "cell"}
    stats = [s.spec for s in adaptive.stages.values() if s.kind == "stats"]
    assert stats and all(s.statistics.tolerance == 0.3 for s in stats)
    patches = [s.spec for s in adaptive.stages.values() if s.kind == "patch"]
    assert all(p.editor.config["stats_tolerance"] == 0.3 for p in patches)


def test_recipe_optimizer_fields_change_only_fine_tuning_and_what_reads_it():
    d = small()
    d["recipes"][0]["overrides"].update(optimizer="adamw8bit", master_weights=False)
    base, changed = build_plan(grid_from_dict(small())), build_plan(grid_from_dict(d))
    assert {base.stages[s].kind for s in set(changed.stages) & set(base.stages)} == {"stats", "targets", "patch",
                                                                                     "evaluate"}
    recipe = next(s.spec.recipe for s in changed.stages.values() if s.kind == "finetune")
    assert (recipe.optimizer, recipe.master_weights) == ("adamw8bit", False)


def test_a_bad_tolerance_names_the_key():
    from editdecay.core.errors import ConfigError

    try:
        build_plan(grid_from_dict(small(statistics={"tolerance": 2})))
    except ConfigError as e:
        assert "tolerance" in str(e) and "2" in str(e)
    else:
        raise AssertionError("tolerance 2 was accepted")


def test_grid_plan_memory_plans_every_resolved_stage(tmp_path):
    """`grid plan --memory`: one plan per distinct edit and fine-tuning setting, from config.json only."""
    import yaml

    from editdecay.cli import _register, app

    _register()
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(small()))
    res = CliRunner().invoke(app, ["grid", "plan", str(path), "--memory", "80GB", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["memory"]
    assert {r["what"].split()[0] for r in rows} == {"edit", "fine-tune"}
    assert all(r["plan"] is not None and r["plan"]["fits"] for r in rows), rows
    tight = CliRunner().invoke(app, ["grid", "plan", str(path), "--memory", "200MB"])
    assert tight.exit_code == 0 and "DOES NOT FIT" in tight.output


def test_low_precision_full_fine_tuning_writes_its_master_weights_into_the_stage_spec():
    # Master weights became the default for bfloat16 full fine-tuning with AdamW: such a stage must not share an
    # id with one computed before (without them), so the plan writes the resolved value; float32 and LoRA keep theirs.
    d = small()
    d["models"] = [{"name": "smollm2-135m", "dtype": "bfloat16"}]
    bf16 = build_plan(grid_from_dict(d))
    recipes = [s.spec.recipe for s in bf16.stages.values() if s.kind == "finetune"]
    assert {(r.method, r.master_weights) for r in recipes} == {("full", True), ("lora", None)}
    fp32 = [s.spec.recipe for s in build_plan(grid_from_dict(small())).stages.values() if s.kind == "finetune"]
    assert {r.master_weights for r in fp32} == {None}
    d["recipes"][0]["overrides"]["master_weights"] = False
    off = [s.spec.recipe for s in build_plan(grid_from_dict(d)).stages.values() if s.kind == "finetune"]
    assert {r.master_weights for r in off} == {False}
