"""A results directory written by editdecay before the typed stage specs (tests/fixtures/results_v2/grid:
plan format 1, untyped stage configs) is run again with this version: every stage is computed anew, nothing
of the old directory is reused or mixed into the new cells, and the report shows the new cells only."""

from __future__ import annotations

import json
import shutil

import yaml
from support import COUNTERFACT_SMALL, RESULTS_V2
from support.grids import make_corpus
from support.models import save_tiny_model

from editdecay.grid.plan import PLAN_FORMAT, build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import load_grid
from editdecay.grid.store import GridStore

V2 = RESULTS_V2 / "grid"


def test_an_older_grid_directory_is_recomputed_not_mixed(tmp_path, caplog):
    from editdecay.report.records import load_results

    out = tmp_path / "out"
    shutil.copytree(V2, out)
    old_plan = json.loads((out / "plan.json").read_text())
    old_stages = {s["id"] for s in old_plan["stages"]}
    old_cells = {c["id"] for c in old_plan["cells"]}
    grid = yaml.safe_load((V2 / "grid.yaml").read_text())          # the same grid, on this machine's files
    grid["models"][0]["name"] = str(save_tiny_model(tmp_path / "model"))
    grid["edit_data"] = [f"counterfact:{COUNTERFACT_SMALL}"]
    grid["n_edits"] = [0, 3]            # its 3 usable records (a count the data cannot give fails the cell)
    make_corpus(tmp_path / "corpus.txt")
    grid["shared"].update(cache_dir=str(tmp_path / "cache"), statistics={**grid["shared"]["statistics"],
                                                                           "corpus": str(tmp_path / "corpus.txt")})
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    plan = build_plan(load_grid(tmp_path / "grid.yaml"))
    assert not set(plan.stages) & old_stages and not {c.id for c in plan.cells} & old_cells

    summary = run_grid(plan, out, threads=1)
    assert summary.cells["done"] == 2 and summary.stages["computed"] == len(plan.stages)
    assert summary.stages["reused"] == 0
    assert "planned by another version of editdecay" in caplog.text
    assert json.loads((out / "plan.json").read_text())["format"] == PLAN_FORMAT
    store = GridStore(out)
    for cell in plan.cells:
        result = store.read_result(cell.id)
        assert result["cell_schema_version"] == 2 and set(result["stages"]) == set(cell.stages) - {"cell"}
        assert {info["id"] for info in result["stages"].values()} <= set(plan.stages)   # no stage of the old plan
    report = load_results(out)
    assert {c.id for c in report.cells} == {c.id for c in plan.cells}
    assert set(report.stray_results) == old_cells and "not reported" in " ".join(report.notes)

