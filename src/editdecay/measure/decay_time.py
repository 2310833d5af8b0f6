"""Decay over time: when each edit fails during fine-tuning, a survival curve per run, and margin slopes.

Input: the per-request decay curve of a fine-tuning run (`request_curve.jsonl`, written by finetune/run.py as
the run goes): one line per checkpoint,

    {"step": 40, "examples_seen": 320,
     "requests": {case_id: {"success": bool, "margin": float | null}, ...},
     "control": {case_id: {"known": bool, "margin": float | null}, ...}}      (control: with a knowledge control)

where step 0 is the model handed to fine-tuning (M_e). Definitions (E7, over time):

- at risk: the edits that succeed at step 0 (an edit that never took cannot decay);
- failure time of an edit: the first checkpoint after step 0 at which it fails; an edit still succeeding at
  its last recorded checkpoint is censored there (normally the run's last checkpoint; a request missing from
  later lines, e.g. a run that diverged, is censored at its last line);
- survival curve: the Kaplan-Meier estimate S(t) = prod_{t_j <= t} (1 - d_j / n_j) over the checkpoints, with
  d_j failures at t_j and n_j edits at risk just before t_j (not failed before, observed at t_j); with every
  edit observed at every checkpoint this is the fraction of at-risk edits that have not failed by t;
- margin slope: the least-squares slope of the margin NLL(true) - NLL(new) against examples seen, in nats per
  1,000 examples (negative: the edit weakens); None with fewer than two margins.

Control facts (measure/knowledge.py) get the same treatment with "known" in place of "success", so a known
fact's curve can be drawn beside the edits'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from editdecay.core.errors import DataError

REQUEST_CURVE_FILE = "request_curve.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    examples_seen: int
    requests: Mapping[str, Mapping]          # case id -> {"success", "margin"}
    control: Mapping[str, Mapping]           # case id -> {"known", "margin"}


def read_request_curve(path: str | Path) -> list[Checkpoint]:
    """The checkpoints of a `request_curve.jsonl` in step order. DataError naming the file and line when a line
    is not JSON or lacks `step` / `requests`."""
    p = Path(path)
    out = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{p}: cannot read the per-request decay curve ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Checkpoint(int(d["step"]), int(d.get("examples_seen", d["step"])), d["requests"],
                                  d.get("control") or {}))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{p}: line {i} is not a checkpoint {{step, examples_seen, requests}} ({e})") from None
    return sorted(out, key=lambda c: c.step)


@dataclass(frozen=True)
class Fate:
    """One at-risk item's time to failure: `time` is the failure checkpoint (failed) or the last one it was
    seen at (censored), in steps and in examples seen."""

    case_id: str
    failed: bool
    step: int
    examples_seen: int
    slope: float | None                     # margin nats per 1,000 examples


def fates(curve: Sequence[Checkpoint], *, key: str = "success", group: str = "requests") -> list[Fate]:
    """Failure or censoring of every item that holds (`key` true) at the first checkpoint; items in file order
    of the first checkpoint. `group`: "requests" (edits) or "control" (known facts, key "known")."""
    if not curve:
        return []
    first = getattr(curve[0], group)
    out = []
    for cid, v in first.items():
        if not v.get(key):
            continue
        seen = [(c, getattr(c, group)[cid]) for c in curve if cid in getattr(c, group)]
        failed = next(((c, x) for c, x in seen[1:] if not x.get(key)), None)
        end = failed[0] if failed else seen[-1][0]
        out.append(Fate(cid, failed is not None, end.step, end.examples_seen, margin_slope(
            [(c.examples_seen, x.get("margin")) for c, x in seen])))
    return out


def margin_slope(points: Iterable[tuple[int, float | None]]) -> float | None:
    """Least-squares slope of margin against examples seen, per 1,000 examples (None: < 2 points or one x)."""
    pts = [(float(x), float(y)) for x, y in points if y is not None]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return 1000.0 * sum((x - mx) * (y - my) for x, y in pts) / sxx


def kaplan_meier(items: Sequence[Fate], times: Sequence[int], *, by: str = "step") -> list[dict]:
    """S(t) at each of `times` (checkpoint steps, or examples seen with by="examples_seen"):
    [{t, at_risk, failed, censored, survival}] where at_risk / failed / censored count the items at that time."""
    s = 1.0
    out = []
    for t in times:
        at_risk = sum(1 for f in items if getattr(f, by) >= t)
        failed = sum(1 for f in items if f.failed and getattr(f, by) == t)
        censored = sum(1 for f in items if not f.failed and getattr(f, by) == t)
        if at_risk and t != times[0]:
            s *= 1 - failed / at_risk
        out.append({"t": t, "at_risk": at_risk, "failed": failed, "censored": censored, "survival": s})
    return out


def survival_curve(curve: Sequence[Checkpoint], *, group: str = "requests") -> dict:
    """{by_step: KM rows, examples_seen: per checkpoint, n_at_risk, n_failed, median_step (first step where S
    <= 0.5, None if never), fates: {case_id: {failed, step, examples_seen, slope}}} for edits or control facts."""
    key = "success" if group == "requests" else "known"
    items = fates(curve, key=key, group=group)
    steps = [c.step for c in curve]
    rows = kaplan_meier(items, steps)
    for row, c in zip(rows, curve):
        row["examples_seen"] = c.examples_seen
    median = next((r["t"] for r in rows if r["survival"] <= 0.5), None)
    return {"by_step": rows, "n_at_risk": len(items), "n_failed": sum(f.failed for f in items),
            "median_step": median,
            "fates": {f.case_id: {"failed": f.failed, "step": f.step, "examples_seen": f.examples_seen,
                                  "slope": f.slope} for f in items}}


__all__ = ["Checkpoint", "Fate", "REQUEST_CURVE_FILE", "fates", "kaplan_meier", "margin_slope",
           "read_request_curve", "survival_curve"]
