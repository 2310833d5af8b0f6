"""Editing speed on the embedded model: the fast path vs the straightforward reference.

edits/s   fast      : `editing.edit_model` (MEMIT, E2-E4): all requests of a batch optimised
                      together (E3) on a KV cache of the prompt prefixes, all keys in one
                      early-stopped pass. Statistics are computed (and cached) beforehand,
                      so the timed call only reads them.
          reference : `reference.reference_memit`: one request at a time, full-depth
                      forwards, one forward pass per layer for keys. It costs the same per
                      request whatever the batch size, so it is timed on `--ref-size`
                      requests and extrapolated per request to the larger sizes (marked "~").
tokens/s  fast      : `stats.accumulate_second_moments` (the pass inside `stats.second_moments`):
                      every layer in one forward pass, cut short after the last one.
          reference : `reference.reference_second_moments`: a full-depth pass per layer.

Both sides of each comparison use the same requests, templates, tokens and settings; the
fast and reference deltas (and statistics) are compared as a check. Run with one thread:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/edit_speed.py --out /tmp/edit_speed.json

The defaults (20 and 100 edits, reference on 20, 5 context templates, 3 optimisation steps)
take about 6-10 minutes on one idle CPU thread. `--steps` (E3 optimisation steps; 25 in the
study) is the main cost: the target phase of both sides grows linearly with it, so with
more steps the speed-up moves towards that of the target phase alone (keys and context
sampling are fixed costs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

# Fallback edit requests (counterfactual capitals and currencies) for when the `worldfacts`
# data set does not load: (country as it reads mid-sentence, capital, currency).
COUNTRIES = (
    ("France", "Paris", "euro"), ("Japan", "Tokyo", "yen"), ("India", "New Delhi", "rupee"),
    ("Russia", "Moscow", "ruble"), ("China", "Beijing", "yuan"), ("the United Kingdom", "London", "pound"),
    ("Mexico", "Mexico City", "peso"), ("Egypt", "Cairo", "pound"), ("Kenya", "Nairobi", "shilling"),
    ("Thailand", "Bangkok", "baht"), ("Sweden", "Stockholm", "krona"), ("Norway", "Oslo", "krone"),
    ("Poland", "Warsaw", "zloty"), ("Hungary", "Budapest", "forint"), ("Turkey", "Ankara", "lira"),
    ("Vietnam", "Hanoi", "dong"), ("South Korea", "Seoul", "won"), ("Indonesia", "Jakarta", "rupiah"),
    ("Brazil", "Brasília", "real"), ("Argentina", "Buenos Aires", "peso"), ("Peru", "Lima", "sol"),
    ("Nigeria", "Abuja", "naira"), ("Ghana", "Accra", "cedi"), ("Israel", "Jerusalem", "shekel"),
    ("Iran", "Tehran", "rial"), ("Pakistan", "Islamabad", "rupee"), ("Bangladesh", "Dhaka", "taka"),
    ("the Philippines", "Manila", "peso"), ("Malaysia", "Kuala Lumpur", "ringgit"), ("Ukraine", "Kyiv", "hryvnia"),
    ("Denmark", "Copenhagen", "krone"), ("Switzerland", "Bern", "franc"), ("Czechia", "Prague", "koruna"),
    ("Romania", "Bucharest", "leu"), ("Georgia", "Tbilisi", "lari"), ("Armenia", "Yerevan", "dram"),
    ("Cambodia", "Phnom Penh", "riel"), ("Laos", "Vientiane", "kip"), ("Mongolia", "Ulaanbaatar", "tugrik"),
    ("South Africa", "Pretoria", "rand"), ("Botswana", "Gaborone", "pula"), ("Zambia", "Lusaka", "kwacha"),
    ("Angola", "Luanda", "kwanza"), ("Ethiopia", "Addis Ababa", "birr"), ("Iceland", "Reykjavik", "krona"),
    ("Albania", "Tirana", "lek"), ("Paraguay", "Asunción", "guarani"), ("Venezuela", "Caracas", "bolívar"),
    ("Bhutan", "Thimphu", "ngultrum"), ("Qatar", "Doha", "riyal"),
)


def fallback_requests(n: int):
    """2 * len(COUNTRIES) counterfactual requests; the new object is another country's."""
    from editdecay.core.request import EditRequest

    out = []
    m = len(COUNTRIES)
    for i, (country, capital, currency) in enumerate(COUNTRIES):
        other = COUNTRIES[(i + 7) % m]
        out.append(EditRequest(f"capital-{i}", "The capital of {} is", country, other[1], capital, source="bench"))
    for i, (country, capital, currency) in enumerate(COUNTRIES):
        other = next(c for k in range(1, m) if (c := COUNTRIES[(i + k) % m])[2] != currency)
        out.append(EditRequest(f"currency-{i}", "The currency of {} is the", country, other[2], currency,
                               source="bench"))
    if n > len(out):
        raise SystemExit(f"--sizes: at most {len(out)} fallback requests are available, asked for {n}")
    # Interleave relations so a prefix of the list mixes both.
    return [r for pair in zip(out[:m], out[m:]) for r in pair][:n]


