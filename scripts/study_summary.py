"""Headline table of a grid report, as markdown: per cell ES/PS/NS after editing (M_e) and after fine-tuning
(M_ef), the Edit Flip Ratio with its counts, the exact McNemar test of success M_e vs M_ef on the same
requests, the Wilcoxon signed-rank test of the edits' margins M_e vs M_ef, and the held-out task's headline
score of M0, M_f and M_ef; then the cells without a result.

    python scripts/study_summary.py runs/embedded-study/report > docs/embedded-study/summary.md

Reads only REPORT_DIR/report.json (written by `editdecay report`); every number is one of its tables'. The
held-out tasks' headline metrics are the report's (`editdecay.report.downstream.headlines`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from editdecay.report.downstream import headlines

# (task, metric) pairs shown as "task": the held-out tasks' headline metrics.
HEADLINE_METRICS = {(task, metric) for task, (metric, _) in headlines().items()}


def _rows(table: dict) -> list[dict]:
    names = [c["name"] for c in table["columns"]]
    return [dict(zip(names, r)) for r in table["rows"]]


def _pct(x) -> str:
    return "-" if x is None or isinstance(x, dict) else f"{100 * x:.1f}"


def _p(x) -> str:
    if x is None or isinstance(x, dict):
        return "-"
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def summary(report_dir: Path) -> str:
    r = json.loads((report_dir / "report.json").read_text())
    cells = [c for c in _rows(r["tables"]["cells"]) if c["state"] == "done" and c["requests"]]
    mcnemar = {s["configuration"]: s for s in _rows(r["tables"]["significance"])
               if s["comparison"] == "fine-tuning" and s["quantity"] == "success"}
    margin = {s["configuration"]: s for s in _rows(r["tables"]["significance"])
              if s["comparison"] == "fine-tuning" and s["quantity"] == "margin"}
    # The held-out task's headline metric (report/downstream.py headlines()) of M0, M_f, M_ef, per cell.
    task = {}
    for d in _rows(r["tables"]["downstream"]):
        if isinstance(d["task"], str) and (d["task"], d["metric"]) in HEADLINE_METRICS:   # not a missing cell
            task[d["cell"]] = d
    out = ["| cell (editor / recipe) | n | ES M_e → M_ef | PS M_e → M_ef | NS M_e → M_ef | EFR (flipped / "
           "succeeded) | McNemar p (success M_e vs M_ef; b, c) | margin: Wilcoxon p (median drop, nats) | "
           "task M0 → M_f / M_ef (n) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        parts = c["cell"].split("/")
        name = f"{parts[1]} / {parts[4]}" if len(parts) > 4 else c["cell"]
        m = mcnemar.get(c["cell"], {})
        w = margin.get(c["cell"], {})
        t = task.get(c["cell"], {})
        drop = w.get("detail", "").rpartition("median difference ")[2] or "-"
        out.append(f"| {name} | {c['requests']} | {_pct(c['ES M_e'])} → {_pct(c['ES M_ef'])} | {_pct(c['PS M_e'])} → "
                   f"{_pct(c['PS M_ef'])} | {_pct(c['NS M_e'])} → {_pct(c['NS M_ef'])} | {_pct(c['EFR'])}% "
                   f"({c['flipped']} / {c['succeeded after editing']}) | {_p(m.get('p'))} ({m.get('detail', '-')}) | "
                   f"{_p(w.get('p'))} ({drop}) | {_pct(t.get('M0'))} → {_pct(t.get('M_f'))} / {_pct(t.get('M_ef'))} "
                   f"({t.get('n', '-')}) |")
    missing = _rows(r["tables"]["missing_cells"])
    if missing:
        states = {st: sum(m["state"] == st for m in missing) for st in dict.fromkeys(m["state"] for m in missing)}
        out += ["", f"{len(missing)} cells without a result ({', '.join(f'{n} {st}' for st, n in states.items())}): "
                + "; ".join(m["cell"] for m in missing) + "."]
    out += ["", f"Cell states: {r['cell_states']}; report {r['created']} (editdecay {r['version']})."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/study_summary.py REPORT_DIR")
    sys.stdout.write(summary(Path(sys.argv[1])))
