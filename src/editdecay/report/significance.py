"""Paired significance tests between matched configurations (E7), each with its n and statistic.

Which test, and why:
- Per-request survival (a yes/no outcome per edit) compared between two conditions measured on the SAME
  requests (M_e vs M_ef of one cell; two fine-tuning recipes applied to one patch; two editors editing the
  same requests): the exact McNemar test. Only discordant pairs carry information: b = requests that
  survive under A but not under B, c = the reverse; under H0 b ~ Binomial(b + c, 1/2), so the exact
  two-sided binomial test (scipy.stats.binomtest) gives the p-value. Exact rather than the chi-square
  version because edit counts per cell are small (8 in the demo) and b + c is often tiny.
- Per-request margins (NLL(true) - NLL(new), a continuous, paired, not necessarily normal quantity):
  the Wilcoxon signed-rank test on the paired differences (scipy.stats.wilcoxon, zero differences
  dropped, exact distribution for small n). Used on the margin drop margin(M_e) - margin(M_ef).
- Scores across configurations (one number per cell, e.g. ES of M_e vs ES of M_ef over all cells, or the
  relative decrease of MEMIT vs AlphaEdit over configurations matched on everything else): the paired
  t-test (scipy.stats.ttest_rel), as the study did; n = matched cells.
- Survivors vs erased edits (two independent groups of requests, e.g. their margins or target-token
  frequencies): the Mann-Whitney U test (scipy.stats.mannwhitneyu), see survival.py.
p-values are two-sided and not corrected for the number of tests; degenerate inputs (no discordant pair,
all differences zero, fewer than two pairs) give p = 1 or "n/a" with the reason in `detail`, never an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from statistics import median
from typing import Sequence

from editdecay.report.analysis import Analysis, axis, key_of
from editdecay.report.records import CellRecord, RequestRecord
from editdecay.report.table import Column, Table, make_table


@dataclass(frozen=True)
class SignificanceResult:
    test: str
    statistic: float | None
    p_value: float | None
    n: int                 # pairs (or cells, or the two group sizes summed for Mann-Whitney)
    detail: str = ""


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> SignificanceResult:
    """Exact McNemar test of paired booleans; statistic = b (A true, B false), detail gives b and c."""
    from scipy.stats import binomtest

    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact: {len(a)} and {len(b)} outcomes; the samples must be paired")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    k = only_a + only_b
    p = 1.0 if k == 0 else float(binomtest(only_a, k, 0.5, alternative="two-sided").pvalue)
    return SignificanceResult("McNemar exact", float(only_a), p, len(a), f"b={only_a} (A only), c={only_b} (B only)")


def wilcoxon_paired(x: Sequence[float | None], y: Sequence[float | None]) -> SignificanceResult:
    """Wilcoxon signed-rank test of x - y over pairs where both are defined; statistic = scipy's W."""
    from scipy.stats import wilcoxon

    pairs = [(u, v) for u, v in zip(x, y) if u is not None and v is not None]
    diffs = [u - v for u, v in pairs]
    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return SignificanceResult("Wilcoxon signed-rank", 0.0 if pairs else None, 1.0 if pairs else None, len(pairs),
                          "all differences are zero" if pairs else "no pairs")
    res = wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided")
    return SignificanceResult("Wilcoxon signed-rank", float(res.statistic), float(res.pvalue), len(pairs),
                      f"{len(nonzero)} non-zero differences, median difference {median(diffs):.3g}")


def ttest_paired(x: Sequence[float | None], y: Sequence[float | None]) -> SignificanceResult:
    """Paired t-test over pairs where both values are defined."""
    from scipy.stats import ttest_rel

    pairs = [(u, v) for u, v in zip(x, y) if u is not None and v is not None]
    if len(pairs) < 2:
        return SignificanceResult("paired t-test", None, None, len(pairs), "fewer than 2 pairs")
    diffs = [u - v for u, v in pairs]
    if all(d == diffs[0] for d in diffs):
        return SignificanceResult("paired t-test", None, None if diffs[0] else 1.0, len(pairs),
                          f"every difference is {diffs[0]:.3g} (no variance)")
    res = ttest_rel([u for u, _ in pairs], [v for _, v in pairs])
    return SignificanceResult("paired t-test", float(res.statistic), float(res.pvalue), len(pairs),
                      f"mean difference {sum(diffs) / len(diffs):.3g}")


