"""Stage and cell ids do not depend on where a checkout lies (grid/plan.py `IdView`).

A grid whose model directory, edit data and statistics corpus lie beside it, copied to two places at different
depths, plans the same ids; the configs still hold absolute paths (a stage runs from any directory); a changed
data file changes the ids (its content digest is in the config)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from support.models import save_tiny_model

from editdecay.grid.plan import IdView, build_plan
from editdecay.grid.spec import load_grid

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _project(root: Path, model_dir: Path) -> Path:
    """A project folder: grids/g.yaml naming ../models/tiny, ../data/zsre.json and ../data/corpus.txt."""
    (root / "data").mkdir(parents=True)
    shutil.copy(FIXTURES / "zsre_sample.json", root / "data" / "zsre.json")
    (root / "data" / "corpus.txt").write_text("The capital of France is Paris.\n" * 20)
    shutil.copytree(model_dir, root / "models" / "tiny")
    grid = {"name": "ids", "models": ["../models/tiny"],
            "editors": [{"name": "memit", "overrides": {"layers": [1]}}],
            "edit_data": ["zsre:../data/zsre.json"], "n_edits": [3],
            "recipes": [{"method": "lora", "layers": "all", "overrides": {"max_steps": 1}}],
            "finetune_data": ["embedded"],
            "shared": {"statistics": {"corpus": "../data/corpus.txt", "tokens": 100}, "downstream": []}}
    (root / "grids").mkdir()
    (root / "grids" / "g.yaml").write_text(yaml.safe_dump(grid))
    return root / "grids" / "g.yaml"


def test_ids_do_not_depend_on_where_the_project_lies(tmp_path):
    model = save_tiny_model(tmp_path / "tiny-src")
    one = build_plan(load_grid(_project(tmp_path / "a", model)))
    two = build_plan(load_grid(_project(tmp_path / "b" / "deeper" / "still", model)))
    assert sorted(one.stages) == sorted(two.stages) and [c.id for c in one.cells] == [c.id for c in two.cells]
    assert {s.kind for s in one.stages.values()} >= {"stats", "patch", "finetune", "evaluate", "cell"}
    # the configs still name the files where they are
    patch = next(s for s in two.stages.values() if s.kind == "patch")
    assert str(tmp_path / "b" / "deeper" / "still" / "data" / "zsre.json") in str(patch.config)

    # different data, different ids
    (tmp_path / "b" / "deeper" / "still" / "data" / "zsre.json").write_text("[]")
    changed = build_plan(load_grid(tmp_path / "b" / "deeper" / "still" / "grids" / "g.yaml"))
    assert changed.cells[0].id != one.cells[0].id


def test_only_paths_the_grid_spells_relative_are_rewritten(tmp_path):
    from editdecay.grid.spec import grid_from_dict

    grid = grid_from_dict({"name": "v", "models": ["../models/tiny"], "editors": ["memit"],
                           "edit_data": ["zsre:../data/z.json", f"counterfact:{tmp_path}/elsewhere/cf.json"],
                           "n_edits": [3],
                           "recipes": [{"method": "lora"}], "finetune_data": ["embedded"]},
                          base_dir=tmp_path / "grids")
    view = IdView(grid)
    config = {"model": {"name": str(tmp_path / "models" / "tiny")},
              "data": [f"zsre:{tmp_path}/data/z.json", f"counterfact:{tmp_path}/elsewhere/cf.json", "worldfacts"],
              "near": f"zsre:{tmp_path}/data/z.json2", "label": "smollm2-135m/memit/zsre", "n": 3}
    assert view(config) == {"model": {"name": "@grid/../models/tiny"},
                            "data": ["zsre:@grid/../data/z.json", f"counterfact:{tmp_path}/elsewhere/cf.json",
                                     "worldfacts"],
                            "near": f"zsre:{tmp_path}/data/z.json2", "label": "smollm2-135m/memit/zsre", "n": 3}


def test_a_symlink_out_of_the_project_the_grid_dir_itself_and_absolute_paths_below_a_relative_one(tmp_path):
    """The helper-found cases: a data directory that is a symlink to somewhere else hashes as spelled (clones at
    different depths agree); `.` (the grid's own directory) is rewritten too; an absolute path inside a directory
    the grid spells relative is left alone, as is any string that merely mentions a relative word ('..')."""
    from editdecay.grid.spec import grid_from_dict

    shared = tmp_path / "elsewhere"
    shared.mkdir()
    views = []
    for where in (tmp_path / "a" / "grids", tmp_path / "b" / "c" / "d" / "grids"):
        where.mkdir(parents=True)
        (where / "shared").symlink_to(shared)
        grid = grid_from_dict({"name": "v", "description": "..", "models": ["."], "editors": ["memit"],
                               "edit_data": ["zsre:shared/z.json"], "n_edits": [3],
                               "recipes": [{"method": "lora"}], "finetune_data": ["embedded"],
                               "shared": {"cache_dir": "../data"}}, base_dir=where)
        view = IdView(grid)
        views.append(view({"data": f"zsre:{shared}/z.json", "model": str(where),
                           "inside": f"counterfact:{where.parent}/data/abs.json", "parent": str(where.parent)}))
    assert {k: v for k, v in views[0].items() if k != "inside"} == {k: v for k, v in views[1].items() if k != "inside"}
    assert views[0]["data"] == "zsre:@grid/shared/z.json" and views[0]["model"] == "@grid/."
    # the absolute path below `../data` is not rewritten; the bare parent '..' spelled in the description is
    assert views[0]["inside"].startswith(f"counterfact:{tmp_path}/a/") and views[0]["parent"] == "@grid/.."
