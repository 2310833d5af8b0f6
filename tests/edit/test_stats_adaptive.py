"""Adaptive E1 (edit/stats_adaptive.py): doubling checkpoints equal fixed-count statistics bit for bit and share
their cache keys; the pass stops at the tolerance and records why; a fixed count is unchanged."""

from __future__ import annotations

import torch

from conftest import make_tiny
from editdecay.core.cache import Cache
from editdecay.data.corpus import parse_corpus
from editdecay.edit.stats import second_moments
from editdecay.edit.stats_adaptive import adaptive_second_moments, checkpoints, memit_probe

LAYERS = (1, 2)


def corpus_file(tmp_path):
    words = ("river stone light paper green music window table garden winter letter morning city voice number "
             "history market silver forest doctor").split()
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (120,), generator=gen).tolist())
            for _ in range(200)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(docs))
    return parse_corpus(str(p), seq_len=32)


def fixed_keys(lm, d_ff):
    gen = torch.Generator().manual_seed(5)
    return {l: torch.randn(d_ff, 6, generator=gen) for l in LAYERS}


def test_checkpoints_are_whole_batches_doubling():
    assert [c for c, _ in zip(checkpoints(5, 4), range(4))] == [8, 16, 32, 64]


def test_adaptive_checkpoints_equal_fixed_statistics_and_share_the_cache(tokenizer, tmp_path):
    lm = make_tiny("llama", tokenizer)
    corpus = corpus_file(tmp_path)
    cache = Cache(tmp_path / "cache")
    probe = memit_probe(fixed_keys(lm, 64), lam=100.0)
    st = adaptive_second_moments(lm, LAYERS, corpus=corpus, probe=probe, tolerance=1e-9, max_tokens=2048,
                                 start_tokens=128, cache=cache, batch_size=4, progress=False)
    ad = st.provenance["adaptive"]
    counts = [c["tokens"] for c in ad["checkpoints"]]
    assert ad["stopped"] == "max_tokens" and counts == sorted(counts) and len(counts) >= 3
    assert all(c["change"] is None or c["change"] >= 0 for c in ad["checkpoints"])
    # The statistics at an intermediate checkpoint are read back by a fixed-count run of that many tokens ...
    mid = counts[1]
    cached = second_moments(lm, LAYERS, corpus=corpus, n_tokens=mid, cache=cache, batch_size=4, progress=False)
    assert set(cached.provenance["source"].values()) == {"cache"}
    # ... and equal, bit for bit, what a fixed-count run computes from scratch (same stream, same batches).
    fresh = second_moments(lm, LAYERS, corpus=corpus, n_tokens=mid, cache=None, batch_size=4, progress=False)
    for l in LAYERS:
        assert torch.equal(cached[l], fresh[l])
    # The final statistics are those of a fixed run of the tokens used.
    final = second_moments(lm, LAYERS, corpus=corpus, n_tokens=st.n_tokens_used, cache=None, batch_size=4,
                           progress=False)
    for l in LAYERS:
        assert torch.equal(st[l], final[l])


def test_adaptive_stops_below_the_tolerance(tokenizer, tmp_path):
    lm = make_tiny("llama", tokenizer)
    corpus = corpus_file(tmp_path)
    probe = memit_probe(fixed_keys(lm, 64), lam=100.0)
    st = adaptive_second_moments(lm, LAYERS, corpus=corpus, probe=probe, tolerance=0.5, max_tokens=6000,
                                 start_tokens=128, cache=None, batch_size=4, progress=False)
    ad = st.provenance["adaptive"]
    assert ad["stopped"] == "converged" and ad["checkpoints"][-1]["change"] < 0.5
    assert all(c["change"] >= 0.5 for c in ad["checkpoints"][1:-1])
    assert st.n_tokens_used == ad["tokens_used"] < 6000
    # the recorded change is the one of the measure between the last two checkpoints
    prev = second_moments(lm, LAYERS, corpus=corpus, n_tokens=ad["checkpoints"][-2]["tokens"], batch_size=4,
                          progress=False)
    got = probe.change(probe.state(st.moments), probe.state(prev.moments))
    assert abs(got - ad["checkpoints"][-1]["change"]) < 1e-9


def test_fixed_count_keys_are_unchanged():
    """Cached statistics of a fixed token count keep their file names (no new key field)."""
    from editdecay.edit.stats import StatsKey

    k = StatsKey(model="m", family="llama", layer=3, module="model.layers.3.mlp.down_proj", corpus="c",
                 n_tokens=20000, dtype="float32")
    assert k.parts()[-1] == "model.layers.3.mlp.down_proj.n20000.float32.v1.safetensors"
    from editdecay.edit import make_config

    assert "stats_tolerance" not in make_config("memit", layers=(3,)).model_dump(mode="json")
    assert make_config("memit", layers=(3,), stats_tolerance=0.01).model_dump(mode="json")["stats_tolerance"] == 0.01


def test_edit_with_adaptive_statistics_records_them_in_the_patch(tokenizer, tmp_path):
    """`stats_tolerance` through edit_model: the probe uses the requests' own keys, and the patch records the
    adaptive pass (tolerance, checkpoints, why it stopped) with the statistics provenance."""
    from editdecay.data import load_edit_data
    from editdecay.edit import make_config
    from editdecay.edit.api import edit_model

    lm = make_tiny("llama", tokenizer)
    corpus = corpus_file(tmp_path)
    cfg = make_config("memit", layers=LAYERS, stats_corpus=corpus.source, stats_tokens=4000, stats_tolerance=0.3,
                      v_num_grad_steps=2, n_context_templates=1, context_length=3, mom2_update_weight=100.0)
    requests = list(load_edit_data("worldfacts", limit=3).requests)
    patch, run = edit_model(lm, "memit", cfg, requests, cache=Cache(tmp_path / "cache"), progress=False)
    ad = patch.extra["stats"]["adaptive"]
    assert ad["tolerance"] == 0.3 and ad["stopped"] in ("converged", "max_tokens") and "MEMIT" in ad["measure"]
    assert ad["tokens_used"] <= 4000 and len(ad["checkpoints"]) >= 2
    assert patch.config["stats_tolerance"] == 0.3
    run.restore()
