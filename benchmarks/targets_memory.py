"""Peak resident memory of E3 target optimisation on the CPU: 100 zsRE requests on the embedded model.

Each configuration runs in a fresh process (`ru_maxrss` is a process's peak): the embedded model, the MEMIT
embedded preset's E3 settings (layer 7, 25 steps) and context templates (5 x 10 sampled tokens), the first
`--n` usable zsRE records of the repository's sample. Configurations:
- share 1.0: the batch `edit.targets.cpu_batch_size` plans from this process's available memory (one process);
- share 0.5: the same with half of it (`grid run --workers 2`: each stage process plans with 1/2);
- `--fixed 128`: the fixed CPU batch of 128 requests used before (about 15 GB for 100 zsRE requests: do not run it
  on a machine that other work shares).
Prints the batch size, seconds, peak RSS and the host's available memory at the start, with the load average.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/targets_memory.py --n 100 --share 1.0 0.5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
import psutil, torch
torch.set_num_threads(1)
from editdecay.core.memory import set_host_memory_share
from editdecay.core.models import load_model
from editdecay.data.sources import EditSelection
from editdecay.edit.context import context_templates
from editdecay.edit.targets import TargetSettings, compute_targets, cpu_batch_size
n, share, fixed, zsre = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
set_host_memory_share(share)
available = psutil.virtual_memory().available
lm = load_model("smollm2-135m")
reqs = list(EditSelection(data="zsre:" + zsre, n=n).load().requests)
templates = context_templates(lm.model, lm.tokenizer, n=5, length=10, seed=0)
cfg = TargetSettings(layer=7, batch_size=int(fixed) if fixed != "none" else None)
batch = cfg.batch_size or cpu_batch_size(lm.model, lm.tokenizer, reqs, templates, cfg)
t0 = time.perf_counter()
compute_targets(lm.model, lm.tokenizer, reqs, templates, cfg, progress=False)
print(json.dumps({"n": n, "share": share, "batch": batch, "seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
                  "available_gib_at_start": round(available / 2 ** 30, 2), "load_1min": os.getloadavg()[0]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--share", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--fixed", type=int, default=None, help="also run with this fixed batch (the old CPU default: 128)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    zsre = str(ROOT / "tests" / "fixtures" / "zsre_sample.json")
    runs = [(s, "none") for s in args.share] + ([(1.0, str(args.fixed))] if args.fixed else [])
    out = []
    for share, fixed in runs:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(share), fixed, zsre], env=env,
                             capture_output=True, text=True)
        line = next((l for l in res.stdout.splitlines() if l.startswith("{")), None)
        out.append(json.loads(line) if line else {"share": share, "fixed": fixed, "error": res.stderr[-2000:]})
        print(json.dumps(out[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
