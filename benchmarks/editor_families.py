"""Every registered editor on the embedded model: ES / PS / NS after editing n worldfacts requests, edit time and
memory (docs/METHODS.md, editor families).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/editor_families.py [--n 50] [--editors ft,grace,mend]
        [--override '{"mend": {"hypernetwork": "DIR"}}'] [--out FILE.json]

Each editor edits the same sample (`--n` requests, `--seed`, one batch: what a grid's patch stage does) with its
embedded preset plus `--override` fields, on the same loaded model (restored after each). Memory: the process's
peak resident set grows monotonically; on a shared machine the CPU time (process_time, user + system) is the
figure that does not depend on the other load, the wall time is what it was, so each editor's figure is the peak reached while it ran (ru_maxrss,
Linux KiB) and the increase over the peak before it; run one editor per process for a clean figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from editdecay.core.cache import Cache
from editdecay.core.models import load_model
from editdecay.data import load_edit_data
from editdecay.edit.api import edit_model
from editdecay.edit.registry import editor_names
from editdecay.edit.workflow import edit_config
from editdecay.measure.metrics import aggregate, evaluate_requests


def scores(lm, reqs) -> dict:
    a = aggregate(evaluate_requests(lm.model, lm.tokenizer, reqs))
    return {k: a[k] for k in ("efficacy", "paraphrase", "neighborhood", "n")}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="worldfacts")
    p.add_argument("--editors", default=",".join(editor_names()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--override", default="{}", help="JSON: editor -> config fields over its embedded preset")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    overrides = json.loads(a.override)
    lm = load_model("smollm2-135m")
    reqs = list(load_edit_data(a.data, limit=a.n, seed=a.seed).requests)
    out = {"n": len(reqs), "data": a.data, "seed": a.seed, "threads": a.threads, "pre": scores(lm, reqs),
           "editors": {}}
    print("pre", out["pre"], flush=True)
    for editor in a.editors.split(","):
        cfg = edit_config(editor, lm, overrides.get(editor, {}))
        peak_before = peak_mib()
        t, cpu = time.perf_counter(), time.process_time()
        patch, run = edit_model(lm, editor, cfg, reqs, cache=Cache.default(), progress=False)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        post = scores(lm, reqs)
        run.restore()
        out["editors"][editor] = {
            "post": post, "edit_seconds": round(seconds, 1), "edit_cpu_seconds": round(cpu, 1), "timings": run.timer.seconds,
            "peak_rss_mib": round(peak_mib()), "peak_rss_increase_mib": round(peak_mib() - peak_before),
            "patch_mib": round(sum(t.numel() * t.element_size() for t in patch.tensors().values()) / 2**20, 2),
            "config": cfg.model_dump(mode="json"), "warnings": patch.extra.get("warnings", []),
        }
        print(editor, post, f"{seconds:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2, default=str)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
