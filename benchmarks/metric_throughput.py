"""Benchmark: E6 metric throughput on the embedded model, batched vs one prompt at a time.

    .venv/bin/python benchmarks/metric_throughput.py [--data zsre:tests/fixtures/zsre_sample.json] [--n 50]

Prints prompts/second for both and their ratio, and checks the numbers agree.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editdecay.core.models import load_model
from editdecay.data import load_edit_data
from editdecay.measure.metrics import _pairs_for, evaluate_requests


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="zsre:tests/fixtures/zsre_sample.json")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m")
    reqs = list(load_edit_data(a.data, limit=a.n).requests)
    n_prompts = sum(len(_pairs_for(r)) for r in reqs)
    evaluate_requests(lm.model, lm.tokenizer, reqs[:2])  # warm-up
    t = time.perf_counter()
    batched = evaluate_requests(lm.model, lm.tokenizer, reqs, batch_size=a.batch_size)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    single = evaluate_requests(lm.model, lm.tokenizer, reqs, batch_size=1)
    ts = time.perf_counter() - t
    worst = max(abs((x.margin or 0) - (y.margin or 0)) for x, y in zip(batched, single))
    res = {"data": a.data, "requests": len(reqs), "prompts": n_prompts, "threads": a.threads,
           "batch_size": a.batch_size, "batched_prompts_per_s": n_prompts / tb,
           "single_prompts_per_s": n_prompts / ts, "speedup": ts / tb, "max_margin_diff": worst}
    print(json.dumps(res, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
