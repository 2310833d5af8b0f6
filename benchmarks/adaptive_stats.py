"""Adaptive E1 statistics on the embedded model: how many tokens a 20-edit MEMIT patch needs.

For the embedded MEMIT preset (layers 3-7, lambda 2000) and the first 20 worldfacts requests, this edits the
model with statistics over a fixed token count (today's default 20,000 and 10x that, 200,000: the reference)
and adaptively (`stats_tolerance` = 3e-2, 1e-2, 3e-3; the cap 200,000), and reports for each: tokens used,
E1 seconds, and the relative difference of the patch's deltas from the reference's,
max over layers of ||D - D_ref||_F / ||D_ref||_F.

The corpus is a local text file (the generated default samples from the model at ~30 tokens/s on one CPU
thread; `--corpus PATH` takes any .txt/.jsonl/.parquet). Without one, the text of the installed Python
packages' descriptions (their METADATA files) is written to a temporary .txt file: English technical
prose, enough for 200k tokens. Each setting uses a fresh statistics cache, so E1 seconds are real.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_stats.py --out /tmp/adaptive_stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def package_text(path: Path, min_chars: int = 3_000_000) -> Path:
    """Descriptions of the installed packages (METADATA bodies) as one .txt corpus, documents separated by
    blank lines."""
    import importlib.metadata as md

    docs, total = [], 0
    for dist in sorted(md.distributions(), key=lambda d: d.metadata.get("Name", "") or ""):
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        text = (body or "").strip()
        if len(text) < 500:
            continue
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 80 and not para.startswith(("```", "|", "<", "!")):
                docs.append(para)
                total += len(para)
        if total > min_chars:
            break
    path.write_text("\n\n".join(docs) + "\n")
    return path


def run(corpus: str, settings: list[tuple[str, int, float | None]], n: int = 20) -> dict:
    from editdecay.core.cache import Cache
    from editdecay.core.models import load_model
    from editdecay.data import load_edit_data
    from editdecay.edit.api import edit_model
    from editdecay.edit.workflow import edit_config

    lm = load_model("smollm2-135m")
    requests = list(load_edit_data("worldfacts", limit=n).requests)
    out = {"corpus": corpus, "n_edits": n, "runs": {}}
    deltas = {}
    for label, tokens, tol in settings:
        cfg = edit_config("memit", lm, {"stats_corpus": corpus, "stats_tokens": tokens, "stats_tolerance": tol})
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            patch, run = edit_model(lm, "memit", cfg, requests, cache=Cache(Path(d)), progress=False)
            wall = time.perf_counter() - t0
        run.restore()
        prov = run.stats_provenance
        deltas[label] = {k: v.double() for k, v in patch.deltas.items()}
        used = int(next(iter(prov["n_tokens_used"].values())))
        out["runs"][label] = {"tokens_cap": tokens, "tolerance": tol, "tokens_used": used,
                              "statistics_seconds": round(run.timer.seconds.get("statistics", 0.0), 1),
                              "edit_seconds": round(wall, 1), "adaptive": prov.get("adaptive")}
        print(label, json.dumps(out["runs"][label]), flush=True)
    ref = deltas["fixed-200k"]
    for label, D in deltas.items():
        out["runs"][label]["delta_rel_diff_vs_200k"] = round(max(
            float((D[k] - ref[k]).norm() / ref[k].norm()) for k in ref), 5)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tolerances", default="3e-2,1e-2,3e-3")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    corpus = args.corpus or str(package_text(Path(tempfile.mkdtemp()) / "packages.txt"))
    settings = [("fixed-200k", 200_000, None), ("fixed-20k", 20_000, None)]
    settings += [(f"adaptive-{t}", 200_000, float(t)) for t in args.tolerances.split(",")]
    res = run(corpus, settings)
    args.out.write_text(json.dumps(res, indent=1))
    for label, r in res["runs"].items():
        print(f"{label:16s} tokens {r['tokens_used']:>7}  E1 {r['statistics_seconds']:>6.1f} s  "
              f"delta diff vs 200k {100 * r['delta_rel_diff_vs_200k']:.2f}%")


if __name__ == "__main__":
    sys.exit(main())