def mann_whitney(a: Sequence[float | None], b: Sequence[float | None]) -> SignificanceResult:
    """Two-sided Mann-Whitney U test of two independent samples; statistic = U of the first sample."""
    from scipy.stats import mannwhitneyu

    xs = [v for v in a if v is not None and not math.isnan(v)]
    ys = [v for v in b if v is not None and not math.isnan(v)]
    if not xs or not ys:
        return SignificanceResult("Mann-Whitney U", None, None, len(xs) + len(ys),
                          f"needs both groups (sizes {len(xs)}, {len(ys)})")
    res = mannwhitneyu(xs, ys, alternative="two-sided")
    return SignificanceResult("Mann-Whitney U", float(res.statistic), float(res.pvalue), len(xs) + len(ys),
                      f"group sizes {len(xs)} and {len(ys)}")


# --------------------------------------------------------------------------- matched configurations


@dataclass(frozen=True)
class Comparison:
    kind: str             # fine-tuning | recipe | editor | across cells
    configuration: str    # what is held fixed
    a: str
    b: str
    quantity: str
    result: SignificanceResult


def _drop(r: RequestRecord) -> float | None:
    e, f = r.margin["M_e"], r.margin["M_ef"]
    return None if e is None or f is None else e - f


def _matched(ca: CellRecord, cb: CellRecord) -> list[tuple[RequestRecord, RequestRecord]]:
    other = {r.case_id: r for r in cb.requests}
    return [(r, other[r.case_id]) for r in ca.requests if r.case_id in other]


def _between(kind: str, config: str, ca: CellRecord, cb: CellRecord, name_a: str, name_b: str) -> list[Comparison]:
    pairs = _matched(ca, cb)
    surv = mcnemar_exact([p.survived for p, _ in pairs], [q.survived for _, q in pairs])
    marg = wilcoxon_paired([_drop(p) for p, _ in pairs], [_drop(q) for _, q in pairs])
    out = [Comparison(kind, config, name_a, name_b, "survival (success after editing and after fine-tuning)", surv),
           Comparison(kind, config, name_a, name_b, "margin drop margin(M_e) - margin(M_ef)", marg)]
    return out + _over_time(kind, config, ca, cb, name_a, name_b)


def _fates(c: CellRecord) -> dict:
    return ((((c.result or {}).get("decay") or {}).get("survival") or {}).get("fates")) or {}


def _over_time(kind: str, config: str, ca: CellRecord, cb: CellRecord, name_a: str, name_b: str) -> list[Comparison]:
    """Decay over time on the requests at risk in both cells (measure/decay_time.py): the failure step, with an
    edit that never failed ranked after every failure (its step + the largest step seen), and the margin slope;
    both by the Wilcoxon signed-rank test. None for results without per-request curves."""
    fa, fb = _fates(ca), _fates(cb)
    common = [cid for cid in fa if cid in fb]
    if not common:
        return []
    top = 1 + max(f["step"] for f in (*fa.values(), *fb.values()))

    def when(f: dict) -> float:
        return float(f["step"] if f["failed"] else f["step"] + top)

    return [Comparison(kind, config, name_a, name_b, "failure step (never failed: ranked last)",
                       wilcoxon_paired([when(fa[c]) for c in common], [when(fb[c]) for c in common])),
            Comparison(kind, config, name_a, name_b, "margin slope (nats per 1,000 examples)",
                       wilcoxon_paired([fa[c]["slope"] for c in common], [fb[c]["slope"] for c in common]))]


