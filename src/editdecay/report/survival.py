"""Per-request survival analysis: which edits survive fine-tuning, and what sets them apart.

An edit survives a cell's fine-tuning when it succeeded after editing and still
succeeds after fine-tuning (E7); it is erased (flipped) when it succeeded after
editing and fails after fine-tuning. Requests that failed already after editing
are neither. For each (cell, request) pair the frame records survival, the margin
NLL(true) - NLL(new) after editing (how firmly the edit was written) and after
fine-tuning, and how frequent the target is (frequency.py): its Zipf frequency in English
(wordfreq, the default) or how often it occurs in the fine-tuning data and in the E1 statistics
corpus (the corpus method); the tables' notes name the method used. The study's observation to look
for: survivors have frequent targets and large margins, erased edits rare targets.

Tables:
- survival_requests: one row per edit request (model x data x case id), pooled over the cells that
  edited it: cells where it succeeded after editing, cells where it survived, its survival rate, mean
  margins and its target's frequency (Zipf, or counts and per million tokens);
- survival_summary: survivors vs erased (cell, request) pairs compared by margin after editing and by
  target frequency, with the Mann-Whitney U test (significance.py) and both group sizes.
"""

from __future__ import annotations

from statistics import mean

import pandas as pd

from editdecay.report.analysis import Analysis, axis
from editdecay.report.frequency import TargetFrequencies, method_description
from editdecay.report.significance import mann_whitney
from editdecay.report.table import Column, Table, make_table

AXES = ("model_label", "editor", "edit_data_label", "n_edits", "recipe", "method", "layers", "finetune_data_label",
        "seed")


def request_frame(a: Analysis, frequencies: TargetFrequencies | None) -> pd.DataFrame:
    """One row per (done cell with edits, request)."""
    rows = []
    for c in a.results.edited_done:
        counts = frequencies.counts(c) if frequencies is not None else {}
        for r in c.requests:
            tc = counts.get(r.case_id)
            row = {"cell": c.id, "label": c.label, **{k: axis(c, k) for k in AXES}, "case_id": r.case_id,
                   "target": tc.target if tc else None,
                   **{f"success_{m}": r.success[m] for m in r.success},
                   **{f"margin_{m}": r.margin[m] for m in r.margin},
                   **{f"efficacy_{m}": r.scores[m]["efficacy"] for m in r.scores},
                   "edited": r.success["M_e"], "survived": r.survived,
                   "flipped": r.success["M_e"] and not r.success["M_ef"],
                   "finetune_count": tc.finetune_count if tc else None,
                   "finetune_per_million": tc.finetune_per_million if tc else None,
                   "corpus_count": tc.corpus_count if tc else None,
                   "corpus_per_million": tc.corpus_per_million if tc else None,
                   "zipf": tc.zipf if tc else None}
            rows.append(row)
    return pd.DataFrame(rows)


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not pd.isna(v)]
    return mean(vals) if vals else None


def _first(values):
    vals = [v for v in values if v is not None and not pd.isna(v)]
    return vals[0] if vals else None


def _availability_notes(frequencies: TargetFrequencies | None) -> tuple[str, ...]:
    if frequencies is None:
        return ("target frequencies were not computed (--no-frequencies)",)
    return (method_description(frequencies.method),) + \
        tuple(f"{name}: unavailable, {why}" for name, why in sorted(frequencies.problems.items()))


def survival_requests(frame: pd.DataFrame, frequencies: TargetFrequencies | None) -> Table:
    cols = [Column("model"), Column("data"), Column("request"), Column("target"), Column("cells", "int"),
            Column("succeeded after editing", "int"), Column("survived", "int"), Column("survival", "pct"),
            Column("margin M_e", "num"), Column("margin M_ef", "num"), Column("count in ft data", "int"),
            Column("per million ft tokens", "num"), Column("count in stats corpus", "int"),
            Column("per million corpus tokens", "num"), Column("Zipf frequency", "num")]
    rows = []
    if not frame.empty:
        for (model, data, case_id), g in frame.groupby(["model_label", "edit_data_label", "case_id"], sort=False,
                                                       dropna=False):
            edited = int(g["edited"].sum())
            survived = int(g["survived"].sum())
            rows.append([model, data, case_id, _first(g["target"]), len(g), edited, survived,
                         survived / edited if edited else None, _mean(g["margin_M_e"]), _mean(g["margin_M_ef"]),
                         _first(g["finetune_count"]), _first(g["finetune_per_million"]), _first(g["corpus_count"]),
                         _first(g["corpus_per_million"]), _first(g["zipf"])])
    return make_table(
        "survival_requests", "Which edits survive: per request",
        "Each edit request pooled over the cells that edited it: in how many it succeeded after editing and "
        "survived fine-tuning (survival = survived / succeeded), its mean margin NLL(true) - NLL(new) after editing "
        "and after fine-tuning, and how frequent its target is: its Zipf frequency in English (wordfreq method) or "
        "how often it occurs in the fine-tuning data and in the E1 statistics corpus (corpus method: count and per "
        "million tokens). The notes name the method used.", cols, rows, _availability_notes(frequencies))


def survival_summary(frame: pd.DataFrame, frequencies: TargetFrequencies | None) -> Table:
    cols = [Column("quantity"), Column("survived mean", "num"), Column("erased mean", "num"),
            Column("n survived", "int"), Column("n erased", "int"), Column("test"), Column("U", "stat"),
            Column("p", "p"), Column("detail")]
    rows = []
    edited = frame[frame["edited"]] if not frame.empty else frame
    quantities = [("margin after editing (M_e)", "margin_M_e")]
    if frequencies is None or frequencies.method == "corpus":
        quantities += [("target per million fine-tuning tokens", "finetune_per_million"),
                       ("target per million statistics-corpus tokens", "corpus_per_million")]
    if frequencies is not None and frequencies.method == "wordfreq":
        quantities += [("target Zipf frequency (wordfreq, English)", "zipf")]
    for label, col in quantities:
        if edited.empty or col not in edited:
            surv, gone = [], []
        else:
            surv = [v for v in edited.loc[edited["survived"], col] if v is not None and not pd.isna(v)]
            gone = [v for v in edited.loc[edited["flipped"], col] if v is not None and not pd.isna(v)]
        t = mann_whitney(surv, gone)
        rows.append([label, _mean(surv), _mean(gone), len(surv), len(gone), t.test, t.statistic, t.p_value,
                     t.detail])
    return make_table(
        "survival_summary", "Survivors vs erased edits",
        "Over (cell, request) pairs that succeeded after editing: survived (still successful after fine-tuning) "
        "vs erased (flipped). Mann-Whitney U test, two-sided; n per group. Target frequency by the method the "
        "notes name.", cols, rows,
        _availability_notes(frequencies))


__all__ = ["request_frame", "survival_requests", "survival_summary"]
