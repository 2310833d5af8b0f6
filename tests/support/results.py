"""A results directory built by hand with known per-request outcomes, as `editdecay grid run` leaves one.

The grid (model "tiny", data "cf", 4 edits r1..r4, fine-tuning data "embedded", seed 0):

    A  memit     lora-all     done
    B  memit     full-all     done     (same patch as A: same M0 and M_e)
    C  alphaedit lora-all     done
    D  alphaedit full-all     failed   (its M_ef fine-tuning stage failed)
    E  memit     lora-edited  pending  (never ran)
    F  -         lora-all     done     (n_edits = 0: downstream only)

Report tests work out every expected number by hand from `OUTCOMES`, `TASK` and `LM_EVAL`. Per-request
outcomes: erased (cell, request) pairs are A/r2, B/r1, B/r2; survivors A/r1, A/r3, B/r3, C/r1..r4
(r4 failed after editing in A and B).
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from editdecay.grid.plan import Cell, Plan, Stage
from editdecay.grid.store import GridStore

IDS = ("r1", "r2", "r3", "r4")
M0 = dict(eff=[0, 0, 0, 0], para=[0, 0.5, 0, 0], nb=[1, 1, 1, 0.5], margin=[-1, -2, -3, -4])
MF = dict(eff=[0, 0, 0, 0], para=[0, 0, 0, 0], nb=[1, 1, 1, 1], margin=[-1, -2, -3, -4])
ME_MEMIT = dict(eff=[1, 1, 1, 0], para=[1, 0.5, 1, 0], nb=[1, 1, 0.5, 0.5], margin=[3, 2, 1, -1])
ME_ALPHA = dict(eff=[1, 1, 1, 1], para=[1, 1, 0.5, 0.5], nb=[1, 0.5, 1, 1], margin=[2, 2, 2, 2])
OUTCOMES = {
    "A": {"M0": M0, "M_e": ME_MEMIT, "M_f": MF,
          "M_ef": dict(eff=[1, 0, 1, 1], para=[0.5, 0.5, 1, 0], nb=[1, 1, 1, 0.5], margin=[2, -1, 0.5, 0.25])},
    "B": {"M0": M0, "M_e": ME_MEMIT, "M_f": MF,
          "M_ef": dict(eff=[0, 0, 1, 0], para=[0, 0, 0.5, 0], nb=[1, 1, 1, 1], margin=[-0.5, -1, 0.5, -2])},
    "C": {"M0": M0, "M_e": ME_ALPHA, "M_f": MF,
          "M_ef": dict(eff=[1, 1, 1, 1], para=[1, 1, 0.5, 0.5], nb=[1, 1, 1, 1], margin=[1.5, 1, 2.5, 2])},
}
TASK = {"A": {"M0": 0.1, "M_e": 0.1, "M_f": 0.5, "M_ef": 0.4}, "B": {"M0": 0.1, "M_e": 0.1, "M_f": 0.6, "M_ef": 0.6},
        "C": {"M0": 0.1, "M_e": 0.1, "M_f": 0.5, "M_ef": 0.3}, "F": {"M0": 0.1, "M_f": 0.5}}
LM_EVAL = {"A": {"M_f": {"boolq": {"acc": 0.7, "acc_stderr": 0.04, "n": 50}},
                 "M_ef": {"boolq": {"acc": 0.6, "acc_stderr": 0.05, "n": 50},
                          "wikitext": {"word_perplexity": 30.5, "n": 10, "n_tokens": 1000}}}}
CELLS = {  # name: (editor, recipe, method, layers, n_edits, state)
    "A": ("memit", "lora-all", "lora", "all", 4, "done"),
    "B": ("memit", "full-all", "full", "all", 4, "done"),
    "C": ("alphaedit", "lora-all", "lora", "all", 4, "done"),
    "D": ("alphaedit", "full-all", "full", "all", 4, "failed"),
    "E": ("memit", "lora-edited", "lora", "edited", 4, "pending"),
    "F": (None, "lora-all", "lora", "all", 0, "done"),
}


def cell_label(name: str) -> str:
    """The label of hand-built cell `name` ("A".."F") as the report prints it."""
    editor, recipe, _, _, n, _ = CELLS[name]
    return f"tiny/{editor or '-'}/{'cf' if n else '-'}/n{n}/{recipe}/embedded/s0"


def _outcome(case_id: str, o: dict, i: int) -> dict:
    return {"case_id": case_id, "style": "counterfact", "efficacy": float(o["eff"][i]),
            "paraphrase": float(o["para"][i]), "neighborhood": float(o["nb"][i]), "efficacy_acc": float(o["eff"][i]),
            "paraphrase_acc": 0.0, "neighborhood_acc": 0.0, "margin": float(o["margin"][i]), "n_paraphrase": 2,
            "n_neighborhood": 2}


def _result(name: str, cell: Cell) -> dict:
    """A cell result in the store.py schema; stored aggregates are plain means of the rows (consistent)."""
    editor, recipe, method, layers, n, _ = CELLS[name]
    metrics, requests, decay = {}, [], {}
    if n:
        outs = OUTCOMES[name]
        for m, o in outs.items():
            metrics[m] = {"efficacy": mean(o["eff"]), "paraphrase": mean(o["para"]), "neighborhood": mean(o["nb"]),
                          "n": 4, "margin": mean(o["margin"])}
        for i, cid in enumerate(IDS):
            row = {m: _outcome(cid, outs[m], i) for m in outs}
            success = {m: outs[m]["eff"][i] >= 0.5 for m in outs}
            requests.append({"case_id": cid, **row, "success": success,
                             "margin": {m: float(outs[m]["margin"][i]) for m in outs},
                             "flipped": success["M_e"] and not success["M_ef"]})
        ok_e = [r for r in requests if r["success"]["M_e"]]
        flipped = [r["case_id"] for r in ok_e if not r["success"]["M_ef"]]
        decay = {"edit_flip_ratio": {"value": len(flipped) / len(ok_e), "n_success_edited": len(ok_e),
                                     "n_flipped": len(flipped), "n": 4, "threshold": 0.5, "flipped": flipped},
                 "relative_decrease": {s: (metrics["M_e"][s] - metrics["M_ef"][s]) / metrics["M_e"][s]
                                       for s in ("efficacy", "paraphrase", "neighborhood")}}
    for m, acc in TASK[name].items():
        metrics.setdefault(m, {"n": 0})
        metrics[m].update(task_accuracy=acc, n_task=10)
    for m, tasks in LM_EVAL.get(name, {}).items():
        metrics[m]["downstream"] = tasks
        metrics[m]["downstream_score"] = tasks["boolq"]["acc"]      # the only task with an accuracy
    curve = [{"step": 0, "efficacy": metrics.get("M_e", {}).get("efficacy"), "task_accuracy": TASK[name].get("M_e")},
             {"step": 3, "efficacy": metrics.get("M_ef", {}).get("efficacy"), "task_accuracy": TASK[name].get("M_ef")}]
    return {"schema_version": 1, "kind": "grid-cell", "cell_schema_version": 1, "grid": "hand",
            "cell": {"id": cell.id, "label": cell.label, "axes": cell.axes},
            "config": {"model": {"name": "tiny"}, "recipe": {"method": method, "layers": layers},
                       "finetune_data": "embedded", "task": None},
            "model": {"name": "tiny", "fingerprint": "0"}, "metrics": metrics, "decay": decay,
            "curve": curve if n else [], "curve_base": [{"step": 0, "task_accuracy": 0.1},
                                                        {"step": 3, "task_accuracy": TASK[name]["M_f"]}],
            "requests": requests}


def tree(root: Path) -> dict:
    """Every path under `root` with its size, mode and modification time: two snapshots differ if anything under
    `root` was written, removed, replaced or had its permissions changed."""
    import os

    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return out


def build_results_dir(root: Path, *, corrupt: bool = False) -> dict[str, Cell]:
    """Plan, stage manifests, a failure record and result files, as `editdecay grid run` leaves them."""
    stages, cells = {}, {}

    def stage(sid, kind, deps=()):
        stages.setdefault(sid, Stage(sid, kind, {}, tuple(deps), sid))
        return sid

    for name, (editor, recipe, method, layers, n, _) in CELLS.items():
        axes = {"model": "tiny", "model_label": "tiny", "editor": editor, "edit_data": "cf" if n else None,
                "edit_data_label": "cf" if n else None, "n_edits": n, "recipe": recipe, "method": method,
                "layers": layers, "targets": "all-linear", "finetune_data": "embedded",
                "finetune_data_label": "embedded", "seed": 0}
        roles = {"finetune_base": stage(f"finetune-base-{recipe}", "finetune")}
        if n:
            roles["patch"] = stage(f"patch-{editor}", "patch")
            roles["finetune_edited"] = stage(f"finetune-{name}", "finetune", [roles["patch"]])
        roles["cell"] = stage(f"cell-{name}", "cell", list(roles.values()))
        cells[name] = Cell(f"cell-{name}-id", cell_label(name), axes, roles)
    plan = Plan("hand", tuple(cells.values()), stages)
    store = GridStore(root)
    store.write_plan(plan)
    for name, cell in cells.items():
        state = CELLS[name][5]
        if state == "done":
            with store.take(cell.stages["cell"]) as lease, lease.building("cell") as tmp:
                (tmp / "result.json").write_text(json.dumps(_result(name, cell)))
            store.publish_result(plan, cell.id)
        elif state == "failed":
            with store.take(cell.stages["finetune_edited"]) as lease:
                lease.record_failure("finetune", "NonFiniteError: loss is nan",
                                     "Traceback (most recent call last):\n  ...\nNonFiniteError: loss is nan")
    if corrupt:
        path = store.result_path(cells["A"].id)
        r = json.loads(path.read_text())
        r["decay"]["edit_flip_ratio"]["value"] = 0.5
        r["metrics"]["M_ef"]["efficacy"] = 0.5
        r["metrics"]["M_ef"]["downstream_score"] = 0.65
        path.write_text(json.dumps(r))
    return cells
