"""Sampling text from the model for the `generated` corpus (docs/METHODS.md E1): batched, with a key/value cache.

`sample_sequences` samples one sequence per seed, all of them in one batch that advances one token per forward
pass: the key/value cache holds what the model has read, so each pass feeds only the newest token of every
sequence still running, and a sequence that has ended (its EOS token sampled) leaves the batch and its cache
rows at once, so no compute is spent on padding.

The next-token distribution is `transformers`' `generate(do_sample=True)`'s: float32 logits of the last position,
temperature, then top-k, then top-p (nucleus: in descending order of probability a token is kept while the mass
of the tokens before it is below top_p, as `TopPLogitsWarper` keeps it), renormalised. It is computed on the
most likely tokens of each row (a partial top-k instead of generate's sort of the whole vocabulary), ranking more
only for the rows whose nucleus is wider: `NUCLEUS_CASCADE` candidates, then the whole vocabulary. The embedded
model's nucleus at top_p 0.95 is at most 64 tokens at 41 % of the sampled positions, at most 256 at 60 % and at most
4096 at 98 %, and a partial top-k of 64 of its 49,152 logits costs a tenth of one of 1024 and a sixtieth of the
whole sort, so most rows are ranked cheaply; the draws are the same whichever size ranks a row. The draw is an inverse-CDF sample from one uniform number of
the sequence's own generator, seeded by its own seed (instead of `torch.multinomial`'s exponential per vocabulary
entry): a sequence depends only on its seed and the model, never on which other sequences share its batch, how
many do or when they end, up to the batch-size dependence of float rounding in the matrix products.
tests/data/test_sampling.py pins the distribution against transformers' warpers and the batch independence.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from editdecay.core.devices import input_device

NUCLEUS_CASCADE = (64, 256, 4096)   # tokens ranked per row, growing for the rows a size does not cover
NUCLEUS_CANDIDATES = NUCLEUS_CASCADE[0]


def next_token_distribution(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            candidates: int = NUCLEUS_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling distribution of each row of `logits` (A, V), as generate's warpers make it, on the `candidates`
    most likely tokens of each row (top_k of them with top-k; all V without top-p).

    Returns (probs, tokens, covered): (A, K) renormalised probabilities in descending order (0 past a row's
    nucleus), their (A, K) vocabulary ids, and (A,) whether the row's nucleus lies within its K candidates (a row
    that is not covered must be ranked again over the whole vocabulary: `sample_next` does).
    """
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    vocab = logits.shape[-1]
    k = min(vocab, top_k) if top_k > 0 else (min(vocab, candidates) if top_p < 1.0 else vocab)
    vals, tokens = torch.topk(logits, k, dim=-1)                                  # (A, K) descending
    # normaliser over what survives top-k: the whole row without it
    norm = torch.logsumexp(vals if top_k > 0 else logits, dim=-1, keepdim=True)   # (A, 1)
    probs = torch.exp(vals - norm)                                                # (A, K)
    covered = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs          # mass of the more likely tokens
        if k < vocab and top_k <= 0:
            covered = before[:, -1] + probs[:, -1] >= top_p   # the nucleus ends within the candidates
        keep = before < top_p
        keep[:, 0] = True                                     # at least one token (min_tokens_to_keep=1)
        probs = probs * keep
    # the kept mass as a running sum: the zeros past the nucleus add exactly nothing, so the renormalised
    # probabilities, and the draws, are bit for bit the same whatever number of candidates ranked the row
    return probs / torch.cumsum(probs, dim=-1)[:, -1:], tokens, covered


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, cascade: Sequence[int] = NUCLEUS_CASCADE) -> torch.Tensor:
    """One token per row of `logits` (A, V), drawn with `uniforms` (A,) from `next_token_distribution`: each row is
    ranked on `cascade[0]` candidates, the rows whose nucleus is wider on the next size, and so on, and the rows no
    size covers (the first tokens of a text, mostly) over the whole vocabulary. The distribution and the draw do not
    depend on the size that covers a row. Returns (A,) token ids."""
    chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    pending = torch.arange(logits.shape[0], device=logits.device)       # rows not drawn yet
    for size in [*cascade, logits.shape[-1]]:
        part = logits if len(pending) == logits.shape[0] else logits[pending]
        probs, tokens, covered = next_token_distribution(part, temperature=temperature, top_k=top_k, top_p=top_p,
                                                         candidates=size)
        if bool(covered.all()):
            chosen[pending] = draw(probs, tokens, uniforms[pending])
            break
        chosen[pending[covered]] = draw(probs[covered], tokens[covered], uniforms[pending[covered]])
        pending = pending[~covered]
    return chosen


def draw(probs: torch.Tensor, tokens: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row i takes the first token whose cumulative probability exceeds uniforms[i] (A,) in
    [0, 1). probs, tokens: (A, K) as `next_token_distribution` returns them. Returns (A,) token ids."""
    cdf = torch.cumsum(probs, dim=-1)                                             # (A, K)
    at = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True)
    at = at.clamp_(max=probs.shape[-1] - 1)                                       # (A, 1)
    return tokens.gather(-1, at).squeeze(-1)


@torch.no_grad()
def sample_sequences(model, seeds: Sequence[int], *, start: int, eos: Sequence[int], max_len: int,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[list[int]]:
    """One sampled sequence per seed, each `[start, t1, t2, ...]`: it ends after its first EOS token (kept) or at
    `max_len` tokens. Returns the sequences in the order of `seeds`.

    Memory: the key/value cache of at most len(seeds) x max_len tokens per layer, and the (len(seeds), vocab)
    float32 logits of one step. The model is left in the mode it was in.
    """
    from transformers import DynamicCache

    device = input_device(model)
    stop = set(int(e) for e in eos)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    rows = [[int(start)] for _ in seeds]
    alive = list(range(len(seeds)))                     # rows still sampling, in batch order
    step_ids = torch.full((len(seeds), 1), int(start), dtype=torch.long, device=device)   # (A, 1) newest tokens
    cache = DynamicCache()
    # newer transformers name the cache argument `cache` (the older `past_key_values` is deprecated there)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}    # unembed the last position only
    was_training = model.training
    model.eval()
    try:
        while alive and len(rows[alive[0]]) < max_len:      # every running row has the same length
            out = model(input_ids=step_ids, use_cache=True, **last_only, **{cache_kw: cache})
            cache = getattr(out, "cache", None) or out.past_key_values
            uniforms = torch.cat([torch.rand(1, generator=generators[i], device=device) for i in alive])   # (A,)
            chosen = sample_next(out.logits[:, -1, :], uniforms, temperature=temperature, top_k=top_k,
                                 top_p=top_p).tolist()
            keep, nxt = [], []
            for k, i in enumerate(alive):
                token = chosen[k]
                rows[i].append(token)
                if token not in stop:
                    keep.append(k)
                    nxt.append(token)
            if len(keep) < len(alive) and keep:
                # ended rows leave the batch and the cache: (A, ...) -> (len(keep), ...)
                cache.batch_select_indices(torch.tensor(keep, device=device))
            alive = [alive[k] for k in keep]
            step_ids = torch.tensor(nxt, dtype=torch.long, device=device).view(-1, 1)
    finally:
        model.train(was_training)
    return rows


__all__ = ["NUCLEUS_CANDIDATES", "NUCLEUS_CASCADE", "draw", "next_token_distribution", "sample_next", "sample_sequences"]
