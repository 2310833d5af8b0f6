"""A grid cell carries the study's protocol measures: the knowledge control on M0, M_e, M_f and M_ef (never
overlapping the cell's edits), the knowledge flip ratios beside the EFR with the per-cell test, survival over
the decay-curve checkpoints, and the mechanism measure per edited layer; and the report shows them."""

from __future__ import annotations

import pytest
from support import ZSRE_SAMPLE
from support.grids import grid_dict, make_corpus
from support.models import save_tiny_model

from editdecay.grid.plan import build_plan
from editdecay.grid.runner import run_grid
from editdecay.grid.spec import grid_from_dict
from editdecay.grid.store import GridStore


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    w = {"model": root / "tiny-llama", "corpus": root / "corpus.txt", "cache": root / "cache"}
    save_tiny_model(w["model"])
    make_corpus(w["corpus"])
    d = grid_dict(w, n_edits=[4])
    d["recipes"][0]["layers"] = ["all"]
    d["shared"]["evaluation"]["n_control"] = 6
    plan = build_plan(grid_from_dict(d, base_dir=root))
    summary = run_grid(plan, root / "out", threads=1)
    assert not summary.failed, summary
    return {"plan": plan, "root": root, "result": GridStore(root / "out").read_result(plan.cells[0].id)}


def test_cell_has_the_knowledge_control_on_all_four_models(cell):
    r = cell["result"]
    control = r["control"]
    assert len(control) == 6 and all(set(x["known"]) == {"M0", "M_e", "M_f", "M_ef"} for x in control)
    edited = {x["case_id"] for x in r["requests"]}
    assert not edited & {x["case_id"] for x in control}
    selection = next(s.spec.requests for s in cell["plan"].stages.values() if s.kind == "patch")
    assert selection.data == f"zsre:{ZSRE_SAMPLE}" and selection.n == 4
    expected = selection.control(6)
    assert [x["case_id"] for x in control] == [q.case_id for q in expected]
    d = r["decay"]
    kfr, base = d["knowledge_flip_ratio"], d["knowledge_flip_ratio_base"]
    assert kfr["n_known"] == sum(x["known"]["M_e"] for x in control)
    assert kfr["n_flipped"] == sum(x["flipped"] for x in control)
    assert base["n_known"] == sum(x["known"]["M0"] for x in control)
    assert base["n_flipped"] == sum(x["flipped_base"] for x in control)
    assert d["edits_vs_known"]["n_edits"] == d["edit_flip_ratio"]["n_success_edited"]


def test_cell_has_survival_over_checkpoints_and_the_mechanism(cell):
    r = cell["result"]
    s = r["decay"]["survival"]
    assert [row["t"] for row in s["by_step"]] == [p["step"] for p in r["curve"]]
    assert s["n_at_risk"] == r["decay"]["edit_flip_ratio"]["n_success_edited"]
    assert "survival_control" in r["decay"]
    mech = r["mechanism"]
    assert set(mech["layers"]) == {"1", "2"} and all(v["trained"] for v in mech["layers"].values())
    assert set(mech["per_request"]) == {x["case_id"] for x in r["requests"]}


def test_grid_file_errors_name_the_field_before_any_model_work(tmp_path):
    from editdecay.core.errors import ConfigError

    w = {"model": tmp_path / "m", "corpus": tmp_path / "c.txt", "cache": tmp_path / "cache"}
    d = grid_dict(w)
    bad_task = {**d, "shared": {**d["shared"], "downstream": ["embedded", f"commonsense:{tmp_path}:boolk"]}}
    with pytest.raises(ConfigError, match=r"shared\.downstream.*'boolk' is not a commonsense task.*boolq"):
        grid_from_dict(bad_task, base_dir=tmp_path)
    bad_n = {**d, "shared": {**d["shared"], "evaluation": {"n_control": -1}}}
    with pytest.raises(ConfigError, match=r"n_control"):
        grid_from_dict(bad_n, base_dir=tmp_path)


def test_report_of_the_cell_has_the_pooled_control_row_and_the_figures(cell, tmp_path):
    from editdecay.report import build_report

    report = build_report(cell["root"] / "out", tmp_path / "report", frequencies=False, progress=False)
    control = next(t for t in report.tables if t.key == "knowledge_control")
    assert len(control.rows) == 2 and control.rows[-1][0] == "all cells (pooled)"
    kfr = cell["result"]["decay"]["knowledge_flip_ratio"]
    assert control.rows[0][5:8] == (kfr["n"], kfr["n_known"], kfr["n_flipped"]) and control.rows[-1][6] == kfr["n_known"]
    assert "all cells (pooled)" in (tmp_path / "report" / "report.html").read_text()
    assert {"knowledge_vs_edits.png", "survival_curves.png"} <= {p.name for p in (tmp_path / "report" / "figures").iterdir()}
