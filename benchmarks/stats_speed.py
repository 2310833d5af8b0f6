"""Throughput of the E1 key statistics: one hooked pass vs. a straightforward implementation.

one-pass  : `editdecay.edit.stats.accumulate_second_moments`: all layers in one forward
            pass, cut right after the last layer's W_out.
per-layer : what a direct implementation does: for each layer, a full-depth forward
            pass (logits included) with a hook on that layer's W_out.

Both read the same token chunks (a `generated` corpus sampled once from the model and
cached, so sampling is not timed), use the same batches and accumulate in float32.
Prints tokens/s for each thread count and the speed-up; checks both give the same C.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stats_speed.py --layers 3-8 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch


@torch.no_grad()
def per_layer_reference(lm, layers, chunks, batch_size: int) -> tuple[dict[int, torch.Tensor], int]:
    """One full forward pass over the corpus per layer (the straightforward implementation)."""
    from editdecay.core.arch import arch_for, get_module
    from editdecay.core.tokens import pad_batch, pad_id

    spec = arch_for(lm.model)
    sums, n = {}, 0
    for layer in layers:
        store = {}
        module = get_module(lm.model, spec.mlp_out_name(layer))
        handle = module.register_forward_pre_hook(lambda m, args: store.__setitem__("k", args[0]))
        try:
            n = 0
            for start in range(0, len(chunks), batch_size):
                batch = pad_batch(chunks[start:start + batch_size], pad_id(lm.tokenizer), side="right")
                lm.model(**batch.model_inputs(), use_cache=False)
                mask = batch.attention_mask.bool()
                k = store["k"][mask].float()                                  # (n_b, d_k)
                sums[layer] = sums.get(layer, 0) + k.T @ k
                n += int(mask.sum())
        finally:
            handle.remove()
    return sums, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="3-8", help="e.g. 3-8 or 3,5,7")
    ap.add_argument("--n-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    from editdecay.core.cache import Cache
    from editdecay.core.layers import parse_layers
    from editdecay.core.models import load_model
    from editdecay.data.corpus import iter_token_chunks, parse_corpus
    from editdecay.edit.stats import accumulate_second_moments

    layers = list(parse_layers(args.layers, field="--layers"))
    torch.set_num_threads(max(args.threads))
    lm = load_model("smollm2-135m")
    cache = Cache.default()
    corpus = parse_corpus("generated", seq_len=args.seq_len)
    t0 = time.perf_counter()
    chunks = list(iter_token_chunks(corpus, lm, args.n_tokens, cache=cache))   # sampled once, then cached
    sample_s = time.perf_counter() - t0
    print(f"corpus: {corpus.describe()} seq_len={args.seq_len}: {sum(map(len, chunks))} tokens in {len(chunks)} "
          f"sequences ({sample_s:.1f} s to sample or read)")

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        fast, n = accumulate_second_moments(lm, tuple(layers), chunks, batch_size=args.batch_size, progress=False)
        fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow, n_ref = per_layer_reference(lm, layers, chunks, args.batch_size)
        slow_s = time.perf_counter() - t0
        assert n == n_ref
        diff = max(float((fast[l] - slow[l]).abs().max() / slow[l].abs().max()) for l in layers)
        row = {"threads": threads, "layers": layers, "tokens": n, "one_pass_tok_s": round(n / fast_s, 1),
               "per_layer_tok_s": round(n / slow_s, 1), "speedup": round(slow_s / fast_s, 2),
               "max_rel_diff": diff, "one_pass_s": round(fast_s, 2), "per_layer_s": round(slow_s, 2)}
        rows.append(row)
        print(f"threads={threads}: one pass {row['one_pass_tok_s']} tok/s ({fast_s:.1f} s), per-layer full depth "
              f"{row['per_layer_tok_s']} tok/s ({slow_s:.1f} s), speed-up x{row['speedup']}, "
              f"max relative difference {diff:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": lm.identity.to_dict(), "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
