"""The three numbers a reader wants first: efficacy after editing, efficacy after fine-tuning, Edit Flip Ratio.

`headline(a)` pools the done cells with edits: ES (docs/METHODS.md E6) of M_e and of M_ef as the mean over
all (cell, request) rows, with n = rows (and cells); the Edit Flip Ratio (E7) pooled as flipped / succeeded
after editing over those rows, with both counts. Per-cell lines follow when there are few cells. Printed at
the end of `editdecay report` (and so of `make demo`); the same numbers are in the report's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from editdecay.report.analysis import Analysis

MAX_CELL_LINES = 12


@dataclass(frozen=True)
class Headline:
    n_cells: int
    n_rows: int                   # (cell, request) rows
    es_edited: float | None       # mean efficacy of M_e over the rows (fraction)
    es_finetuned: float | None    # mean efficacy of M_ef over the rows (fraction)
    n_success_edited: int         # rows that succeeded after editing (the EFR's denominator)
    n_flipped: int                # of those, rows that fail after fine-tuning

    @property
    def efr(self) -> float | None:
        return self.n_flipped / self.n_success_edited if self.n_success_edited else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def headline(a: Analysis) -> tuple[Headline, list[tuple[str, Headline]]]:
    """(pooled over done cells with edits, [(cell label, that cell's numbers)])."""
    per_cell = []
    for c in a.edited_cells:
        m = a.m(c)
        if m is None:
            continue
        per_cell.append((c.label, Headline(1, m.n, m.scores["M_e"]["efficacy"], m.scores["M_ef"]["efficacy"],
                                           m.efr.n_success_edited, m.efr.n_flipped)))
    rows = sum(h.n_rows for _, h in per_cell)

    def pooled(get):
        vals = [(get(h), h.n_rows) for _, h in per_cell if get(h) is not None]
        n = sum(k for _, k in vals)
        return sum(v * k for v, k in vals) / n if n else None

    total = Headline(len(per_cell), rows, pooled(lambda h: h.es_edited), pooled(lambda h: h.es_finetuned),
                     sum(h.n_success_edited for _, h in per_cell), sum(h.n_flipped for _, h in per_cell))
    return total, per_cell


def headline_lines(a: Analysis) -> list[str]:
    """Plain-text lines: the pooled numbers with their n, then one line per cell (at most MAX_CELL_LINES)."""
    total, per_cell = headline(a)
    if not per_cell:
        return ["no cell with edits has a result yet: no efficacy or Edit Flip Ratio to show"]
    lines = [f"ES after editing (M_e): {_pct(total.es_edited)}   ES after fine-tuning (M_ef): "
             f"{_pct(total.es_finetuned)}   (n = {total.n_rows} (cell, request) rows in {total.n_cells} cells)",
             f"Edit Flip Ratio: {_pct(total.efr)} ({total.n_flipped} of {total.n_success_edited} edits that succeeded "
             f"after editing fail after fine-tuning)"]
    if total.n_success_edited and total.n_flipped == 0:
        lines.append("no edit was erased by fine-tuning in these cells")
    if len(per_cell) > 1:
        for label, h in per_cell[:MAX_CELL_LINES]:
            lines.append(f"  {label}: ES {_pct(h.es_edited)} -> {_pct(h.es_finetuned)} (n={h.n_rows}), EFR "
                         f"{_pct(h.efr)} ({h.n_flipped}/{h.n_success_edited})")
        if len(per_cell) > MAX_CELL_LINES:
            lines.append(f"  ... {len(per_cell) - MAX_CELL_LINES} more cells in the report")
    return lines


__all__ = ["Headline", "headline", "headline_lines"]
