"""The report's figures (matplotlib, PNG). One function per figure; each writes one file and returns its record.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never
through pyplot: no global figure registry and no backend switch in the caller's
process. Every figure states its n (requests per cell, cells per point) in the
caption or the legend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Sequence

import numpy as np
import pandas as pd

from editdecay.report.analysis import Analysis, axis
from editdecay.report.downstream import (
    headlines,
    is_held_out,
    downstream_score,
    downstream_scores,
    headline_key,
    headline_label,
)
from editdecay.report.records import MODELS, SCORE_ABBR, SCORES, CellRecord

DPI = 110
MAX_CURVES = 12        # more cells than this: decay curves are averaged per editor x recipe


@dataclass(frozen=True)
class FigureRecord:
    key: str
    title: str
    caption: str
    path: Path


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    """Render into memory, then write atomically: a killed report leaves no half-written PNG."""
    import io

    from editdecay.core.cache import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _varying(cells: Sequence[CellRecord], names: Sequence[str]) -> list[str]:
    return [n for n in names if len({str(axis(c, n)) for c in cells}) > 1]


def _short_label(cell: CellRecord, names: Sequence[str]) -> str:
    return "/".join(str(axis(cell, n)) for n in names) or str(axis(cell, "recipe"))


def _palette(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- decay curves


def decay_curves(a: Analysis, path: Path) -> FigureRecord:
    """ES/PS/NS of M_ef and task accuracy (M_ef solid, M_f dashed) at each fine-tuning checkpoint."""
    cells = [c for c in a.results.edited_done if (c.result or {}).get("curve")]
    fig = _figure(13, 3.6)
    axes = fig.subplots(1, 4)
    names = _varying(cells, ("model_label", "editor", "edit_data_label", "n_edits", "recipe", "finetune_data_label",
                             "seed")) or ["recipe"]
    series = []          # (label, editor, recipe, curve rows, base rows, n cells)
    if len(cells) <= MAX_CURVES:
        for c in cells:
            series.append((_short_label(c, names), axis(c, "editor"), axis(c, "recipe"), c.result["curve"],
                           c.result.get("curve_base") or [], 1))
    else:
        groups: dict[tuple, list[CellRecord]] = {}
        for c in cells:
            groups.setdefault((axis(c, "editor"), axis(c, "recipe")), []).append(c)
        for (editor, recipe), g in groups.items():
            series.append((f"{editor}/{recipe} (mean of {len(g)})", editor, recipe,
                           _mean_curve([c.result["curve"] for c in g]),
                           _mean_curve([c.result.get("curve_base") or [] for c in g]), len(g)))
    recipes = list(dict.fromkeys(s[2] for s in series))
    editors = list(dict.fromkeys(s[1] for s in series))
    colors = dict(zip(recipes, _palette(len(recipes))))
    styles = dict(zip(editors, ["-", "--", ":", "-."] * 4))
    markers = dict(zip(editors, ["o", "s", "^", "D", "v"] * 4))
    task_key = next((headline_key(p) for c in cells for p in c.result["curve"] if p.get("task_accuracy") is not None),
                    "task_accuracy")
    keys = [*SCORES, task_key]
    for ax, key in zip(axes, keys):
        for label, editor, recipe, curve, base, _ in series:
            pts = [(p["step"], p.get(key)) for p in curve if p.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [100 * y for y in ys], styles[editor], marker=markers[editor], color=colors[recipe],
                        label=label, alpha=0.85, markersize=4)
            if key == task_key:
                bp = [(p["step"], p.get(key)) for p in base if p.get(key) is not None]
                if bp:
                    xs, ys = zip(*bp)
                    ax.plot(xs, [100 * y for y in ys], ":", color=colors[recipe], alpha=0.5, linewidth=1)
        title = f"{SCORE_ABBR[key]} of M_ef" if key in SCORES else \
            f"task {headline_label(key)} (M_ef; M_f dotted)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fine-tuning step (0 = M_e)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    if not series:
        for ax in axes:
            _empty(ax, "no cell with a decay curve")
    else:
        n_req = sorted({c.n_edits for c in cells})
        axes[0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"Decay curves: {len(cells)} cells, {', '.join(map(str, n_req))} requests per cell",
                     fontsize=11)
    _save(fig, path)
    return FigureRecord("decay_curves", "Decay curves over fine-tuning steps",
                        "Scores of the edited model during fine-tuning (step 0 = M_e, the last step = M_ef), in "
                        "percent of the cell's requests; the last panel shows the held-out task's headline score "
                        "(embedded, chatterbot-choice: exact match; chatterbot: token accuracy) of M_ef and, dotted, of M_f (the base model fine-tuned with the same recipe).", path)


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    steps = sorted({p["step"] for c in curves for p in c})
    out = []
    for s in steps:
        row = {"step": s}
        for key in (*SCORES, "task_accuracy", "task_token_accuracy"):
            vals = [p.get(key) for c in curves for p in c if p["step"] == s and p.get(key) is not None]
            row[key] = mean(vals) if vals else None
        row["task_name"] = next((p.get("task_name") for c in curves for p in c if p.get("task_name")), None)
        out.append(row)
    return out


# --------------------------------------------------------------------------- survival heatmap


def survival_heatmap(a: Analysis, path: Path) -> FigureRecord:
    """Survival = 1 - EFR per cell: rows = model/editor/data/n, columns = recipes; missing cells marked."""
    cells = a.edited_cells
    row_names = ("model_label", "editor", "edit_data_label", "n_edits", "finetune_data_label", "seed")
    shown = _varying(cells, row_names) or ["editor"]
    rows = list(dict.fromkeys(tuple(axis(c, n) for n in row_names) for c in cells))
    cols = [r for r in a.recipes() if any(str(axis(c, "recipe")) == r for c in cells)]
    data = np.full((len(rows), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in rows]
    for c in cells:
        i = rows.index(tuple(axis(c, n) for n in row_names))
        j = cols.index(str(axis(c, "recipe")))
        m = a.m(c)
        if m is None:
            text[i][j] = c.state if c.state != "done" else "missing"
        elif m.efr.value is None:
            text[i][j] = f"n/a\n(0 of {m.n} edited)"
        else:
            data[i, j] = 1 - m.efr.value
            text[i][j] = f"{100 * (1 - m.efr.value):.0f}%\n{m.efr.n_success_edited - m.efr.n_flipped}/" \
                         f"{m.efr.n_success_edited}"
    fig = _figure(max(4.5, 1.5 * len(cols) + 2.5), max(2.5, 0.7 * len(rows) + 1.6))
    ax = fig.subplots()
    if not rows or not cols:
        _empty(ax, "no cells with edits")
    else:
        from matplotlib import colormaps

        cmap = colormaps["RdYlGn"].with_extremes(bad="0.85")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8,
                        color="0.15" if not math.isnan(data[i, j]) else "0.3",
                        style="normal" if not math.isnan(data[i, j]) else "italic")
        ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), ["/".join(str(r[row_names.index(n)]) for n in shown) for r in rows],
                      fontsize=8)
        fig.colorbar(im, ax=ax, label="survival (1 - EFR)", shrink=0.8)
        ax.set_title("Edit survival across the grid", fontsize=10)
    _save(fig, path)
    return FigureRecord("survival_heatmap", "Survival across the grid",
                        "Share of the edits that succeeded after editing and still succeed after fine-tuning "
                        "(1 - EFR, E7) per cell, with survived / succeeded counts; grey cells have no result "
                        "(their state is written in them) or no successful edit.", path)


# --------------------------------------------------------------------------- MEMIT vs AlphaEdit by n


def editor_decay_by_n(a: Analysis, path: Path) -> FigureRecord:
    """Relative decrease of ES and EFR against the number of edits, one line per editor, one column per method."""
    cells = [c for c in a.edited_cells if a.m(c)]
    methods = list(dict.fromkeys(str(axis(c, "method")) for c in cells)) or ["-"]
    editors = list(dict.fromkeys(str(axis(c, "editor")) for c in cells))
    colors = dict(zip(editors, _palette(len(editors))))
    fig = _figure(max(4.5, 3.6 * len(methods)), 6)
    axes = np.atleast_2d(fig.subplots(2, len(methods), squeeze=False))
    for j, method in enumerate(methods):
        for row, (label, get) in enumerate((("ES relative decrease (%)", lambda m: m.relative_decrease["efficacy"]),
                                             ("Edit Flip Ratio (%)", lambda m: m.efr.value))):
            ax = axes[row, j]
            for editor in editors:
                pts: dict[int, list[float]] = {}
                for c in cells:
                    if str(axis(c, "method")) == method and str(axis(c, "editor")) == editor:
                        v = get(a.m(c))
                        if v is not None:
                            pts.setdefault(c.n_edits, []).append(v)
                if pts:
                    xs = sorted(pts)
                    ys = [100 * mean(pts[x]) for x in xs]
                    ax.plot(xs, ys, "-o", color=colors[editor],
                            label=f"{editor} ({sum(len(v) for v in pts.values())} cells)")
            ns = sorted({c.n_edits for c in cells})
            if len(ns) > 1 and ns[0] > 0 and ns[-1] / ns[0] >= 10:
                ax.set_xscale("log")
            if ns:
                ax.set_xticks(ns, [str(n) for n in ns])
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(-5.0, lo), max(105.0, hi) if row == 1 else max(5.0, hi))
            ax.set_title(f"{method}: {label.split(' (')[0]}", fontsize=10)
            ax.set_xlabel("number of edits")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
            else:
                _empty(ax, "no cells")
    _save(fig, path)
    return FigureRecord("editor_decay_by_n", "MEMIT vs AlphaEdit decay by number of edits",
                        "Per fine-tuning method: the relative decrease of efficacy (E7) and the Edit Flip Ratio, "
                        "mean over the cells of each editor at each number of edits (cells counted in the legend).",
                        path)


# --------------------------------------------------------------------------- per-request survival


def request_survival(frame: pd.DataFrame, path: Path) -> FigureRecord:
    """Margins before/after fine-tuning per (cell, request), and survival against target frequency."""
    fig = _figure(13, 4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    if frame.empty:
        for ax in (ax1, ax2, ax3):
            _empty(ax, "no request rows")
    else:
        groups = (("survived", frame["survived"], "tab:green"), ("erased", frame["flipped"], "tab:red"),
                  ("not edited", ~frame["edited"], "0.6"))
        for name, mask, color in groups:
            sub = frame[mask & frame["margin_M_e"].notna() & frame["margin_M_ef"].notna()]
            if len(sub):
                ax1.scatter(sub["margin_M_e"], sub["margin_M_ef"], s=14, alpha=0.7, color=color,
                            label=f"{name} (n={len(sub)})")
        lim = [frame[["margin_M_e", "margin_M_ef"]].min().min(), frame[["margin_M_e", "margin_M_ef"]].max().max()]
        if all(v is not None and not pd.isna(v) for v in lim):
            ax1.plot(lim, lim, color="0.5", linewidth=0.8, label="unchanged")
        ax1.axhline(0, color="0.3", linewidth=0.6)
        ax1.axvline(0, color="0.3", linewidth=0.6)
        ax1.set_xlabel("margin after editing (M_e)")
        ax1.set_ylabel("margin after fine-tuning (M_ef)")
        ax1.set_title("margin NLL(true) - NLL(new) per (cell, request)", fontsize=10)
        ax1.legend(fontsize=7)
        ax1.grid(alpha=0.3)
        if "zipf" not in frame:
            frame = frame.assign(zipf=None)
        edited = frame[frame["edited"]]
        per_req = edited.groupby(["model_label", "edit_data_label", "case_id"], dropna=False).agg(
            survival=("survived", "mean"), n=("survived", "size"), ft=("finetune_per_million", "first"),
            corpus=("corpus_per_million", "first"), zipf=("zipf", "first"))
        if per_req["zipf"].notna().any():      # wordfreq method: survival per request and the Zipf of each group
            panels = ((ax2, "zipf", "English, wordfreq Zipf", False), (ax3, "zipf", "English, wordfreq Zipf", True))
        else:
            panels = ((ax2, "ft", "fine-tuning data", False), (ax3, "corpus", "statistics corpus", False))
        for ax, col, what, boxes in panels:
            sub = per_req[per_req[col].notna()]
            if sub.empty:
                _empty(ax, f"target frequency in the {what}\nunavailable")
                ax.set_title(f"survival vs target frequency ({what})", fontsize=10)
                continue
            if boxes:
                _zipf_boxes(ax, edited)
                continue
            xs = sub[col].astype(float) if col == "zipf" else np.log10(1 + sub[col].astype(float))
            ax.scatter(xs, 100 * sub["survival"], s=18 + 6 * sub["n"], alpha=0.7, color="tab:blue")
            ax.set_xlabel("target Zipf frequency (English, wordfreq)" if col == "zipf" else
                          f"log10(1 + target per million tokens), {what}")
            ax.set_ylabel("survival (% of cells)")
            ax.set_ylim(-5, 105)
            ax.set_title(f"survival vs target frequency ({what}); n={len(sub)} requests", fontsize=9)
            ax.grid(alpha=0.3)
    _save(fig, path)
    return FigureRecord("request_survival", "Which edits survive",
                        "Left: each (cell, request) that was edited, margin after editing against margin after "
                        "fine-tuning (above 0: the new target is preferred); green survived, red erased, grey failed "
                        "already after editing. Middle and right, with the wordfreq method: per request, the share "
                        "of cells where it survived against its target's Zipf frequency in English (marker size: "
                        "cells), and the Zipf frequencies of survived vs erased (cell, request) pairs; with the "
                        "corpus method: survival against how often the target occurs in the fine-tuning data and "
                        "in the E1 statistics corpus.", path)


def _zipf_boxes(ax, edited: pd.DataFrame) -> None:
    """Zipf frequency of the targets of survived vs erased (cell, request) pairs, with each group's n."""
    groups = [("survived", edited[edited["survived"]]), ("erased", edited[edited["flipped"]])]
    data = [[float(v) for v in g["zipf"] if v is not None and not pd.isna(v)] for _, g in groups]
    labels = [f"{name}\nn={len(d)}" for (name, _), d in zip(groups, data)]
    if not any(data):
        _empty(ax, "no edited request with a Zipf frequency")
        return
    ax.boxplot([d if d else [np.nan] for d in data], tick_labels=labels, widths=0.5)
    for i, d in enumerate(data):
        ax.scatter(np.full(len(d), i + 1) + np.linspace(-0.12, 0.12, len(d)) if d else [], d, s=8, alpha=0.5,
                   color=("tab:green", "tab:red")[i])
    ax.set_ylabel("target Zipf frequency (English, wordfreq)")
    ax.set_title("target frequency: survived vs erased (cell, request) pairs", fontsize=9)
    ax.grid(alpha=0.3, axis="y")


