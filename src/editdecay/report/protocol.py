"""The report's answers to the study's reviewers: the knowledge control, decay over time and the mechanism.

Everything is read from the cell results (`control`, `decay.knowledge_flip_ratio*`, `decay.edits_vs_known`,
`decay.survival*`, `mechanism`; core/schema.py CellResult), never recomputed on a model. Cells written before
these measures existed have none of them and are listed as "not measured", not as zeros.

Tables:
- knowledge_control   per cell: EFR beside the knowledge flip ratio of the same fine-tuning (M_e -> M_ef) and of
                      the unedited model (M0 -> M_f), with Fisher's exact test "edits flip more often than known
                      facts"; a pooled row over the cells: "are edits forgotten faster than what the model knew?"
- survival_over_time  per cell: edits at risk, failed, censored at the last checkpoint, the median failure step
                      and the surviving fraction at the end (Kaplan-Meier), the same for known facts, and the
                      mean margin slope (nats per 1,000 examples) of edits and of known facts
- mechanism           per cell and edited layer: trained or not, mean ||dW_ft k|| / ||dW_edit k||, mean cosine,
                      and the Spearman correlation of each request's ratio with its survival
Figures:
- knowledge_vs_edits  EFR and KFR per cell, side by side
- survival_curves     Kaplan-Meier curves of edits (solid) and known facts (dashed) per cell against steps
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from editdecay.report.analysis import Analysis, key_of
from editdecay.report.figures import FigureRecord, _empty, _figure, _palette, _save, _short_label, _varying
from editdecay.report.records import CellRecord
from editdecay.report.table import Column, Missing, Table, make_table

NAMES = ("model_label", "editor", "edit_data_label", "n_edits", "recipe")


def _decay(c: CellRecord) -> dict:
    return (c.result or {}).get("decay") or {}


def _axes(names=NAMES) -> list[Column]:
    from editdecay.report.tables import _axis_columns

    return _axis_columns(names)


def knowledge_control(a: Analysis) -> Table:
    cols = _axes() + [Column("control facts", "int"), Column("known on M_e", "int"), Column("known flipped", "int"),
                      Column("KFR (M_e->M_ef)", "pct"), Column("KFR base (M0->M_f)", "pct"),
                      Column("edits succeeded", "int"), Column("edits flipped", "int"), Column("EFR", "pct"),
                      Column("EFR - KFR", "pct"), Column("p (edits flip more)", "p")]
    rows, pooled = [], [0, 0, 0, 0]
    for c in a.edited_cells:
        d = _decay(c)
        kfr, base, efr = d.get("knowledge_flip_ratio"), d.get("knowledge_flip_ratio_base"), d.get("edit_flip_ratio")
        if not c.done or kfr is None or efr is None:
            why = Missing(c.state) if not c.done else Missing("not measured")
            rows.append(list(key_of(c, NAMES)) + [why] * 10)
            continue
        test = d.get("edits_vs_known") or {}
        rows.append(list(key_of(c, NAMES)) + [
            kfr["n"], kfr["n_known"], kfr["n_flipped"], kfr["value"], (base or {}).get("value"),
            efr["n_success_edited"], efr["n_flipped"], efr["value"], test.get("difference"), test.get("p_greater")])
        pooled = [pooled[0] + efr["n_flipped"], pooled[1] + efr["n_success_edited"], pooled[2] + kfr["n_flipped"],
                  pooled[3] + kfr["n_known"]]
    notes = []
    if any(pooled):
        from editdecay.measure.knowledge import compare_flips

        t = compare_flips(*pooled)
        rows.append(["all cells (pooled)"] + [None] * (len(NAMES) - 1) + [
            None, pooled[3], pooled[2], t["knowledge_flip_ratio"], None, pooled[1], pooled[0], t["edit_flip_ratio"],
            t["difference"], t["p_greater"]])
        verdict = ("edits are forgotten faster than facts the model knew" if t["p_greater"] is not None
                   and t["p_greater"] < 0.05 else "no evidence at p < 0.05 that edits are forgotten faster than facts "
                                                 "the model knew")
        notes.append(f"Pooled over the cells: {verdict} (Fisher's exact test, one-sided).")
    return make_table(
        "knowledge_control", "Knowledge control: are edits forgotten faster than what the model knew?",
        "Control facts: records of the same edit data that were not edited (nor share an edited subject), scored "
        "with the same prompts and E6 metric. A fact is known when the model prefers its true object (NLL(true) < "
        "NLL(new)), or for zsRE answers when their token accuracy is >= 0.5. KFR = known facts lost by fine-tuning "
        "/ known facts; EFR as in E7. p: Fisher's exact test that edits flip more often than known facts under the "
        "same fine-tuning (different items, so not a paired test); the pooled row sums the counts over the cells.",
        cols, rows, notes)


def survival_over_time(a: Analysis) -> Table:
    cols = _axes() + [Column("edits at risk", "int"), Column("failed", "int"), Column("censored", "int"),
                      Column("median failure step", "int"), Column("edits surviving at end", "pct"),
                      Column("known facts at risk", "int"), Column("known surviving at end", "pct"),
                      Column("edit margin slope", "num"), Column("known margin slope", "num")]
    rows = []
    for c in a.edited_cells:
        s, k = _decay(c).get("survival"), _decay(c).get("survival_control")
        if not c.done or s is None:
            rows.append(list(key_of(c, NAMES)) + [Missing(c.state) if not c.done else Missing("not measured")] * 9)
            continue
        last = s["by_step"][-1] if s["by_step"] else {}
        rows.append(list(key_of(c, NAMES)) + [
            s["n_at_risk"], s["n_failed"], s["n_at_risk"] - s["n_failed"], s["median_step"], last.get("survival"),
            (k or {}).get("n_at_risk"), ((k or {}).get("by_step") or [{}])[-1].get("survival") if k else None,
            _mean_slope(s), _mean_slope(k)])
    return make_table(
        "survival_over_time", "Decay over time: survival of edits over the fine-tuning checkpoints",
        "From the per-request decay curve: an edit is at risk when it succeeds at step 0 (M_e); it fails at the "
        "first checkpoint where it does not succeed; edits still succeeding are censored at the last checkpoint. "
        "Surviving at end: the Kaplan-Meier estimate at the last checkpoint; median failure step: the first "
        "checkpoint where it is <= 50% (empty: never). Margin slope: mean over the at-risk items of the "
        "least-squares slope of NLL(true) - NLL(new) against examples seen, nats per 1,000 examples (negative: "
        "weakening). Known facts: the knowledge control, the same way.", cols, rows)


def _mean_slope(s: dict | None) -> float | None:
    v = [f["slope"] for f in ((s or {}).get("fates") or {}).values() if f.get("slope") is not None]
    return mean(v) if v else None


def mechanism_table(a: Analysis) -> Table:
    cols = _axes() + [Column("layer", "int"), Column("trained"), Column("mean ratio", "num"),
                      Column("mean cosine", "num"), Column("rho(ratio, survived)", "num"), Column("p", "p"),
                      Column("n", "int")]
    rows = []
    for c in a.edited_cells:
        mech = (c.result or {}).get("mechanism") if c.done else None
        if not mech:
            rows.append(list(key_of(c, NAMES)) + [Missing(c.state) if not c.done else Missing("not measured")] * 7)
            continue
        rel = (mech.get("relation") or {}).get("ratio") or {}
        for layer, v in sorted(mech["layers"].items(), key=lambda kv: int(kv[0])):
            if not v["trained"]:
                rows.append(list(key_of(c, NAMES)) + [int(layer), "no (not measured)", None, None, None, None, None])
                continue
            rows.append(list(key_of(c, NAMES)) + [int(layer), "yes", v["mean_ratio"], v["mean_cosine"],
                                                   rel.get("rho"), rel.get("p"), rel.get("n")])
    return make_table(
        "mechanism", "Mechanism: how much fine-tuning changed each edited layer's output at the edit's keys",
        "ratio = ||dW_ft k_i|| / ||dW_edit k_i||, cosine = cos(dW_ft k_i, dW_edit k_i) at edited layer l and edit "
        "i's key (the input of the layer's MLP output at the subject's last token); ratio 1 with cosine -1 undoes "
        "the edit at the key. For LoRA/DoRA the adapters count as merged. A layer whose edited module the recipe "
        "does not train is marked, not measured. rho: Spearman correlation of each request's mean ratio over the "
        "trained layers with its survival (1 kept, 0 flipped), over the requests that succeeded after editing.",
        cols, rows)


# --------------------------------------------------------------------------- figures


def knowledge_figure(a: Analysis, path: Path) -> FigureRecord:
    cells = [c for c in a.edited_cells if c.done and _decay(c).get("knowledge_flip_ratio")]
    fig = _figure(max(6, 0.8 * len(cells) + 3), 3.4)
    ax = fig.subplots()
    if not cells:
        _empty(ax, "no cell has a knowledge control (results written before it existed, or n_control 0)")
    else:
        names = _varying(cells, NAMES) or ["recipe"]
        colors = _palette(3)
        series = [("EFR (edits, M_e->M_ef)", lambda d: (d.get("edit_flip_ratio") or {}).get("value")),
                  ("KFR (known facts, M_e->M_ef)", lambda d: d["knowledge_flip_ratio"]["value"]),
                  ("KFR base (M0->M_f)", lambda d: (d.get("knowledge_flip_ratio_base") or {}).get("value"))]
        for k, (label, get) in enumerate(series):
            vals = [get(_decay(c)) for c in cells]
            xs = [i + (k - 1) * 0.27 for i, v in enumerate(vals) if v is not None]
            ax.bar(xs, [100 * v for v in vals if v is not None], 0.27, color=colors[k], label=label)
        ax.set_xticks(range(len(cells)), [_short_label(c, names) for c in cells], rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("% flipped")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    ax.set_title("Are edits forgotten faster than what the model knew?", fontsize=10)
    _save(fig, path)
    return FigureRecord("knowledge_vs_edits", "Edits vs known facts under the same fine-tuning",
                        "Per cell: the share of successful edits that fine-tuning flipped (EFR) beside the share of "
                        "known, unedited facts of the same data it flipped (KFR), and KFR of the unedited model's "
                        "fine-tuning (M0 -> M_f). n per cell in the knowledge_control table.", path)


def survival_figure(a: Analysis, path: Path) -> FigureRecord:
    cells = [c for c in a.edited_cells if c.done and _decay(c).get("survival")]
    fig = _figure(7, 3.8)
    ax = fig.subplots()
    if not cells:
        _empty(ax, "no cell has per-request decay curves (results written before they existed)")
    else:
        names = _varying(cells, NAMES) or ["recipe"]
        for c, color in zip(cells, _palette(len(cells))):
            d = _decay(c)
            for key, style, what in (("survival", "-", "edits"), ("survival_control", "--", "known")):
                s = d.get(key)
                if not s or not s["by_step"] or not s["n_at_risk"]:
                    continue
                ax.step([r["t"] for r in s["by_step"]], [100 * r["survival"] for r in s["by_step"]], where="post",
                        linestyle=style, color=color, label=f"{_short_label(c, names)} {what} (n={s['n_at_risk']})")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("% still holding")
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=6, ncols=2)
        ax.grid(alpha=0.3)
    ax.set_title("Survival over fine-tuning (Kaplan-Meier)", fontsize=10)
    _save(fig, path)
    return FigureRecord("survival_curves", "Survival of edits and known facts over fine-tuning",
                        "Kaplan-Meier estimate of the share of edits that still succeed (solid) and of known control "
                        "facts still known (dashed) at each checkpoint; items that hold to the last checkpoint are "
                        "censored there. n: items at risk (succeeding / known at step 0).", path)


TABLES = {"knowledge_control": knowledge_control, "survival_over_time": survival_over_time,
          "mechanism": mechanism_table}


def protocol_tables(a: Analysis) -> list[Table]:
    return [fn(a) for fn in TABLES.values()]


def protocol_figures(a: Analysis, fig_dir: Path) -> list[FigureRecord]:
    return [knowledge_figure(a, fig_dir / "knowledge_vs_edits.png"), survival_figure(a, fig_dir / "survival_curves.png")]


__all__ = ["TABLES", "knowledge_control", "knowledge_figure", "mechanism_table", "protocol_figures",
           "protocol_tables", "survival_figure", "survival_over_time"]
