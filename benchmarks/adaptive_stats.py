"""Adaptive E1 statistics on the embedded model: how many tokens a 20-edit MEMIT patch needs.

For the embedded MEMIT preset (layers 3-7, lambda 2000) and the first 20 worldfacts requests:

1. E1 runs adaptively to a cap of 200,000 tokens (10x today's default of 20,000) with the tolerance at 0,
   so every doubling checkpoint is computed; each records its convergence measure (`EditProbe.change`) and
   the seconds spent so far. The last checkpoint is a fixed 200k-token run (bit-identical stream and batches).
2. E3 targets are computed once (they do not depend on C); then the patch's deltas are solved (E2 keys, E4)
   with the statistics of every checkpoint, of the fixed default (20,000 tokens) and of the 200k reference.
3. For each checkpoint: the deltas' difference from the reference's, max over layers, (a) plain
   ||D - D_ref||_F / ||D_ref||_F and (b) where it acts: on the edit keys, ||(D - D_ref) K|| / ||D_ref K||, and on
   generic keys, sqrt(tr((D - D_ref) C_ref (D - D_ref)^T) / tr(D_ref C_ref D_ref^T)), the larger of the two.
4. For each candidate tolerance: where the adaptive pass would stop, its tokens and E1 seconds (against the
   200k run's) and the difference (b) of its deltas from the reference.

The corpus is a local text file (the generated default samples from the model at ~30 tokens/s on one CPU
thread; `--corpus PATH` takes any .txt/.jsonl/.parquet). Without one, the descriptions of the installed
Python packages (their METADATA) are written to a temporary .txt file (~380k tokens of English prose).

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

CAP = 200_000
DEFAULT = 20_000
TOLERANCES = (0.5, 0.3, 0.2, 0.1, 0.05)


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


def solve_deltas(run, z: torch.Tensor, requests, C: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """E2 keys + E4 solves layer by layer (as `EditingRun.edit_batch`, with the targets z given), using the
    statistics C; returns the deltas (float64, the weight layout) and restores the model."""
    from editdecay.core.arch import as_out_in
    from editdecay.edit.keys import block_outputs_at_subject, compute_keys

    model, tok = run.lm.model, run.lm.tokenizer
    run.solver.C = {l: C[l] for l in run.layers}
    top, m = run.layers[-1], len(run.layers)
    for name in run.accum:
        run.accum[name].zero_()
    for j, layer in enumerate(run.layers):
        K = compute_keys(model, tok, requests, [layer], run.templates)[layer]
        h_now = block_outputs_at_subject(model, tok, requests, top)
        delta = run.solver.layer_delta(layer, K, (z - h_now) / (m - j))
        run._add(run.names[layer], as_out_in(delta, run.spec))
    out = {n: a.clone() for n, a in run.accum.items()}
    run.restore()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from editdecay.core.cache import Cache
    from editdecay.core.models import load_model
    from editdecay.data import load_edit_data
    from editdecay.data.corpus import parse_corpus
    from editdecay.edit.memit import Memit
    from editdecay.edit.run import EditingRun
    from editdecay.edit.stats import second_moments
    from editdecay.edit.stats_adaptive import adaptive_second_moments, memit_probe
    from editdecay.edit.targets import TargetSettings, compute_targets
    from editdecay.edit.workflow import edit_config

    corpus_text = args.corpus or str(package_text(Path(tempfile.mkdtemp()) / "packages.txt"))
    lm = load_model("smollm2-135m")
    requests = list(load_edit_data("worldfacts", limit=args.n).requests)
    cfg = edit_config("memit", lm, {"stats_corpus": corpus_text, "stats_tokens": CAP})
    corpus = parse_corpus(corpus_text)
    cache = Cache(Path(tempfile.mkdtemp()))
    layers = list(cfg.layers)

    run = EditingRun(lm, Memit(cfg, {l: torch.eye(1) for l in layers}), progress=False)
    from editdecay.edit.keys import compute_keys

    keys = compute_keys(lm.model, lm.tokenizer, requests, layers, run.templates)
    probe = memit_probe(keys, cfg.mom2_update_weight)
    st = adaptive_second_moments(lm, layers, corpus=corpus, probe=probe, tolerance=1e-12, max_tokens=CAP,
                                 cache=cache, progress=False)
    history = st.provenance["adaptive"]["checkpoints"]
    print("E1 checkpoints:", json.dumps(history), flush=True)
    t0 = time.perf_counter()
    fixed_default = second_moments(lm, layers, corpus=corpus, n_tokens=DEFAULT, cache=None, progress=False)
    default_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    tset = TargetSettings(layer=layers[-1], v_lr=cfg.v_lr, v_num_grad_steps=cfg.v_num_grad_steps,
                          kl_factor=cfg.kl_factor, v_weight_decay=cfg.v_weight_decay,
                          clamp_norm_factor=cfg.clamp_norm_factor, early_stop_loss=cfg.early_stop_loss)
    z = compute_targets(lm.model, lm.tokenizer, requests, run.templates, tset, progress=False).z.T.cpu()
    targets_seconds = time.perf_counter() - t0

    C_ref = st.moments
    ref = solve_deltas(run, z, requests, C_ref)
    names = {l: run.names[l] for l in layers}

    def diffs(D: dict[str, torch.Tensor]) -> dict:
        plain = where = 0.0
        for l in layers:
            n = names[l]
            d, r = D[n] - ref[n], ref[n]                       # (d, d_k) for Linear layouts
            K = keys[l].double()
            C = C_ref[l].double()
            plain = max(plain, float(d.norm() / r.norm()))
            on_keys = float((d @ K).norm() / (r @ K).norm())
            generic = float(torch.sqrt(((d @ C) * d).sum() / ((r @ C) * r).sum()))
            where = max(where, on_keys, generic)
        return {"plain": round(plain, 5), "where_it_acts": round(where, 5)}

    rows = []
    for c in history:
        C = second_moments(lm, layers, corpus=corpus, n_tokens=c["tokens"], cache=cache, progress=False).moments
        rows.append({**c, "delta_diff_vs_200k": diffs(solve_deltas(run, z, requests, C))})
        print(json.dumps(rows[-1]), flush=True)
    default_row = {"tokens": DEFAULT, "seconds": round(default_seconds, 1),
                   "delta_diff_vs_200k": diffs(solve_deltas(run, z, requests, fixed_default.moments))}
    cap_seconds = history[-1]["seconds"]
    choices = {}
    for tol in TOLERANCES:
        stop = next((r for r in rows if r["change"] is not None and r["change"] < tol), rows[-1])
        choices[str(tol)] = {"tokens": stop["tokens"], "e1_seconds": stop["seconds"],
                             "seconds_saved_vs_200k": round(cap_seconds - stop["seconds"], 1),
                             "delta_diff_vs_200k": stop["delta_diff_vs_200k"]}
    out = {"corpus": corpus_text, "n_edits": args.n, "layers": layers, "lambda": cfg.mom2_update_weight,
           "checkpoints": rows, "fixed_default_20k": default_row, "targets_seconds": round(targets_seconds, 1),
           "e1_seconds_200k": cap_seconds, "tolerances": choices}
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({"fixed_default_20k": default_row, "tolerances": choices}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