def load_requests(n: int) -> tuple[list, str]:
    try:
        from editdecay.data import load_edit_data

        ds = load_edit_data("worldfacts")
        if len(ds.requests) >= n:
            return list(ds.requests[:n]), "worldfacts"
        print(f"worldfacts has {len(ds.requests)} requests < {n}; using the built-in fallback set")
    except Exception as e:   # the data set may not exist yet in this checkout
        print(f"worldfacts did not load ({type(e).__name__}: {e}); using the built-in fallback set")
    return fallback_requests(n), "fallback (capitals/currencies, benchmarks/edit_speed.py)"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; the absolute difference when b is zero (e.g. --steps 1: no update, no edit)."""
    diff, ref = float((a.double() - b.double()).norm()), float(b.double().norm())
    return diff / ref if ref > 0 else diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100], help="edit batch sizes for the fast path")
    ap.add_argument("--ref-size", type=int, default=20, help="requests the reference is timed on (then extrapolated)")
    ap.add_argument("--steps", type=int, default=3, help="E3 optimisation steps (v_num_grad_steps; study: 25)")
    ap.add_argument("--templates", type=int, default=5, help="context templates besides the bare prompt")
    ap.add_argument("--layers", default="3-7", help="edited layers, e.g. 3-7 (the embedded preset)")
    ap.add_argument("--stats-tokens", type=int, default=5000, help="E1 tokens of the cached statistics the edit uses")
    ap.add_argument("--bench-stats-tokens", type=int, default=1024, help="tokens for the statistics speed comparison")
    ap.add_argument("--seq-len", type=int, default=128, help="sequence length for the statistics speed comparison")
    ap.add_argument("--skip-reference-edit", action="store_true", help="time only the fast editor")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the figures as JSON to this path")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from editdecay.core.arch import arch_for, as_out_in, resolve_name
    from editdecay.core.cache import Cache
    from editdecay.core.models import load_model
    from editdecay.data.corpus import iter_token_chunks, parse_corpus
    from editdecay.edit.api import edit_model
    from editdecay.edit.registry import make_config, preset_for
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference lives with the tests
    from reference import reference_memit, reference_second_moments

    from editdecay.core.layers import parse_layers
    from editdecay.core.results import environment
    from editdecay.edit.stats import accumulate_second_moments, second_moments

    layers = parse_layers(args.layers, field="--layers")
    sizes = sorted(set(args.sizes))
    t_start = time.perf_counter()
    lm = load_model("smollm2-135m")
    spec = arch_for(lm.model)
    cache = Cache.default()
    requests, source = load_requests(max(sizes + [args.ref_size]))
    cfg = make_config("memit", **{**preset_for("memit", None, lm.identity.name), "layers": layers, "n_context_templates": args.templates,
                                  "v_num_grad_steps": args.steps, "stats_tokens": args.stats_tokens})
    print(f"model {lm.identity.name} ({lm.identity.n_layers} layers), {torch.get_num_threads()} thread(s); "
          f"requests: {source}; layers {list(layers)}, {args.templates} context templates, {args.steps} steps")

    # Statistics first (cached; not part of the edit timing).
    t0 = time.perf_counter()
    stats = second_moments(lm, layers, corpus=parse_corpus(cfg.stats_corpus), n_tokens=cfg.stats_tokens,
                           dtype=cfg.stats_dtype, cache=cache, progress=False)
    print(f"statistics for the edits: {cfg.stats_corpus}, {stats.n_tokens_used} tokens, "
          f"{time.perf_counter() - t0:.1f} s (sources: {stats.provenance['source']})")
    C = {l: stats[l] for l in layers}

    rows, fast_patches = [], {}
    for n in sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        patch, run = edit_model(lm, "memit", cfg, requests[:n], cache=cache, progress=False)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        run.restore()
        fast_patches[n] = patch
        rows.append({"what": "edit", "impl": "fast", "n": n, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
                     "per_s": n / secs, "extrapolated": False, "phases": dict(run.timer.seconds),
                     "mean_steps": run.target_log[0]["mean_steps"]})
        print(f"  fast      n={n:4d}: {secs:7.1f} s (cpu {cpu:7.1f} s)  {n / secs:7.3f} edits/s  "
              f"phases {run.timer.seconds}")

    ref = None
    if not args.skip_reference_edit:
        n = args.ref_size
        t0, c0 = time.perf_counter(), time.process_time()
        ref = reference_memit(lm, cfg, requests[:n], C)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        # Sampling the context templates is a fixed cost (the same call as the fast run's "context"
        # phase); the rest grows linearly with the number of requests.
        fixed = min(rows[0]["phases"].get("context", 0.0), secs)
        per_req = (secs - fixed) / n
        check = None
        if n in fast_patches:
            name = {l: resolve_name(lm.model, spec.mlp_out_name(l)) for l in layers}
            check = max(rel_diff(as_out_in(fast_patches[n].deltas[name[l]], spec), ref.deltas[l])
                        for l in layers)
        rows.append({"what": "edit", "impl": "reference", "n": n, "seconds": round(secs, 2),
                     "cpu_seconds": round(cpu, 2), "per_s": n / secs, "extrapolated": False,
                     "mean_steps": sum(t.steps for t in ref.targets) / n, "max_rel_delta_diff_vs_fast": check})
        print(f"  reference n={n:4d}: {secs:7.1f} s (cpu {cpu:7.1f} s)  {n / secs:7.3f} edits/s"
              + (f"  (deltas vs fast: max relative difference {check:.1e})" if check is not None else ""))
        for m in sizes:
            if m != n:
                est = fixed + per_req * m
                rows.append({"what": "edit", "impl": "reference", "n": m, "seconds": round(est, 2),
                             "cpu_seconds": round(est * cpu / secs, 2), "per_s": m / est, "extrapolated": True})

    # Statistics throughput on the same pre-sampled tokens (sampling is not timed).
    corpus = parse_corpus("generated", seq_len=args.seq_len)
    chunks = list(iter_token_chunks(corpus, lm, args.bench_stats_tokens, cache=cache, progress=False))
    t0, c0 = time.perf_counter(), time.process_time()
    fast_C, n_tok = accumulate_second_moments(lm, layers, chunks, progress=False)
    fast_s, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    ref_C = {}
    for l in layers:
        ref_C[l], n_ref = reference_second_moments(lm, l, chunks)
    ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert n_ref == n_tok
    stats_diff = max(rel_diff(fast_C[l].cpu() / n_tok, ref_C[l]) for l in layers)
    rows.append({"what": "stats", "impl": "fast", "n": n_tok, "seconds": round(fast_s, 2),
                 "cpu_seconds": round(fast_cpu, 2), "per_s": n_tok / fast_s, "extrapolated": False})
    rows.append({"what": "stats", "impl": "reference", "n": n_tok, "seconds": round(ref_s, 2),
                 "cpu_seconds": round(ref_cpu, 2), "per_s": n_tok / ref_s, "extrapolated": False,
                 "max_rel_diff_vs_fast": stats_diff})

    # Table and ratios (wall clock, and CPU time: with one thread the steadier figure on a shared machine).
    print()
    print(f"{'measure':<9}{'n':>6}  {'fast':>11}  {'reference':>12}  {'speed-up':>9}  {'cpu speed-up':>12}")
    ratios = {}
    for what, unit in (("edit", "edits/s"), ("stats", "tok/s")):
        for n in sorted({r["n"] for r in rows if r["what"] == what}):
            f = next((r for r in rows if (r["what"], r["impl"], r["n"]) == (what, "fast", n)), None)
            s = next((r for r in rows if (r["what"], r["impl"], r["n"]) == (what, "reference", n)), None)
            if f is None or s is None:
                continue
            mark = "~" if s["extrapolated"] else " "
            wall, cpu = f["per_s"] / s["per_s"], s["cpu_seconds"] / f["cpu_seconds"]
            ratios[f"{what}_{n}"] = {"wall": wall, "cpu": cpu}
            print(f"{unit:<9}{n:>6}  {f['per_s']:>11.3f}  {mark}{s['per_s']:>11.3f}  {'x%.1f' % wall:>9}  "
                  f"{'x%.1f' % cpu:>12}")
    if any(r.get("extrapolated") for r in rows):
        print(f"~ reference timed on {args.ref_size} requests and extrapolated: context sampling (fixed) "
              f"+ per-request time x n")
    print(f"statistics: layers {list(layers)} over {n_tok} tokens (seq_len {args.seq_len}); "
          f"max relative difference of C {stats_diff:.1e}")
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")

    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": lm.identity.to_dict(), "requests": source, "config": cfg.model_dump(mode="json"),
                       "ref_size": args.ref_size, "rows": rows, "ratios": ratios,
                       "environment": environment("cpu")}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
