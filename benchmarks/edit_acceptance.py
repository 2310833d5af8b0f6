"""Measure the editors' acceptance figures on the embedded model (issue: editors).

    .venv/bin/python benchmarks/edit_acceptance.py [--n 100] [--out FILE.json]

- MEMIT, n worldfacts edits in one batch: ES / PS / NS before and after.
- AlphaEdit, same edits: ES, and ||Delta (I - P)|| / ||Delta|| per edited layer.
- Sequential AlphaEdit, 4 batches of n/4: efficacy on the first batch after the last batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editdecay.core.arch import arch_for, as_out_in, resolve_name
from editdecay.core.cache import Cache
from editdecay.core.models import load_model
from editdecay.data import load_edit_data
from editdecay.edit.api import edit_model
from editdecay.edit.workflow import edit_config
from editdecay.measure.metrics import aggregate, evaluate_requests


def scores(lm, reqs):
    a = aggregate(evaluate_requests(lm.model, lm.tokenizer, reqs))
    return {k: a[k] for k in ("efficacy", "paraphrase", "neighborhood", "n")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--data", default="worldfacts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--skip", default="", help="comma list of parts to skip: memit,alphaedit,sequential")
    p.add_argument("--override", default="{}", help="JSON editor-config fields applied over the preset, "
                                                   "e.g. '{\"stats_tokens\": 50000}'")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cache = Cache.default()
    lm = load_model("smollm2-135m")
    reqs = list(load_edit_data(a.data, limit=a.n, seed=0).requests)
    out = {"n": len(reqs), "data": a.data, "pre": scores(lm, reqs)}
    print("pre", out["pre"], flush=True)
    skip = set(a.skip.split(","))
    override = json.loads(a.override)
    if "memit" not in skip:
        cfg = edit_config("memit", lm, override)
        t = time.time()
        patch, run = edit_model(lm, "memit", cfg, reqs, cache=cache, progress=False)
        out["memit"] = {"post": scores(lm, reqs), "seconds": time.time() - t, "timings": run.timer.seconds,
                        "config": cfg.model_dump(mode="json")}
        run.restore()
        print("memit", out["memit"]["post"], round(out["memit"]["seconds"]), flush=True)
    if "alphaedit" not in skip:
        cfg = edit_config("alphaedit", lm, {k: v for k, v in override.items() if k != "mom2_update_weight"})
        t = time.time()
        patch, run = edit_model(lm, "alphaedit", cfg, reqs, cache=cache, progress=False)
        spec = arch_for(lm.model)
        ratios = {}
        for layer in patch.layers:
            name = resolve_name(lm.model, spec.mlp_out_name(layer))
            delta = as_out_in(patch.deltas[name], spec).double()        # (d, d_k)
            P = run.solver.P[layer].double()
            ratios[layer] = float((delta - delta @ P).norm() / delta.norm())
        out["alphaedit"] = {"post": scores(lm, reqs), "seconds": time.time() - t, "timings": run.timer.seconds,
                            "nullspace_ratio": ratios,
                            "projector_rank": {l: float(run.solver.P[l].trace()) for l in patch.layers},
                            "config": cfg.model_dump(mode="json")}
        run.restore()
        print("alphaedit", out["alphaedit"]["post"], ratios, flush=True)
    if "sequential" not in skip:
        cfg = edit_config("alphaedit", lm, {k: v for k, v in override.items() if k != "mom2_update_weight"})
        size = len(reqs) // 4
        patch, run = edit_model(lm, "alphaedit", cfg, reqs[:4 * size], batch_size=size, cache=cache, progress=False)
        out["sequential_alphaedit"] = {"batches": 4, "batch_size": size, "first_batch": scores(lm, reqs[:size]),
                                       "all": scores(lm, reqs[:4 * size])}
        run.restore()
        print("sequential", out["sequential_alphaedit"], flush=True)
    print(json.dumps(out, indent=2, default=str))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
