"""The study's tables (docs/PROTOCOL.md), computed from the per-request rows of each cell.

One function per table; each returns a `Table` of raw values. Scores are fractions
(shown as percent), every table carries its n: requests per cell, cells per group.
A planned cell without a usable result appears as `Missing(state)` wherever one of
its numbers would be, and group tables say how many cells they are missing.

Tables:
- edit_scores              ES/PS/NS before editing (M0), after editing (M_e) and after each fine-tuning recipe
                           (M_ef), one row per model x editor x data x n (the study's main table)
- cells                    every planned cell: state, scores, relative decrease, EFR, task accuracy
- relative_decrease_by_*   mean relative decrease (E7) by fine-tuning method, by model and by editor
- edit_flip_ratio          EFR per cell with its counts; edit_flip_ratio_pooled: by editor x method
- selective_layers         ES after editing / fine-tuning and downstream scores per trained-layer choice
- downstream               every downstream task and metric of M0, M_e, M_f, M_ef per cell
"""

from __future__ import annotations

from statistics import mean
from typing import Callable

from editdecay.report.analysis import AXIS_TITLES, EDIT_AXES, Analysis, axis, key_of
from editdecay.report.downstream import (
    is_held_out,
    downstream_score,
    downstream_scores,
    headline_key,
    is_error_metric,
    is_fraction,
    primary_metric,
)
from editdecay.report.records import MODELS, SCORE_ABBR, SCORES, CellRecord
from editdecay.report.table import Column, Missing, Table, make_table


def _missing(cell: CellRecord) -> Missing:
    return Missing(cell.state if cell.state != "done" else "missing")


def _axis_columns(names=EDIT_AXES) -> list[Column]:
    return [Column(AXIS_TITLES[n], "int" if n in ("n_edits", "seed") else "text") for n in names]


def _group(cells, names) -> dict[tuple, list[CellRecord]]:
    out: dict[tuple, list[CellRecord]] = {}
    for c in cells:
        out.setdefault(key_of(c, names), []).append(c)
    return out


# --------------------------------------------------------------------------- edit scores (study shape)


def edit_scores(a: Analysis) -> Table:
    recipes = [r for r in a.recipes() if any(str(axis(c, "recipe")) == r for c in a.edited_cells)]
    cols = _axis_columns() + [Column("requests", "int")]
    for stage in ("M0", "M_e"):
        cols += [Column(f"{stage} {SCORE_ABBR[s]}", "pct") for s in SCORES]
    for r in recipes:
        cols += [Column(f"{r} {SCORE_ABBR[s]}", "pct") for s in SCORES]
    rows = []
    for key, cells in _group(a.edited_cells, EDIT_AXES).items():
        done = [c for c in cells if a.m(c)]
        first = a.m(done[0]) if done else None
        row = list(key) + [first.n if first else Missing("missing")]
        for stage in ("M0", "M_e"):
            row += [first.scores[stage][s] if first else Missing("missing") for s in SCORES]
        by_recipe = {str(axis(c, "recipe")): c for c in cells}
        for r in recipes:
            cell = by_recipe.get(r)
            if cell is None:
                row += [None] * len(SCORES)            # this recipe is not part of this row's grid
            elif a.m(cell) is None:
                row += [_missing(cell)] * len(SCORES)
            else:
                row += [a.m(cell).scores["M_ef"][s] for s in SCORES]
        rows.append(row)
    return make_table(
        "edit_scores", "Edit scores after editing and after fine-tuning",
        "Efficacy (ES), paraphrase (PS) and neighbourhood (NS) success in percent (E6), means over the requests "
        "of each edit: before editing (M0), after editing (M_e) and after each fine-tuning recipe (M_ef). "
        "`requests` is n. A recipe column marked failed/pending has no result for that cell.", cols, rows)


# --------------------------------------------------------------------------- all cells