# --------------------------------------------------------------------------- downstream


def downstream_bars(a: Analysis, path: Path) -> FigureRecord:
    """Downstream score of M0, M_e, M_f, M_ef per cell (embedded task accuracy and the mean of lm-eval tasks)."""
    cells = list(a.results.done)
    names = _varying(cells, ("model_label", "editor", "edit_data_label", "n_edits", "recipe", "finetune_data_label",
                             "seed")) or ["recipe"]
    tasks: list[str] = []
    for c in cells:
        for m in MODELS:
            tasks += [t for t in downstream_scores(c.metrics(m)) if t not in tasks]
    held = next((t for t in tasks if is_held_out(t)), None)
    panels = [held] if held else []
    if any(not is_held_out(t) for t in tasks):
        panels.append("downstream score (mean acc of lm-eval tasks)")
    fig = _figure(max(6, 0.9 * len(cells) + 3), 3.4 * max(1, len(panels)))
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    colors = dict(zip(MODELS, _palette(4)))
    for ax, panel in zip(axes, panels or [None]):
        if panel is None or not cells:
            _empty(ax, "no downstream scores in the results")
            continue
        width = 0.2
        for k, model in enumerate(MODELS):
            vals = []
            for c in cells:
                ds = downstream_scores(c.metrics(model))
                if is_held_out(panel):
                    ts = ds.get(panel)
                    vals.append(ts.metrics.get(headlines()[panel][0]) if ts else None)
                else:
                    vals.append(downstream_score(ds)[0])
            xs = [i + (k - 1.5) * width for i, v in enumerate(vals) if v is not None]
            ax.bar(xs, [100 * v for v in vals if v is not None], width, color=colors[model], label=model)
        ax.set_xticks(range(len(cells)), [_short_label(c, names) for c in cells], rotation=25, ha="right",
                      fontsize=7)
        ax.set_ylabel("%")
        title = f"{panel} ({headlines()[panel][0].replace('_', ' ')})" if is_held_out(panel) else panel
        ax.set_title(f"downstream: {title}", fontsize=10)
        ax.legend(fontsize=7, ncols=4)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return FigureRecord("downstream", "Downstream scores",
                        "Per cell, the downstream score of the base model (M0), the edited model (M_e), the "
                        "fine-tuned base (M_f) and the edited, fine-tuned model (M_ef): the held-out task's headline "
                        "score (embedded, chatterbot-choice: exact match; chatterbot: token accuracy) and, when present, the downstream score (mean acc over the lm-eval tasks).", path)


__all__ = ["FigureRecord", "decay_curves", "downstream_bars", "editor_decay_by_n", "request_survival",
           "survival_heatmap"]
