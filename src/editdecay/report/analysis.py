"""A loaded results directory plus the E7 measures of each cell: what tables, tests and figures read.

Built once per report (`analyse`), so every table works from the same recomputed
numbers, and the consistency warnings (stored vs recomputed) are collected in one
place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from editdecay.report.downstream import downstream_score, downstream_scores
from editdecay.report.measures import CellMeasures, cell_measures, check_stored
from editdecay.report.records import MODELS, CellRecord, ResultsSet

# Axes that identify one edit (the same patch, hence the same requests) apart from the fine-tuning recipe.
EDIT_AXES = ("model_label", "editor", "edit_data_label", "n_edits", "finetune_data_label", "seed")
AXIS_TITLES = {"model_label": "model", "editor": "editor", "edit_data_label": "data", "n_edits": "n",
               "finetune_data_label": "ft data", "seed": "seed", "recipe": "recipe", "method": "method",
               "layers": "layers"}


def axis(cell: CellRecord, name: str):
    """An axis value for display and grouping (lists joined; model/data labels fall back to names)."""
    a = cell.axes
    value = a.get(name)
    if value is None and name.endswith("_label"):
        value = a.get(name[: -len("_label")])
    if isinstance(value, (list, tuple)):
        return "L" + "-".join(map(str, value))
    return value


def key_of(cell: CellRecord, names=EDIT_AXES) -> tuple:
    return tuple(axis(cell, n) for n in names)


@dataclass(frozen=True)
class Analysis:
    results: ResultsSet
    measures: Mapping[str, CellMeasures]          # cell id -> measures (done cells with edits)
    warnings: tuple[str, ...]                     # stored numbers that disagree with the request rows

    @property
    def cells(self) -> tuple[CellRecord, ...]:
        return self.results.cells

    @property
    def edited_cells(self) -> tuple[CellRecord, ...]:
        """Every planned cell with edits, whatever its state."""
        return tuple(c for c in self.cells if c.has_edits)

    def recipes(self) -> list[str]:
        """Recipe labels in plan order."""
        return list(dict.fromkeys(str(axis(c, "recipe")) for c in self.cells))

    def m(self, cell: CellRecord) -> CellMeasures | None:
        return self.measures.get(cell.id)


def analyse(results: ResultsSet) -> Analysis:
    measures, warnings = {}, []
    for cell in results.edited_done:
        m = cell_measures(cell.requests)
        measures[cell.id] = m
        warnings += check_stored(cell, m)
    # The stored downstream score (mean acc over lm-eval tasks) must be the mean of the stored task scores.
    for cell in results.done:
        for model in MODELS:
            stored = cell.metrics(model).get("downstream_score")
            mine = downstream_score(downstream_scores(cell.metrics(model)))[0]
            if stored is not None and (mine is None or abs(stored - mine) > 1e-9):
                warnings.append(f"{cell.label}: metrics.{model}.downstream_score = {stored!r} but the mean acc of "
                                f"its lm-eval tasks is {mine!r}")
    # Cells of the same edit share M0 and M_e: their scores must agree (the same patch, measured before training).
    groups: dict[tuple, list[CellRecord]] = {}
    for cell in results.edited_done:
        groups.setdefault(key_of(cell), []).append(cell)
    for cells in groups.values():
        first = measures[cells[0].id]
        for other in cells[1:]:
            for model in ("M0", "M_e"):
                if measures[other.id].scores[model] != first.scores[model]:
                    warnings.append(f"{other.label}: {model} scores {dict(measures[other.id].scores[model])} differ "
                                    f"from those of {cells[0].label} ({dict(first.scores[model])}), which has the "
                                    f"same edit")
    return Analysis(results, measures, tuple(warnings))


__all__ = ["AXIS_TITLES", "Analysis", "EDIT_AXES", "analyse", "axis", "key_of"]
