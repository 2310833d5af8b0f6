"""`editdecay report` tables from a results directory built by hand with known per-request outcomes.

The grid (model "tiny", data "cf", 4 edits r1..r4, fine-tuning data "embedded", seed 0):

    A  memit     lora-all     done
    B  memit     full-all     done     (same patch as A: same M0 and M_e)
    C  alphaedit lora-all     done
    D  alphaedit full-all     failed   (its M_ef fine-tuning stage failed)
    E  memit     lora-edited  pending  (never ran)
    F  -         lora-all     done     (n_edits = 0: downstream only)

Every expected number below is worked out by hand from the outcomes in `OUTCOMES`.
"""

from __future__ import annotations

import json
import math

import pytest
from support.results import CELLS, build_results_dir, cell_label

from editdecay.grid.store import GridStore
from editdecay.report import build_report, load_results
from editdecay.report import tables as T
from editdecay.report.analysis import analyse
from editdecay.report.significance import paired_comparisons, significance_table
from editdecay.report.survival import request_frame, survival_requests, survival_summary
from editdecay.report.table import Missing


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    cells = build_results_dir(root)
    return {"root": root, "cells": cells, "analysis": analyse(load_results(root))}


def rows(table) -> list[list]:
    return [list(r) for r in table.rows]


def approx_rows(got: list[list], want: list[list]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert len(g) == len(w), (g, w)
        for x, y in zip(g, w):
            if isinstance(y, float) and not isinstance(x, Missing) and x is not None:
                assert x == pytest.approx(y, abs=1e-12), (g, w)
            else:
                assert x == y, (g, w)


def test_loading_states_and_missing_cells(hand):
    a = hand["analysis"]
    states = {c.label: c.state for c in a.cells}
    assert states == {cell_label(n): CELLS[n][5] for n in CELLS}
    failed = next(c for c in a.cells if c.state == "failed")
    assert failed.error == "NonFiniteError: loss is nan" and failed.failed_kind == "finetune"
    assert failed.failed_stage == "finetune-D"
    assert a.warnings == ()          # stored aggregates agree with the rows
    from editdecay.report.build import missing_table

    assert rows(missing_table(a)) == [
        [cell_label("D"), "failed", "finetune", "finetune-D", "NonFiniteError: loss is nan"],
        [cell_label("E"), "pending", None, None, "not run yet"]]


def test_edit_flip_ratio_exact(hand):
    a = hand["analysis"]
    efr = T.edit_flip_ratio(a)
    head = ["tiny", "memit", "cf", 4]
    assert rows(efr) == [
        head + ["lora-all", 4, 3, 1, 1 / 3, 1],           # r2 flipped, r4 recovered
        head + ["full-all", 4, 3, 2, 2 / 3, 0],           # r1, r2 flipped
        ["tiny", "alphaedit", "cf", 4, "lora-all", 4, 4, 0, 0.0, 0],
        ["tiny", "alphaedit", "cf", 4, "full-all"] + [Missing("failed")] * 5,
        head + ["lora-edited"] + [Missing("pending")] * 5]
    pooled = T.edit_flip_ratio_pooled(a)
    assert rows(pooled) == [
        ["memit", "lora", 1, 1, 3, 1, 1 / 3, 1 / 3, 1],
        ["memit", "full", 1, 0, 3, 2, 2 / 3, 2 / 3, 1],
        ["alphaedit", "lora", 1, 0, 4, 0, 0.0, 0.0, 1],
        ["alphaedit", "full", 0, 1, 0, 0, None, None, 0]]


def test_edit_scores_in_the_study_shape(hand):
    t = T.edit_scores(hand["analysis"])
    assert t.names[:7] == ["model", "editor", "data", "n", "ft data", "seed", "requests"]
    assert t.names[7:] == [f"{g} {s}" for g in ("M0", "M_e", "lora-all", "full-all", "lora-edited")
                           for s in ("ES", "PS", "NS")]
    head = ["tiny", "memit", "cf", 4, "embedded", 0, 4]
    approx_rows(rows(t), [
        head + [0.0, 0.125, 0.875, 0.75, 0.625, 0.75, 0.75, 0.5, 0.875, 0.25, 0.125, 1.0] + [Missing("pending")] * 3,
        ["tiny", "alphaedit", "cf", 4, "embedded", 0, 4, 0.0, 0.125, 0.875, 1.0, 0.75, 0.875, 1.0, 0.75, 1.0]
        + [Missing("failed")] * 3 + [None] * 3])


def test_cells_table(hand):
    t = T.cells_table(hand["analysis"])
    assert t.names == ["cell", "state", "requests", "ES M_e", "ES M_ef", "PS M_e", "PS M_ef", "NS M_e", "NS M_ef",
                       "rel. decrease ES", "rel. decrease PS", "rel. decrease NS", "EFR", "flipped",
                       "succeeded after editing", "task acc. M_f", "task acc. M_ef"]
    approx_rows(rows(t), [
        [cell_label("A"), "done", 4, 0.75, 0.75, 0.625, 0.5, 0.75, 0.875, 0.0, 0.2, -1 / 6, 1 / 3, 1, 3, 0.5, 0.4],
        [cell_label("B"), "done", 4, 0.75, 0.25, 0.625, 0.125, 0.75, 1.0, 2 / 3, 0.8, -1 / 3, 2 / 3, 2, 3, 0.6, 0.6],
        [cell_label("C"), "done", 4, 1.0, 1.0, 0.75, 0.75, 0.875, 1.0, 0.0, 0.0, -1 / 7, 0.0, 0, 4, 0.5, 0.3],
        [cell_label("D"), "failed"] + [Missing("failed")] * 15,
        [cell_label("E"), "pending"] + [Missing("pending")] * 15,
        [cell_label("F"), "done", 0] + [None] * 12 + [0.5, None]])


def test_mean_relative_decrease_by_method_model_editor(hand):
    a = hand["analysis"]
    cols = ["cells", "cells missing", "ES mean rel. decrease", "n ES", "PS mean rel. decrease", "n PS",
            "NS mean rel. decrease", "n NS"]
    t = T.relative_decrease_by(a, "method")
    assert t.key == "relative_decrease_by_method" and t.names == ["method"] + cols
    approx_rows(rows(t), [["lora", 2, 1, 0.0, 2, 0.1, 2, (-1 / 6 - 1 / 7) / 2, 2],
                          ["full", 1, 1, 2 / 3, 1, 0.8, 1, -1 / 3, 1]])
    approx_rows(rows(T.relative_decrease_by(a, "editor")),
                [["memit", 2, 1, 1 / 3, 2, 0.5, 2, -0.25, 2], ["alphaedit", 1, 1, 0.0, 1, 0.0, 1, -1 / 7, 1]])
    approx_rows(rows(T.relative_decrease_by(a, "model_label")),
                [["tiny", 3, 2, 2 / 9, 3, 1 / 3, 3, (-1 / 6 - 1 / 3 - 1 / 7) / 3, 3]])


def test_selective_layers_with_downstream(hand):
    t = T.selective_layers(hand["analysis"])
    assert t.names == ["model", "editor", "data", "n", "method", "layers", "requests", "ES M_e", "ES M_ef", "PS M_ef",
                       "NS M_ef", "EFR", "embedded accuracy M_ef", "boolq acc M_ef", "wikitext word_perplexity M_ef",
                       "downstream score M_ef", "tasks in score"]
    # accuracies in percent; a perplexity is shown as it is and never averaged into the downstream score
    assert [c.kind for c in t.columns[12:]] == ["pct", "pct", "stat", "pct", "int"]
    approx_rows(rows(t), [
        ["tiny", "alphaedit", "cf", 4, "full", "all"] + [Missing("failed")] * 11,
        ["tiny", "alphaedit", "cf", 4, "lora", "all", 4, 1.0, 1.0, 0.75, 1.0, 0.0, 0.3, None, None, None, 0],
        ["tiny", "memit", "cf", 4, "full", "all", 4, 0.75, 0.25, 0.125, 1.0, 2 / 3, 0.6, None, None, None, 0],
        ["tiny", "memit", "cf", 4, "lora", "all", 4, 0.75, 0.75, 0.5, 0.875, 1 / 3, 0.4, 0.6, 30.5, 0.6, 1],
        ["tiny", "memit", "cf", 4, "lora", "edited"] + [Missing("pending")] * 11])


def test_downstream_table_shows_every_task_and_metric(hand):
    t = T.downstream_table(hand["analysis"])
    assert t.names == ["cell", "task", "metric", "M0", "M_e", "M_f", "M_ef", "n"]
    approx_rows(rows(t), [
        [cell_label("A"), "embedded", "accuracy", 0.1, 0.1, 0.5, 0.4, 10],
        [cell_label("A"), "boolq", "acc", None, None, 0.7, 0.6, 50],
        [cell_label("A"), "boolq", "acc_stderr", None, None, 0.04, 0.05, 50],
        [cell_label("A"), "wikitext", "word_perplexity", None, None, None, 30.5, 10],
        [cell_label("B"), "embedded", "accuracy", 0.1, 0.1, 0.6, 0.6, 10],
        [cell_label("C"), "embedded", "accuracy", 0.1, 0.1, 0.5, 0.3, 10],
        [cell_label("D")] + [Missing("failed")] * 7,
        [cell_label("E")] + [Missing("pending")] * 7,
        [cell_label("F"), "embedded", "accuracy", 0.1, None, 0.5, None, 10]])


def test_survival_tables(hand):
    frame = request_frame(hand["analysis"], None)
    assert len(frame) == 12
    t = survival_requests(frame, None)
    none5 = [None] * 5          # counts, per million (corpus method) and Zipf (wordfreq method): not computed
    approx_rows(rows(t), [
        ["tiny", "cf", "r1", None, 3, 3, 2, 2 / 3, 8 / 3, 1.0] + none5,
        ["tiny", "cf", "r2", None, 3, 3, 1, 1 / 3, 2.0, -1 / 3] + none5,
        ["tiny", "cf", "r3", None, 3, 3, 3, 1.0, 4 / 3, 7 / 6] + none5,
        ["tiny", "cf", "r4", None, 3, 1, 1, 1.0, 0.0, 0.25 / 3] + none5])
    s = survival_summary(frame, None)
    margin = s.records()[0]
    assert margin["quantity"] == "margin after editing (M_e)"
    assert (margin["n survived"], margin["n erased"]) == (7, 3)
    assert margin["survived mean"] == pytest.approx(13 / 7) and margin["erased mean"] == pytest.approx(7 / 3)
    assert margin["U"] == 6.5 and 0 < margin["p"] <= 1      # U counted by hand: 2.5 + 0 + 0 + 4 * 1.0
    assert all(r["n survived"] == 0 and r["p"] is None for r in s.records()[1:])   # no frequencies computed


def test_paired_tests(hand):
    a = hand["analysis"]
    t = significance_table(paired_comparisons(a))
    recs = t.records()

    def find(kind, config, quantity):
        (hit,) = [r for r in recs if r["comparison"] == kind and r["configuration"] == config
                  and r["quantity"].startswith(quantity)]
        return hit

    # A: M_e [1,1,1,0] vs M_ef [1,0,1,1]: one discordant pair each way -> p = 1
    r = find("fine-tuning", cell_label("A"), "success")
    assert (r["test"], r["statistic"], r["p"], r["n"]) == ("McNemar exact", 1.0, 1.0, 4)
    # B: b = 2, c = 0 -> p = 2 * 0.5**2
    r = find("fine-tuning", cell_label("B"), "success")
    assert (r["statistic"], r["p"], r["n"]) == (2.0, 0.5, 4)
    # A margins: differences 1, 3, 0.5, -1.25 -> W = 3 (negative ranks), exact p = 2 * 5/16
    r = find("fine-tuning", cell_label("A"), "margin")
    assert r["test"] == "Wilcoxon signed-rank" and r["statistic"] == 3.0 and r["p"] == pytest.approx(0.625)
    # recipes on the memit patch: survival A [1,0,1,0] vs B [0,0,1,0] -> b=1, c=0
    r = find("recipe", "tiny/memit/cf/4/embedded/0", "survival")
    assert (r["A"], r["B"], r["statistic"], r["p"], r["n"]) == ("lora-all", "full-all", 1.0, 1.0, 4)
    # editors with lora-all: survival A [1,0,1,0] vs C [1,1,1,1] -> b=0, c=2
    r = find("editor", "tiny/cf/4/lora-all/embedded/0", "survival")
    assert (r["A"], r["B"], r["statistic"], r["p"]) == ("memit", "alphaedit", 0.0, 0.5)
    # across cells: ES M_e [0.75, 0.75, 1] vs ES M_ef [0.75, 0.25, 1]: differences 0, 0.5, 0 -> t = 1, df = 2
    r = find("across cells", "all 3 cells with results", "efficacy")
    assert r["statistic"] == pytest.approx(1.0) and r["p"] == pytest.approx(2 * (1 - 0.7886751345948129)) \
        and r["n"] == 3
    # only one configuration matches memit with alphaedit (their full-all cell failed): no t-test
    r = find("across cells", "1 configurations matched on all but the editor", "ES relative")
    assert r["p"] is None and r["detail"] == "fewer than 2 pairs"


def test_stored_numbers_that_disagree_are_warnings(tmp_path):
    build_results_dir(tmp_path, corrupt=True)
    a = analyse(load_results(tmp_path))
    text = "\n".join(a.warnings)
    assert "decay.edit_flip_ratio.value = 0.5 but the request rows give 0.3333333333333333" in text
    assert "metrics.M_ef.efficacy = 0.5 but the mean of the request rows is 0.75" in text
    assert "metrics.M_ef.downstream_score = 0.65 but the mean acc of its lm-eval tasks is 0.6" in text
    assert len(a.warnings) == 3
    # the tables still use the request rows
    assert T.edit_flip_ratio(a).rows[0][8] == 1 / 3


def test_report_files_mark_missing_cells(hand, tmp_path):
    out = tmp_path / "report"
    report = build_report(hand["root"], out, frequencies=False, progress=False)
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).is_file()
    keys = {t.key for t in report.tables}
    from editdecay.report.protocol import TABLES as PROTOCOL_TABLES

    assert keys == set(T.TABLES) | {"survival_requests", "survival_summary", "significance"} | set(PROTOCOL_TABLES)
    assert {p.name for p in (out / "tables").iterdir()} == {f"{k}.csv" for k in keys | {"missing_cells"}}
    assert {p.name for p in (out / "figures").iterdir()} == {
        "decay_curves.png", "survival_heatmap.png", "editor_decay_by_n.png", "request_survival.png",
        "downstream.png", "knowledge_vs_edits.png", "survival_curves.png"}
    # Hand-written results have no protocol measures: the tables say "not measured", never zeros.
    control = next(t for t in report.tables if t.key == "knowledge_control")
    assert control.rows and all(str(v) in ("not measured", "failed", "pending", "invalid") for r in control.rows
                                for v in r[5:])
    html = (out / "report.html").read_text()
    assert 'data-missing="failed"' in html and 'data-missing="pending"' in html
    assert "NonFiniteError: loss is nan" in html and "http" not in html.replace("http-equiv", "")
    md = (out / "report.md").read_text()
    assert f"| {cell_label('D')} | failed | finetune | finetune-D | NonFiniteError: loss is nan |" in md
    data = json.loads((out / "report.json").read_text())
    assert data["cell_states"] == {"done": 4, "failed": 1, "running": 0, "pending": 1, "invalid": 0}
    efr = data["tables"]["edit_flip_ratio"]["rows"]
    assert efr[3][5:] == [{"missing": "failed"}] * 5 and math.isclose(efr[0][8], 1 / 3)


