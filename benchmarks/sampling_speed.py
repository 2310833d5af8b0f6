"""Throughput of the `generated` corpus (E1 statistics text): batched sampling with a key/value cache vs. before.

before : what `data.corpus.sample_batch` did up to GENERATED_FORMAT_VERSION 1: `model.generate(do_sample=True)` of
         16 sequences at a time (finished sequences padded to the end of the batch), transformers' top-p warper
         (a sort of the whole vocabulary per row and step) and `torch.multinomial` (an exponential per vocabulary
         entry per row and step).
after  : `data.corpus.sample_batch` now (data/sampling.py): `--batch` sequences at a time, ended sequences leave the
         batch and the cache, the nucleus from a partial top-k, one uniform number per row and step.

Both sample from the embedded model with the embedded preset's settings (seq_len 256, top_p 0.95, temperature 1),
nothing cached. Rounds alternate before / after, so a machine shared with other work slows both alike; the load
average is printed with every round. Prints tokens/s per round and the ratio of the medians.

ceiling: the model's forward passes alone, as the sampler makes them (a batch of `--batch` sequences fed one
token per pass through a key/value cache, `--seq-len` passes, no sequence ending), with no sampling at all: no
sampler of this model in float32 on these threads can be faster, so it bounds the speed-up any sampler can reach
over `before`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling_speed.py --rounds 2 --batch 64 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import torch


@torch.no_grad()
def ceiling(spec, lm, batch: int) -> list[list[int]]:
    """`spec.gen_batch_size` rows of `spec.seq_len` tokens from forward passes alone (token 0 fed at every step)."""
    from transformers import DynamicCache

    from editdecay.core.devices import input_device

    ids = torch.zeros((spec.gen_batch_size, 1), dtype=torch.long, device=input_device(lm.model))
    cache = DynamicCache()
    name = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    lm.model.eval()
    for _ in range(spec.seq_len - 1):
        out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
    return [[0] * spec.seq_len for _ in range(spec.gen_batch_size)]


@torch.no_grad()
def before(spec, lm, batch: int) -> list[list[int]]:
    """Batch number `batch` as version 1 of the generated corpus sampled it (model.generate, global RNG forked)."""
    from editdecay.core.cache import stable_hash
    from editdecay.core.devices import input_device
    from editdecay.core.tokens import pad_id
    from editdecay.data.corpus import _eos_ids, _start_token

    device = input_device(lm.model)
    eos = _eos_ids(lm)
    ids = torch.full((spec.gen_batch_size, 1), _start_token(lm), dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(stable_hash({"seed": spec.seed, "batch": batch}), 16) % (2 ** 62))
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                repetition_penalty=1.0, num_beams=1, max_new_tokens=spec.seq_len - 1,
                                min_new_tokens=0, eos_token_id=eos or None, pad_token_id=pad_id(lm.tokenizer))
    rows = []
    for row in out.tolist():
        cut = next((i + 1 for i in range(1, len(row)) if row[i] in eos), len(row))
        rows.append(row[:cut])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="sequences per batch of the new sampler")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    from editdecay.core.models import load_model
    from editdecay.data.corpus import CorpusSpec, sample_batch

    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    old = CorpusSpec(kind="generated", seq_len=args.seq_len, gen_batch_size=16)
    runs = [("before", before, old),
            ("after", sample_batch, CorpusSpec(kind="generated", seq_len=args.seq_len, gen_batch_size=args.batch)),
            ("ceiling", ceiling, CorpusSpec(kind="generated", seq_len=args.seq_len, gen_batch_size=args.batch))]
    rounds = []
    for r in range(args.rounds):
        for name, fn, spec in runs:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            rows = fn(spec, lm, r)
            seconds = time.perf_counter() - t0
            tokens = sum(len(x) for x in rows)
            rounds.append({"round": r, "sampler": name, "sequences": len(rows), "tokens": tokens,
                           "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
                           "load_1min": load})
            print(json.dumps(rounds[-1]), flush=True)
    med = {n: statistics.median(x["tokens_per_second"] for x in rounds if x["sampler"] == n) for n, _, _ in runs}
    summary = {"threads": torch.get_num_threads(), "seq_len": args.seq_len, "batch_after": args.batch,
               "tokens_per_second": med, "speedup": {n: round(v / med["before"], 2) for n, v in med.items()},
               "rounds": rounds}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