def cells_table(a: Analysis) -> Table:
    cols = [Column("cell"), Column("state"), Column("requests", "int")]
    for s in SCORES:
        cols += [Column(f"{SCORE_ABBR[s]} M_e", "pct"), Column(f"{SCORE_ABBR[s]} M_ef", "pct")]
    cols += [Column(f"rel. decrease {SCORE_ABBR[s]}", "pct") for s in SCORES]
    cols += [Column("EFR", "pct"), Column("flipped", "int"), Column("succeeded after editing", "int"),
             Column("task acc. M_f", "pct"), Column("task acc. M_ef", "pct")]
    rows = []
    for c in a.cells:
        if not c.done:
            rows.append([c.label, c.state] + [_missing(c)] * (len(cols) - 2))
            continue
        m = a.m(c)
        key = headline_key(c.metrics("M_ef") or c.metrics("M_f"))
        task = [c.metrics("M_f").get(key), c.metrics("M_ef").get(key)]
        if m is None:       # a fine-tune-only cell: no edits, only downstream
            rows.append([c.label, c.state, 0] + [None] * (len(cols) - 5) + task)
            continue
        row = [c.label, c.state, m.n]
        for s in SCORES:
            row += [m.scores["M_e"][s], m.scores["M_ef"][s]]
        row += [m.relative_decrease[s] for s in SCORES]
        row += [m.efr.value, m.efr.n_flipped, m.efr.n_success_edited] + task
        rows.append(row)
    return make_table(
        "cells", "Every cell of the grid",
        "One row per planned cell. Scores in percent over the cell's requests (n = requests); relative decrease "
        "(S(M_e) - S(M_ef)) / S(M_e) (E7, negative when fine-tuning raised the score); EFR = flipped / succeeded "
        "after editing (E7); task acc.: the held-out task's headline score of M_f and M_ef (embedded task: exact "
        "match; chatterbot-choice: exact match; chatterbot: token accuracy).", cols, rows)


# --------------------------------------------------------------------------- relative decrease


def relative_decrease_by(a: Analysis, by: str) -> Table:
    """Mean over cells of the per-cell relative decrease, grouped by one axis (method, model_label, editor)."""
    title = AXIS_TITLES[by]
    cols = [Column(title), Column("cells", "int"), Column("cells missing", "int")]
    for s in SCORES:
        cols += [Column(f"{SCORE_ABBR[s]} mean rel. decrease", "pct"), Column(f"n {SCORE_ABBR[s]}", "int")]
    rows = []
    for (value,), cells in _group(a.edited_cells, (by,)).items():
        done = [a.m(c) for c in cells if a.m(c)]
        row = [value, len(done), len(cells) - len(done)]
        for s in SCORES:
            vals = [m.relative_decrease[s] for m in done if m.relative_decrease[s] is not None]
            row += [mean(vals) if vals else None, len(vals)]
        rows.append(row)
    return make_table(
        f"relative_decrease_by_{title.replace(' ', '_')}", f"Mean relative decrease by {title}",
        f"Per cell, relative decrease = (S(M_e) - S(M_ef)) / S(M_e) (E7); the table gives its mean over the cells of "
        f"each {title} in percent. n: cells with a defined value (S(M_e) > 0); `cells missing`: planned cells "
        f"without a result.", cols, rows)


# --------------------------------------------------------------------------- edit flip ratio


def edit_flip_ratio(a: Analysis) -> Table:
    names = ("model_label", "editor", "edit_data_label", "n_edits", "recipe")
    cols = _axis_columns(names) + [Column("requests", "int"), Column("succeeded after editing", "int"),
                                   Column("flipped", "int"), Column("EFR", "pct"), Column("recovered", "int")]
    rows = []
    for c in a.edited_cells:
        m = a.m(c)
        tail = ([m.n, m.efr.n_success_edited, m.efr.n_flipped, m.efr.value, m.efr.n_recovered] if m
                else [_missing(c)] * 5)
        rows.append(list(key_of(c, names)) + tail)
    return make_table(
        "edit_flip_ratio", "Edit Flip Ratio per cell",
        "EFR = |{i: success_i(M_e) and not success_i(M_ef)}| / |{i: success_i(M_e)}| (E7), success = efficacy >= "
        "0.5. `recovered`: requests that failed after editing and succeed after fine-tuning (not part of the EFR).",
        cols, rows)


def edit_flip_ratio_pooled(a: Analysis) -> Table:
    cols = [Column("editor"), Column("method"), Column("cells", "int"), Column("cells missing", "int"),
            Column("succeeded after editing", "int"), Column("flipped", "int"), Column("pooled EFR", "pct"),
            Column("mean cell EFR", "pct"), Column("n cell EFR", "int")]
    rows = []
    for (editor, method), cells in _group(a.edited_cells, ("editor", "method")).items():
        done = [a.m(c) for c in cells if a.m(c)]
        succ = sum(m.efr.n_success_edited for m in done)
        flipped = sum(m.efr.n_flipped for m in done)
        per_cell = [m.efr.value for m in done if m.efr.value is not None]
        rows.append([editor, method, len(done), len(cells) - len(done), succ, flipped,
                     flipped / succ if succ else None, mean(per_cell) if per_cell else None, len(per_cell)])
    return make_table(
        "edit_flip_ratio_pooled", "Edit Flip Ratio by editor and fine-tuning method",
        "Pooled EFR = all flipped requests / all requests that succeeded after editing, over the cells of the "
        "group; mean cell EFR = mean of the per-cell EFRs (n cell EFR cells with a defined EFR).", cols, rows)


# --------------------------------------------------------------------------- downstream


