"""Stage times of the embedded study v3 (examples/grids/embedded-study-v3.yaml) and its wall-time estimate.

Measures, on this machine, with one torch thread, the embedded model and the v3 recipe (chatterbot choice
records, batch 8, cutoff 160, train_on_prompt):
- seconds per optimiser step of full, LoRA and DoRA fine-tuning on all layers (`--steps` steps; the mean over
  them and one step before) and of LoRA on 5 layers (the edited layers 3-7); with --bf16 also the three methods
  under bfloat16 autocast (recipe dtype);
- seconds per decay-curve checkpoint: 100 edit requests (worldfacts, zsRE) and the 94 held-out choice records;
- the model load.
Then estimates the grid's wall time from its plan: every fine-tuning stage = load + steps x step time +
checkpoints x checkpoint time (+ 2 checkpoints for M0 / M_e before training), patches and evaluations with the
times given (`--patch-seconds`, `--evaluate-seconds`: measured elsewhere), the E1 statistics cached; and the
schedule of `--workers` processes taking stages in plan order as their dependencies finish (the local
backend's). The load average is recorded: on a machine shared with other work every figure is slower.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stage_times.py --steps 3 --json stage_times.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Share of an edit's time that is E3 (the targets stage): `editdecay edit --data zsre:... --n 20` on the embedded
# model, one thread, 2026-12-04 22:31 UTC: targets 169.1 s of 186.8 s (context 4.7, statistics 1.6, keys 11.0,
# solve 0.4).
E3_SHARE = 0.9
GRID = ROOT / "examples" / "grids" / "embedded-study-v3.yaml"


def measure(args) -> dict:
    from editdecay.core.models import load_model
    from editdecay.data.instructions import tokenize
    from editdecay.data.sources import EditSelection, held_out_task, load_source
    from editdecay.finetune.callback import measure as measure_curve_point
    from editdecay.finetune.recipe import preset
    from editdecay.finetune.trainable import resolve_plan
    from editdecay.finetune.train import train
    from editdecay.grid.plan import build_plan
    from editdecay.grid.spec import load_grid

    grid = load_grid(GRID)
    settings = grid.shared.chatterbot.to_dict()
    task = held_out_task("chatterbot", settings)
    source = load_source("chatterbot", task=task)
    out = {"load_1min_start": os.getloadavg()[0], "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    # the grid's own speed settings (dtype, group_by_length) for every timed recipe: what its stages will run
    first = next(st.spec.recipe for st in build_plan(grid).stages.values() if st.kind == "finetune")
    over = dict(batch_size=8, warmup_steps=0, cutoff_len=160, train_on_prompt=True, dtype=first.dtype,
                group_by_length=first.group_by_length)
    out["recipe_speed_settings"] = {"dtype": first.dtype, "group_by_length": first.group_by_length}
    steps = {}
    configs = [("lora", "lora", "all", "float32"), ("dora", "dora", "all", "float32"), ("full", "full", "all", "float32"),
               ("lora-5-layers", "lora", (3, 4, 5, 6, 7), "float32")]
    if args.bf16:
        configs += [(f"{m}-bf16", m, "all", "bfloat16") for m in ("lora", "dora", "full")]
    for label, method, layers, dtype in configs:
        model = load_model("smollm2-135m").model if method == "full" else lm.model
        recipe = preset("embedded", method, **{**over, "dtype": dtype if dtype != "float32" else over["dtype"]},
                        layers=layers, max_steps=1 + args.steps)
        data = tokenize(source, lm.tokenizer, cutoff_len=recipe.cutoff_len, template=recipe.template,
                        train_on_prompt=True)
        plan = resolve_plan(recipe, model)
        out["n_examples"] = len(data.examples)
        o = train(model, lm.tokenizer, recipe, data, plan=plan, progress=False)
        log = o.train_seconds
        steps[label] = {"seconds_per_step": round(log / o.steps, 3), "tokens_per_second": round(o.tokens_per_second, 1),
                        "load_1min": os.getloadavg()[0]}
        if method != "full":
            lm.model = o.model.unload() if hasattr(o.model, "unload") else o.model
        print(label, steps[label], flush=True)
    out["step"] = steps
    records = task.records()[1]
    evals = {}
    for data in ("worldfacts", "zsre:" + str(ROOT / "tests" / "fixtures" / "zsre_sample.json")):
        reqs = EditSelection(data=data, n=100, seed=0).load().requests
        t0 = time.perf_counter()
        measure_curve_point(lm.model, lm.tokenizer, reqs, records, template="compact", batch_size=32)
        evals[data.split(":")[0]] = round(time.perf_counter() - t0, 2)
        print("checkpoint", data.split(":")[0], evals[data.split(":")[0]], flush=True)
    out["checkpoint_seconds"] = evals
    out["load_1min_end"] = os.getloadavg()[0]
    return out


# The grid file's cut order (examples/grids/embedded-study-v3.yaml, comment "cells are cut BEFORE the run"):
# (edit data, recipe, editors in the order they go), first entry cut first.
CUT_ORDER = [("worldfacts", "lora-all-3ep", ("alphaedit", "memit")), ("worldfacts", "dora-all", ("alphaedit", "memit")),
             ("worldfacts", "lora-edited", ("alphaedit", "memit")),
             ("worldfacts", "lora-non-edited", ("alphaedit", "memit")),
             ("worldfacts", "full-all", ("alphaedit", "memit")), ("zsre", "lora-all-3ep", ("alphaedit",)),
             ("zsre", "dora-all", ("alphaedit", "memit")), ("zsre", "lora-edited", ("alphaedit", "memit")),
             ("zsre", "lora-non-edited", ("alphaedit", "memit")), ("worldfacts", "lora-all", ("alphaedit", "memit")),
             ("zsre", "full-all", ("alphaedit", "memit")), ("zsre", "lora-all-3ep", ("memit",)),
             ("zsre", "lora-all", ("alphaedit",))]


def cut_sequence(plan) -> list[str]:
    """Cell ids in the order the grid file cuts them."""
    out = []
    for data, recipe, editors in CUT_ORDER:
        for editor in editors:
            out += [c.id for c in plan.cells if (c.axes["edit_data_label"], c.axes["recipe"], c.axes["editor"])
                    == (data, recipe, editor)]
    return out


def within_budget(m: dict, workers: int, patch_seconds: float, evaluate_seconds: float, budget: float,
                  patch_seconds_zsre: float | None = None, e3_share: float = E3_SHARE) -> dict:
    """Cut cells in the grid file's order until the estimated wall time with `workers` fits `budget` seconds."""
    from editdecay.grid.plan import build_plan
    from editdecay.grid.spec import load_grid

    plan = build_plan(load_grid(GRID))
    cut: list[str] = []
    order = cut_sequence(plan)
    while True:
        kept = [c.id for c in plan.cells if c.id not in cut]
        est = estimate(m, workers, patch_seconds, evaluate_seconds, cells=kept, patch_seconds_zsre=patch_seconds_zsre,
                       e3_share=e3_share)
        if est["wall_seconds"] <= budget or not kept or len(cut) == len(order):
            return {**est, "budget_seconds": budget, "cut": [_label(plan, c) for c in cut],
                    "kept": [_label(plan, c) for c in kept]}
        cut.append(order[len(cut)])


