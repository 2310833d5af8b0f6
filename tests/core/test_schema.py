"""The result schema (core/schema.py): every writer validates, the report reads through it, and results written
by earlier code still read: tests/fixtures/results_v1 (commit 078c92f, before the schema was typed) and
tests/fixtures/results_v2 (commit 177c9d7: untyped grid stage configs, models named pre/post/finetuned)."""

from __future__ import annotations

import json

import pytest
from support import RESULTS_V1, RESULTS_V2

from editdecay.core.results import write_result
from editdecay.core.schema import (
    SCHEMA_VERSION,
    CellResult,
    EditResult,
    FinetuneResult,
    ResultSchemaError,
    read_result,
    validate_result,
)
from editdecay.report.analysis import analyse
from editdecay.report.records import load_results
from editdecay.report.tables import all_tables

V1 = RESULTS_V1
V2 = RESULTS_V2


def test_results_written_before_the_schema_still_read():
    edit = read_result(V1 / "edit" / "result.json", kind="edit")
    assert isinstance(edit, EditResult) and edit.schema_version == 1
    # the models are read under the names every result uses now: pre/post/finetuned -> M0/M_e/M_ef
    assert edit.metrics["M_e"].n == 3 and [r.case_id for r in edit.requests] == ["zsre-0", "zsre-1", "zsre-2"]
    ft = read_result(V1 / "finetune" / "result.json")
    assert isinstance(ft, FinetuneResult) and ft.status == "done" and set(ft.metrics) == {"M0", "M_e", "M_ef"}
    cells = [read_result(p, kind="grid-cell") for p in sorted((V1 / "grid" / "results").glob("*.json"))]
    assert all(isinstance(c, CellResult) for c in cells)
    assert sorted(len(c.requests) for c in cells) == [0, 4]


def test_a_grid_directory_written_before_the_schema_still_reports():
    rs = load_results(V1 / "grid")
    assert rs.plan_found and [c.state for c in rs.cells] == ["done", "done"]
    edited = [c for c in rs.cells if c.requests]
    assert len(edited) == 1 and len(edited[0].requests) == 4
    rows = json.loads(next((V1 / "grid" / "results").glob("*n4*")).read_text())["requests"]
    assert [r.case_id for r in edited[0].requests] == [r["case_id"] for r in rows]
    assert [r.margin["M_ef"] for r in edited[0].requests] == [r["margin"]["M_ef"] for r in rows]
    tables = all_tables(analyse(rs))
    assert tables, "the report's tables are built from the old results"


def _edit_result() -> dict:
    return json.loads((V1 / "edit" / "result.json").read_text())


def test_writers_validate_and_write_nothing_on_a_schema_fault(tmp_path):
    good = _edit_result()
    out = write_result(tmp_path / "ok.json", good)
    assert json.loads(out.read_text())["schema_version"] == SCHEMA_VERSION
    assert list(json.loads(out.read_text()))[0] == "schema_version"
    bad = _edit_result()
    del bad["metrics"]["post"]["n"]
    with pytest.raises(ResultSchemaError, match=r"metrics\.M_e\.n: required field is missing"):
        write_result(tmp_path / "bad.json", bad)
    assert not (tmp_path / "bad.json").exists()
    bad = _edit_result()
    bad["metrics"]["post"]["efficacy"] = 1.5
    with pytest.raises(ResultSchemaError, match=r"metrics\.M_e\.efficacy.*not a fraction"):
        write_result(tmp_path / "bad.json", bad)


@pytest.mark.parametrize("change, message", [
    ({"schema_version": SCHEMA_VERSION + 1}, "newer than this editdecay reads"),
    ({"kind": "edits"}, "kind 'edits' is not a result kind"),
    ({"requests": [{"pre": {}, "post": {}}]}, r"requests\[0\]\.case_id: required field is missing"),
])
def test_bad_results_are_refused_naming_the_field(change, message):
    with pytest.raises(ResultSchemaError, match=message):
        validate_result({**_edit_result(), **change}, where="x.json")


def test_a_cell_row_without_every_model_is_refused():
    path = next((V1 / "grid" / "results").glob("*n4*"))
    cell = json.loads(path.read_text())
    del cell["requests"][1]["M_f"]
    with pytest.raises(ResultSchemaError, match=r"requests\[1\].*no outcome for model 'M_f'"):
        validate_result(cell, kind="grid-cell")
    cell = json.loads(path.read_text())
    cell["requests"] = []
    with pytest.raises(ResultSchemaError, match="n_edits=4 but 'requests' is empty"):
        validate_result(cell)


def test_results_of_the_untyped_stage_configs_still_read_under_the_model_names():
    edit = read_result(V2 / "edit" / "result.json", kind="edit")
    assert edit.schema_version == 2 and set(edit.metrics) == {"M0", "M_e"}
    assert all(r.M0["case_id"] == r.M_e["case_id"] == r.case_id for r in edit.requests)
    ft = read_result(V2 / "finetune" / "result.json", kind="finetune").model_dump()
    assert set(ft["metrics"]) == {"M0", "M_e", "M_ef"} and ft["models"] == {"before": "M_e", "after": "M_ef"}
    row = ft["requests"][0]
    assert {"M0", "M_e", "M_ef"} <= set(row) and set(row["success"]) == {"M_e", "M_ef"} and "success_post" not in row
    # the grid's fine-tuning runs: M_f (base model) and M_ef (a patch applied before the run)
    runs = {json.loads(p.read_text())["extra"].get("patch") is not None: read_result(p).model_dump()
            for p in (V2 / "grid" / "stages").glob("finetune-*/run/result.json")}
    assert set(runs[False]["metrics"]) == {"M0", "M_f"} and set(runs[True]["metrics"]) == {"M_e", "M_ef"}


def test_a_grid_directory_of_the_untyped_stage_configs_still_reports():
    rs = load_results(V2 / "grid")
    assert rs.plan_found and [c.state for c in rs.cells] == ["done", "done"] and not rs.stray_results
    edited = [c for c in rs.cells if c.requests]
    rows = json.loads(next((V2 / "grid" / "results").glob("*n4*")).read_text())["requests"]
    assert len(edited) == 1 and [r.case_id for r in edited[0].requests] == [r["case_id"] for r in rows]
    assert [r.margin["M_ef"] for r in edited[0].requests] == [r["margin"]["M_ef"] for r in rows]
    assert edited[0].result["cell_schema_version"] == 1
    assert all_tables(analyse(rs)), "the report's tables are built from the results of the untyped stage configs"
