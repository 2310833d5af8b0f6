"""E7 decay measures of one cell, recomputed from its per-request rows, and checked against the stored ones.

Why recompute: the report's tables must be derivable from the per-request table
alone (a reader can redo every number from `requests`), and recomputing doubles
as a check of the pipeline: if the stored aggregate `metrics`/`decay` disagree
with the rows they were made from, something upstream is wrong, and the report
says so as a warning instead of silently printing either number.

Definitions (docs/METHODS.md E6/E7):
- S(M) for S in ES/PS/NS: the mean over requests of the per-request score under M
  (requests whose score is undefined, e.g. no paraphrase prompts, are left out).
- relative decrease of S: (S(M_e) - S(M_ef)) / S(M_e); undefined (None) when S(M_e) = 0.
- Edit Flip Ratio: |{i: success_i(M_e) and not success_i(M_ef)}| / |{i: success_i(M_e)}|;
  undefined when no request succeeded after editing. `success` is the stored per-request
  flag (efficacy >= 0.5, measure/decay.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean
from typing import Mapping, Sequence

from editdecay.measure.decay import EditFlip, edit_flip
from editdecay.measure.decay import relative_decrease_of as relative_decrease
from editdecay.report.records import MODELS, SCORES, CellRecord, RequestRecord

TOLERANCE = 1e-9      # stored and recomputed means agree to float rounding


@dataclass(frozen=True)
class CellMeasures:
    """What the tables need from one cell, computed from its request rows."""

    n: int
    scores: Mapping[str, Mapping[str, float | None]]         # model -> score -> mean (fraction)
    relative_decrease: Mapping[str, float | None]            # score -> fraction (negative: the score rose)
    efr: EditFlip
    mean_margin: Mapping[str, float | None]                  # model -> mean margin


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return mean(vals) if vals else None


def edit_flip_of(requests: Sequence[RequestRecord]) -> EditFlip:
    """E7 Edit Flip Ratio from the stored per-request success flags (measure.decay.edit_flip)."""
    return edit_flip((r.case_id, r.success["M_e"], r.success["M_ef"]) for r in requests)


def cell_measures(requests: Sequence[RequestRecord]) -> CellMeasures:
    scores = {m: {s: _mean(r.scores[m][s] for r in requests) for s in SCORES} for m in MODELS}
    rel = {s: relative_decrease(scores["M_e"][s], scores["M_ef"][s]) for s in SCORES}
    margins = {m: _mean(r.margin[m] for r in requests) for m in MODELS}
    return CellMeasures(len(requests), scores, rel, edit_flip_of(requests), margins)


def _differs(a, b) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return not math.isclose(float(a), float(b), rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def check_stored(cell: CellRecord, m: CellMeasures) -> list[str]:
    """Disagreements between the stored aggregates of `cell` and `m` (recomputed from its rows), as messages."""
    out = []
    result = cell.result or {}
    for model in MODELS:
        stored = cell.metrics(model)
        if not stored:
            continue
        if stored.get("n") is not None and stored["n"] != m.n:
            out.append(f"{cell.label}: metrics.{model}.n = {stored['n']} but the cell has {m.n} request rows")
        for s in SCORES:
            if s in stored and _differs(stored[s], m.scores[model][s]):
                out.append(f"{cell.label}: metrics.{model}.{s} = {stored[s]!r} but the mean of the request rows "
                           f"is {m.scores[model][s]!r}")
    decay = result.get("decay") or {}
    for s, value in (decay.get("relative_decrease") or {}).items():
        if s in m.relative_decrease and _differs(value, m.relative_decrease[s]):
            out.append(f"{cell.label}: decay.relative_decrease.{s} = {value!r} but the request rows give "
                       f"{m.relative_decrease[s]!r}")
    efr = decay.get("edit_flip_ratio") or {}
    for key, mine in (("value", m.efr.value), ("n_flipped", m.efr.n_flipped),
                      ("n_success_edited", m.efr.n_success_edited), ("n", m.efr.n)):
        if key in efr and _differs(efr[key], mine):
            out.append(f"{cell.label}: decay.edit_flip_ratio.{key} = {efr[key]!r} but the request rows give {mine!r}")
    threshold = efr.get("threshold", 0.5)
    for r in cell.requests:
        for model in MODELS:
            eff = r.scores[model]["efficacy"]
            if eff is not None and (eff >= threshold) != r.success[model]:
                out.append(f"{cell.label}: request {r.case_id}: success.{model} = {r.success[model]} but its "
                           f"efficacy {eff} is {'>=' if eff >= threshold else '<'} the threshold {threshold}")
        if r.flipped != (r.success["M_e"] and not r.success["M_ef"]):
            out.append(f"{cell.label}: request {r.case_id}: flipped = {r.flipped} disagrees with its success flags")
    return out


__all__ = ["CellMeasures", "EditFlip", "TOLERANCE", "cell_measures", "check_stored", "edit_flip_of",
           "relative_decrease"]