def _label(plan, cell_id: str) -> str:
    c = next(c for c in plan.cells if c.id == cell_id)
    return f"{c.axes['editor']}/{c.axes['edit_data_label']}/{c.axes['recipe']}"


def estimate(m: dict, workers: int, patch_seconds: float, evaluate_seconds: float,
             cells: list[str] | None = None, patch_seconds_zsre: float | None = None,
             e3_share: float = E3_SHARE) -> dict:
    """Stage seconds from the measured figures and the schedule of `workers` processes over the plan (the stages of
    `cells` only, when given). A patch's seconds are an edit's whole time; where the plan has a targets stage,
    `e3_share` of it is charged to that stage (E3, beside E1) and the rest to the patch."""
    from editdecay.data.sources import held_out_task
    from editdecay.finetune import schedule
    from editdecay.finetune.train import total_optimizer_steps
    from editdecay.grid.plan import build_plan
    from editdecay.grid.spec import load_grid

    grid = load_grid(GRID)
    plan = build_plan(grid)
    n_train = m.get("n_examples") or len(held_out_task("chatterbot", grid.shared.chatterbot.to_dict()).records()[0])
    wanted = {s for c in plan.cells if cells is None or c.id in cells for s in c.stages.values()}
    secs = {}
    for sid, st in plan.stages.items():
        if sid not in wanted:
            continue
        if st.kind == "finetune":
            r = st.spec.recipe
            total = total_optimizer_steps(r, n_train)
            label = r.method if r.layers == "all" else "lora-5-layers" if r.layers == "edited" else "lora"
            per_step = m["step"][label]["seconds_per_step"]
            data = "zsre" if st.spec.patch and "zsre" in plan.stages[st.spec.patch].spec.requests.data else "worldfacts"
            points = len(schedule.steps(st.spec.eval_every, total)) + (2 if st.spec.patch else 1)
            secs[sid] = m["load_seconds"] + total * per_step + points * m["checkpoint_seconds"][data]
        elif st.kind in ("patch", "targets"):
            zsre = "zsre" in st.spec.requests.data
            edit = patch_seconds_zsre if zsre and patch_seconds_zsre else patch_seconds
            share = e3_share if st.kind == "targets" else 1.0 - e3_share if st.spec.targets else 1.0
            secs[sid] = share * edit
        elif st.kind == "evaluate":
            secs[sid] = evaluate_seconds
        else:
            secs[sid] = 1.0             # statistics cached, cell assembly
    serial = sum(secs.values())
    # list scheduling in plan order, as the local backend starts stages
    order = [s for s in plan.stages if s in secs]
    done_at: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    pending, clock = list(order), 0.0
    while pending or running:
        ready = [s for s in pending if all(d in done_at and done_at[d] <= clock for d in plan.stages[s].deps
                                           if d in secs)]
        while ready and len(running) < workers:
            s = ready.pop(0)
            pending.remove(s)
            heapq.heappush(running, (clock + secs[s], s))
        end, s = heapq.heappop(running)
        clock, done_at[s] = end, end
    by_kind = {}
    for sid in secs:
        kind = plan.stages[sid].kind
        by_kind[kind] = by_kind.get(kind, 0) + secs[sid]
    return {"stages": len(secs), "serial_seconds": round(serial), "workers": workers, "wall_seconds": round(clock),
            "seconds_by_kind": {k: round(v) for k, v in by_kind.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bf16", action="store_true", help="also time the bfloat16-autocast recipes")
    ap.add_argument("--budget-minutes", type=float, default=150.0, help="cut cells in the grid's order to fit this")
    ap.add_argument("--patch-seconds", type=float, default=406.0,
                    help="one 100-edit patch (default: MEMIT, 100 worldfacts edits, embedded study v2)")
    ap.add_argument("--patch-seconds-zsre", type=float, default=1108.0,
                    help="one 100-edit zsRE patch (default: twice MEMIT's 554 s for 50 zsRE edits, `make demo`'s grid at "
                         "50 edits, 4 Dec 2026, the other core busy)")
    ap.add_argument("--evaluate-seconds", type=float, default=20.0)
    ap.add_argument("--e3-share", type=float, default=E3_SHARE,
                    help="share of an edit's seconds that is E3, charged to its targets stage (beside E1)")
    ap.add_argument("--measured", default=None, help="read the measured figures from this JSON instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = json.loads(Path(args.measured).read_text())["measured"] if args.measured else measure(args)
    est = [estimate(m, w, args.patch_seconds, args.evaluate_seconds, patch_seconds_zsre=args.patch_seconds_zsre,
                    e3_share=args.e3_share)
           for w in args.workers]
    fits = within_budget(m, max(args.workers), args.patch_seconds, args.evaluate_seconds, args.budget_minutes * 60,
                         patch_seconds_zsre=args.patch_seconds_zsre, e3_share=args.e3_share)
    out = {"measured": m, "estimate": est, "within_budget": fits, "patch_seconds": args.patch_seconds}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
