"""Batched sampling with a key/value cache (data/sampling.py).

What is pinned: (1) the next-token distribution equals transformers' own (`generate`'s warpers: temperature,
top-k, top-p, then softmax) on every row, on the fast path (nucleus within the candidates) and on the whole-sort
path; (2) the draw samples that distribution (frequencies of many draws); (3) a sequence does not depend on the
batch it is sampled in (which other seeds, how many, which end early and leave the batch) and the caller's random
state is untouched, so (4) the `generated` corpus stream does not depend on `gen_batch_size`. The models are in
float64 so that the batch-size dependence of float rounding cannot flip a draw.
"""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_model, tok

from editdecay.core.models import wrap
from editdecay.data.corpus import CorpusSpec, iter_token_chunks
from editdecay.data.sampling import NUCLEUS_CANDIDATES, NUCLEUS_CASCADE, draw, next_token_distribution, sample_next, sample_sequences

EOS = list(range(1, 2500))   # ~5 % of the vocabulary ends a sequence: some end early, some run to max_len


def model64(family: str):
    return tiny_model(family, scale=2.0).double()


def reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' sampling distribution, as `generate(do_sample=True)` builds it: (A, V) probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.95), (0.7, 40, 0.9), (1.3, 0, 0.5), (1.0, 0, 1.0)])
def test_the_distribution_is_transformers_own(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    vocab = 5000
    peaked = torch.randn(3, vocab, generator=gen) * 6            # nucleus of a few tokens: the fast path
    flat = torch.randn(3, vocab, generator=gen) * 0.2            # nucleus wider than the candidates: the whole sort
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        want = reference(logits, temperature, top_k, top_p)
        probs, tokens, covered = next_token_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        ours = torch.zeros(logits.shape).scatter_(1, tokens, probs)
        torch.testing.assert_close(ours[covered], want[covered], rtol=1e-5, atol=1e-7)
        # a row whose nucleus is wider than the candidates is ranked over the whole vocabulary
        probs, tokens, _ = next_token_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                   candidates=vocab)
        torch.testing.assert_close(torch.zeros(logits.shape).scatter_(1, tokens, probs), want, rtol=1e-5, atol=1e-7)
    if top_p < 1.0 and top_k == 0:
        assert next_token_distribution(peaked, top_p=top_p)[2].all()              # the fast path covers these
        assert not next_token_distribution(flat, top_p=top_p)[2].any()            # these need the whole sort
        assert next_token_distribution(flat, top_p=top_p)[0].shape[1] == NUCLEUS_CANDIDATES


def test_sample_next_draws_the_same_tokens_whichever_candidate_size_covers_a_row():
    """Rows of every nucleus width (a few tokens, hundreds, thousands, most of the vocabulary) are ranked at
    different sizes of the cascade; the same uniforms give the tokens that ranking the whole vocabulary gives."""
    gen = torch.Generator().manual_seed(2)
    vocab = 20000
    logits = torch.cat([torch.randn(4, vocab, generator=gen) * s for s in (6.0, 2.5, 1.2, 0.2)])
    u = torch.rand(16, generator=gen)
    probs, tokens, _ = next_token_distribution(logits, top_p=0.95, candidates=vocab)
    want = draw(probs, tokens, u)
    assert torch.equal(sample_next(logits, u, top_p=0.95), want)
    # the test covers every stage: some rows are covered first at each size, some by none of them
    first = torch.full((16,), len(NUCLEUS_CASCADE))
    for i, size in reversed(list(enumerate(NUCLEUS_CASCADE))):
        first[next_token_distribution(logits, top_p=0.95, candidates=size)[2]] = i
    assert set(first.tolist()) == set(range(len(NUCLEUS_CASCADE) + 1)), first
    # with top-k, or without top-p, one ranking serves every row
    assert torch.equal(sample_next(logits, u, top_k=50, top_p=0.95),
                       draw(*next_token_distribution(logits, top_k=50, top_p=0.95)[:2], u))
    assert torch.equal(sample_next(logits, u), draw(*next_token_distribution(logits)[:2], u))


def test_the_draw_samples_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    tokens = torch.tensor([[7, 3, 9, 1, 4]])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    got = draw(probs.expand(20000, -1), tokens.expand(20000, -1), u)
    freq = {t: float((got == t).float().mean()) for t in (7, 3, 9, 1, 4)}
    for t, p in zip((7, 3, 9, 1, 4), probs[0].tolist()):
        assert abs(freq[t] - p) < 0.015, freq                    # 4 standard errors at n = 20000
    assert freq[4] == 0.0                                        # outside the nucleus: never


def test_a_sequence_does_not_depend_on_its_batch_and_the_callers_rng_is_untouched():
    model = model64("llama")
    seeds = list(range(100, 110))
    state = torch.random.get_rng_state()
    together = sample_sequences(model, seeds, start=0, eos=EOS, max_len=20, top_p=0.9)
    assert torch.equal(torch.random.get_rng_state(), state)
    reordered = sample_sequences(model, seeds[::-1], start=0, eos=EOS, max_len=20, top_p=0.9)
    assert reordered == together[::-1]
    assert [sample_sequences(model, [s], start=0, eos=EOS, max_len=20, top_p=0.9)[0] for s in seeds[:3]] == \
        together[:3]
    assert len({tuple(r) for r in together}) == len(seeds)            # different seeds, different text
    for r in together:
        assert r[0] == 0 and not any(t in EOS for t in r[1:-1])        # nothing after an EOS


def test_the_generated_corpus_stream_does_not_depend_on_the_sampling_batch_size():
    lm = wrap(model64("llama"), tok(), name="tiny-llama", source="config")
    lm.model.config.eos_token_id = EOS
    streams = []
    for batch in (3, 8):
        spec = CorpusSpec(kind="generated", seed=5, seq_len=16, gen_batch_size=batch)
        streams.append([t for chunk in iter_token_chunks(spec, lm, 200, progress=False) for t in chunk])
    assert streams[0] == streams[1] and len(streams[0]) == 200