def paired_comparisons(a: Analysis) -> list[Comparison]:
    done = [c for c in a.edited_cells if a.m(c)]
    out: list[Comparison] = []
    # 1. fine-tuning effect within each cell: M_e vs M_ef on the same requests
    for c in done:
        out.append(Comparison("fine-tuning", c.label, "M_e", "M_ef", "success",
                              mcnemar_exact([r.success["M_e"] for r in c.requests],
                                            [r.success["M_ef"] for r in c.requests])))
        out.append(Comparison("fine-tuning", c.label, "M_e", "M_ef", "margin",
                              wilcoxon_paired([r.margin["M_e"] for r in c.requests],
                                              [r.margin["M_ef"] for r in c.requests])))
    # 2. recipes applied to the same patch (same model, editor, data, n, fine-tuning data, seed)
    groups: dict[tuple, list[CellRecord]] = {}
    for c in done:
        groups.setdefault(key_of(c), []).append(c)
    for key, cells in groups.items():
        config = "/".join(map(str, key))
        for ca, cb in combinations(cells, 2):
            out += _between("recipe", config, ca, cb, str(axis(ca, "recipe")), str(axis(cb, "recipe")))
    # 3. editors on the same requests with the same recipe
    names = ("model_label", "edit_data_label", "n_edits", "recipe", "finetune_data_label", "seed")
    groups = {}
    for c in done:
        groups.setdefault(key_of(c, names), []).append(c)
    for key, cells in groups.items():
        config = "/".join(map(str, key))
        for ca, cb in combinations(cells, 2):
            if axis(ca, "editor") != axis(cb, "editor"):
                out += _between("editor", config, ca, cb, str(axis(ca, "editor")), str(axis(cb, "editor")))
    # 4. across cells (the study's paired t-tests): ES after editing vs after fine-tuning
    if len(done) >= 2:
        es_e = [a.m(c).scores["M_e"]["efficacy"] for c in done]
        es_ef = [a.m(c).scores["M_ef"]["efficacy"] for c in done]
        out.append(Comparison("across cells", f"all {len(done)} cells with results", "ES M_e", "ES M_ef",
                              "efficacy per cell", ttest_paired(es_e, es_ef)))
    # 5. editors across matched configurations: relative decrease of ES
    pairs: dict[tuple[str, str], list[tuple[float | None, float | None]]] = {}
    for key, cells in groups.items():
        for ca, cb in combinations(cells, 2):
            ea, eb = str(axis(ca, "editor")), str(axis(cb, "editor"))
            if ea != eb:
                pairs.setdefault((ea, eb), []).append((a.m(ca).relative_decrease["efficacy"],
                                                       a.m(cb).relative_decrease["efficacy"]))
    for (ea, eb), vals in pairs.items():
        out.append(Comparison("across cells", f"{len(vals)} configurations matched on all but the editor", ea, eb,
                              "ES relative decrease per cell", ttest_paired([u for u, _ in vals],
                                                                            [v for _, v in vals])))
    return out


def significance_table(comparisons: Sequence[Comparison]) -> Table:
    cols = [Column("comparison"), Column("configuration"), Column("A"), Column("B"), Column("quantity"),
            Column("test"), Column("statistic", "stat"), Column("p", "p"), Column("n", "int"), Column("detail")]
    rows = [[c.kind, c.configuration, c.a, c.b, c.quantity, c.result.test, c.result.statistic, c.result.p_value,
             c.result.n, c.result.detail] for c in comparisons]
    return make_table(
        "significance", "Paired significance tests between matched configurations",
        "Two-sided, uncorrected. Survival/success: exact McNemar (binomial test on the discordant pairs b, c; "
        "statistic = b); margins: Wilcoxon signed-rank on paired differences (statistic = W); per-cell scores "
        "across configurations: paired t-test (statistic = t). n = paired requests, or paired cells for the "
        "t-tests. `recipe`: two fine-tuning recipes on the same patch; `editor`: two editors on the same requests. "
        "Over time (requests that succeeded after editing in both cells): the checkpoint of first failure (edits "
        "that never failed ranked after every failure) and the margin slope, Wilcoxon signed-rank.",
        cols, rows)


__all__ = ["Comparison", "SignificanceResult", "mann_whitney", "mcnemar_exact", "paired_comparisons",
           "significance_table", "ttest_paired", "wilcoxon_paired"]