def _task_metrics(a: Analysis) -> list[tuple[str, str]]:
    """(task, primary metric) over all done cells, embedded first."""
    seen: dict[str, str] = {}
    for c in a.results.done:
        for model in MODELS:
            for task, ts in downstream_scores(c.metrics(model)).items():
                metric = primary_metric(ts)
                if metric and task not in seen:
                    seen[task] = metric
    return sorted(seen.items(), key=lambda kv: (not is_held_out(kv[0]), kv[0]))


def selective_layers(a: Analysis) -> Table:
    names = ("model_label", "editor", "edit_data_label", "n_edits", "method", "layers")
    tasks = _task_metrics(a)
    lm_eval = [t for t, _ in tasks if not is_held_out(t)]
    cols = _axis_columns(names) + [Column("requests", "int"), Column("ES M_e", "pct"), Column("ES M_ef", "pct"),
                                   Column("PS M_ef", "pct"), Column("NS M_ef", "pct"), Column("EFR", "pct")]
    cols += [Column(f"{task} {metric} M_ef", "pct" if is_fraction(metric) else "stat") for task, metric in tasks]
    if lm_eval:
        cols += [Column("downstream score M_ef", "pct"), Column("tasks in score", "int")]
    rows = []
    cells = sorted(a.edited_cells, key=lambda c: key_of(c, names[:5]))
    for c in cells:
        head = list(key_of(c, names))
        m = a.m(c)
        if m is None:
            rows.append(head + [_missing(c)] * (len(cols) - len(head)))
            continue
        ds = downstream_scores(c.metrics("M_ef"))
        vals = [ds[t].metrics.get(metric) if t in ds else None for t, metric in tasks]
        row = head + [m.n, m.scores["M_e"]["efficacy"], m.scores["M_ef"]["efficacy"], m.scores["M_ef"]["paraphrase"],
                      m.scores["M_ef"]["neighborhood"], m.efr.value] + vals
        if lm_eval:
            row += list(downstream_score(ds))
        rows.append(row)
    return make_table(
        "selective_layers", "Selective-layer fine-tuning: edit survival and downstream scores",
        "Which layers the recipe trained (all, the edited layers only, the non-edited layers only, or a list) "
        "against efficacy after editing and after fine-tuning, and the downstream scores of M_ef (each task's "
        "accuracy-like metric, else its first score; the downstream score is the mean `acc` over the lm-eval tasks "
        "that have one, as the study's). The embedded and chatterbot tasks are held-out splits of fine-tuning data "
        "(exact match, resp. token accuracy).", cols, rows)


def downstream_table(a: Analysis) -> Table:
    cols = [Column("cell"), Column("task"), Column("metric")] + [Column(m, "stat") for m in MODELS] + \
           [Column("n", "int")]
    rows = []
    for c in a.cells:
        if not c.done:
            rows.append([c.label, _missing(c), _missing(c)] + [_missing(c)] * (len(MODELS) + 1))
            continue
        per_model = {m: downstream_scores(c.metrics(m)) for m in MODELS}
        tasks = sorted({t for d in per_model.values() for t in d}, key=lambda t: (not is_held_out(t), t))
        for task in tasks:
            metrics = list(dict.fromkeys(k for d in per_model.values() if task in d for k in d[task].metrics))
            metrics.sort(key=is_error_metric)
            n = next((d[task].n for d in per_model.values() if task in d and d[task].n is not None), None)
            for metric in metrics:
                rows.append([c.label, task, metric] +
                            [per_model[m][task].metrics.get(metric) if task in per_model[m] else None for m in MODELS]
                            + [n])
    return make_table(
        "downstream", "Downstream scores",
        "Every downstream task and metric in the results, under M0 (base), M_e (edited), M_f (fine-tuned base) "
        "and M_ef (edited, then fine-tuned); n = evaluated examples per task. `embedded` is the generated "
        "fine-tuning task's held-out split (exact match); other tasks come from lm-eval.", cols, rows)


TABLES: dict[str, Callable[[Analysis], Table]] = {
    "edit_scores": edit_scores,
    "cells": cells_table,
    "relative_decrease_by_method": lambda a: relative_decrease_by(a, "method"),
    "relative_decrease_by_model": lambda a: relative_decrease_by(a, "model_label"),
    "relative_decrease_by_editor": lambda a: relative_decrease_by(a, "editor"),
    "edit_flip_ratio": edit_flip_ratio,
    "edit_flip_ratio_pooled": edit_flip_ratio_pooled,
    "selective_layers": selective_layers,
    "downstream": downstream_table,
}


def all_tables(a: Analysis) -> list[Table]:
    return [fn(a) for fn in TABLES.values()]


__all__ = ["TABLES", "all_tables", "cells_table", "downstream_table", "edit_flip_ratio", "edit_flip_ratio_pooled",
           "edit_scores", "relative_decrease_by", "selective_layers"]