def test_unusable_result_is_invalid_and_no_plan_still_reports(tmp_path):
    cells = build_results_dir(tmp_path)
    store = GridStore(tmp_path)
    bad = store.result_path(cells["B"].id)
    r = json.loads(bad.read_text())
    del r["requests"][2]["success"]
    bad.write_text(json.dumps(r))
    a = analyse(load_results(tmp_path))
    b = next(c for c in a.cells if c.label == cell_label("B"))
    assert b.state == "invalid" and "requests[2].success: required field is missing" in b.error
    assert T.edit_flip_ratio(a).rows[1][5:] == (Missing("invalid"),) * 5
    # without plan.json: the cells with result files, and a note that others cannot be named
    store.plan_path.unlink()
    rs = load_results(tmp_path)
    assert not rs.plan_found and len(rs.cells) == 4 and "no plan.json" in rs.notes[0]


def test_target_counts_respect_sequence_boundaries():
    from editdecay.report.frequency import _stream

    s = _stream("toy", [[5, 6, 7, 5, 6], [1, 5], [6, 2]])
    assert s.n_tokens == 9
    assert s.count([[5, 6]]) == 2                   # not across the boundary between [1, 5] and [6, 2]
    assert s.count([[5, 6], [5, 6], [7]]) == 3      # a spelling given twice counts once
    assert s.count([[6, 7, 5, 6, 1]]) == 0
    assert s.per_million(3) == pytest.approx(1e6 * 3 / 9)


def test_activation_shift_geometry():
    import torch

    from editdecay.report.activation import shifts

    zero = torch.zeros(1, 2, 2)                                        # (prompts, layers, d)
    states = {"M0": zero, "M_e": torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]),
              "M_f": torch.tensor([[[0.0, 3.0], [0.0, 1.0]]]), "M_ef": torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])}
    states = {k: v + 1.0 for k, v in states.items()}                   # a common offset changes no displacement
    layer0, layer1 = shifts(states, "c", "edit")
    assert (layer0.layer, layer0.n, layer1.layer) == (0, 1, 1)
    assert layer0.l2 == {"M_e": 0.0, "M_f": 3.0, "M_ef": 3.0}
    assert layer0.cos[("M_ef", "M_e")] is None and layer0.cos[("M_ef", "M_f")] == pytest.approx(1.0)
    assert layer1.l2["M_ef"] == pytest.approx(2 ** 0.5)
    assert layer1.cos[("M_ef", "M_e")] == pytest.approx(2 ** -0.5)
    assert layer1.cos[("M_ef", "M_f")] == pytest.approx(2 ** -0.5)
    assert layer1.cos[("M_e", "M_f")] == pytest.approx(0.0)
