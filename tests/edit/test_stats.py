"""E1 key statistics, their corpus and cache, and the E5 null-space projector.

Mechanics run on tiny random models of all four families (built from configs, no
tokenizer: the corpus is a pre-tokenised JSONL file); text corpora use the
embedded model's tokenizer; one test runs the embedded model end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from support import models as tiny_models

from editdecay.core.arch import arch_for, get_module
from editdecay.core.cache import Cache
from editdecay.core.errors import ConfigError, DataError
from editdecay.core.models import wrap
from editdecay.data.corpus import (
    CorpusSpec,
    iter_token_chunks,
    parse_corpus,
    sample_batch,
)
from editdecay.edit.stats import (
    LayerStats,
    cached_projector,
    null_space_projector,
    second_moments,
)

torch.set_num_threads(1)
VOCAB = 128


SEEDS = {"gpt2": 0, "gptj": 1, "gpt_neox": 2, "llama": 3}


def tiny_model(family: str):
    """A tiny model of `family` over a 128-token vocabulary (the pre-tokenised corpora), 64 positions."""
    model = tiny_models.tiny_model(family, seed=SEEDS[family], vocab_size=VOCAB, positions=64, bos_token_id=0,
                                   eos_token_id=1, pad_token_id=1)
    return wrap(model, None, name=f"tiny-{family}")


def write_ids_corpus(path: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Pre-tokenised JSONL corpus of ragged documents (3..40 tokens, some longer than seq_len)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(torch.randint(3, 41, (1,), generator=g))
            f.write(json.dumps({"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()}) + "\n")
    return path


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    """Count forward calls of a module (the embedding: every forward pass starts there)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def reference_moments(lm, layer: int, chunks: list[list[int]]) -> torch.Tensor:
    """Straightforward E1: each sequence alone (no padding), full depth, a plain hook, float64."""
    captured = {}
    mod = get_module(lm.model, arch_for(lm.model).mlp_out_name(layer))
    handle = mod.register_forward_pre_hook(lambda m, args: captured.__setitem__("k", args[0]))
    total, n = None, 0
    try:
        with torch.no_grad():
            for ids in chunks:
                lm.model(input_ids=torch.tensor([ids]))
                k = captured["k"][0].double()                    # (T, d_k)
                total = k.T @ k if total is None else total + k.T @ k
                n += k.shape[0]
    finally:
        handle.remove()
    return total / n


from editdecay.core.arch import FAMILIES  # noqa: E402


@pytest.fixture(scope="module")
def ids_corpus(tmp_path_factory) -> CorpusSpec:
    return parse_corpus(str(write_ids_corpus(tmp_path_factory.mktemp("corpus") / "ids.jsonl")), seq_len=16)


# --------------------------------------------------------------------------- (a) correctness

@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_matches_reference_with_padding(family, ids_corpus):
    lm = tiny_model(family)
    n_tokens = 300
    chunks = list(iter_token_chunks(ids_corpus, lm, n_tokens, progress=False))
    lengths = [len(c) for c in chunks]
    assert sum(lengths) == n_tokens and max(lengths) == 16 and min(lengths) < 16   # ragged: batches are padded
    stats = second_moments(lm, [1, 2], corpus=ids_corpus, n_tokens=n_tokens, batch_size=5, progress=False)
    assert stats.n_tokens_used == n_tokens
    for layer in (1, 2):
        ref = reference_moments(lm, layer, chunks)
        C = stats[layer]
        assert C.dtype == torch.float32 and C.device.type == "cpu"
        assert C.shape == ref.shape == (ref.shape[0], ref.shape[0])
        torch.testing.assert_close(C.double(), ref, rtol=0, atol=1e-5)
    # padding must not matter: one sequence per batch (no padding at all) gives the same C
    unpadded = second_moments(lm, [2], corpus=ids_corpus, n_tokens=n_tokens, batch_size=1, progress=False)
    torch.testing.assert_close(unpadded[2], stats[2], rtol=0, atol=1e-6)
    assert stats.provenance["modules"] == {"1": arch_for(lm.model).mlp_out_name(1), "2": arch_for(lm.model).mlp_out_name(2)}


def test_float64_accumulation_and_left_alone_model(ids_corpus):
    lm = tiny_model("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    stats = second_moments(lm, [3], corpus=ids_corpus, n_tokens=120, dtype="float64", batch_size=4, progress=False)
    ref = reference_moments(lm, 3, list(iter_token_chunks(ids_corpus, lm, 120, progress=False)))
    assert stats[3].dtype == torch.float64
    torch.testing.assert_close(stats[3], ref, rtol=0, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # hooks are gone afterwards: a full forward still produces logits
    assert lm.model(input_ids=torch.tensor([[0, 5, 6]])).logits.shape == (1, 3, VOCAB)


def test_bad_arguments_are_named(ids_corpus):
    lm = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="dtype"):
        second_moments(lm, [1], corpus=ids_corpus, n_tokens=10, dtype="bfloat16", progress=False)
    with pytest.raises(ConfigError, match="n_tokens"):
        second_moments(lm, [1], corpus=ids_corpus, n_tokens=0, progress=False)
    with pytest.raises(ConfigError, match="out of range"):
        second_moments(lm, [4], corpus=ids_corpus, n_tokens=10, progress=False)


# --------------------------------------------------------------------------- (b) early stop

def test_forward_pass_stops_after_last_requested_layer(ids_corpus):
    lm = tiny_model("gpt_neox")
    spec = arch_for(lm.model)
    fired = {i: 0 for i in range(4)}
    handles = [get_module(lm.model, spec.block_name(i)).register_forward_hook(
        lambda m, a, o, i=i: fired.__setitem__(i, fired[i] + 1)) for i in range(4)]
    norm_fired = []
    handles.append(get_module(lm.model, spec.final_norm).register_forward_hook(lambda *a: norm_fired.append(1)))
    try:
        second_moments(lm, [1, 0], corpus=ids_corpus, n_tokens=100, batch_size=4, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert fired[0] > 0
    # block 1's forward hook never completes: the pass is cut inside it, right after W_out
    assert fired[1] == fired[2] == fired[3] == 0 and not norm_fired


# --------------------------------------------------------------------------- (c) cache

def cache_files(cache: Cache) -> list[Path]:
    return sorted(p for p in (cache.root / "stats").rglob("*.safetensors"))


def test_second_call_reads_cache_without_forward_pass(ids_corpus, tmp_path):
    lm = tiny_model("gpt2")
    cache = Cache(tmp_path / "cache")
    embed = lm.model.get_input_embeddings()
    with count_calls(embed) as calls:
        first = second_moments(lm, [0, 2], corpus=ids_corpus, n_tokens=200, cache=cache, batch_size=4, progress=False)
    assert len(calls) > 0 and first.provenance["source"] == {"0": "computed", "2": "computed"}
    assert len(cache_files(cache)) == 2
    with count_calls(embed) as calls:
        again = second_moments(lm, [2, 0], corpus=ids_corpus, n_tokens=200, cache=cache, batch_size=4, progress=False)
    assert calls == []
    assert again.provenance["source"] == {"0": "cache", "2": "cache"}
    assert again.n_tokens_used == first.n_tokens_used == 200
    for layer in (0, 2):
        assert torch.equal(again[layer], first[layer])

    # a different token count and a different corpus are different entries
    with count_calls(embed) as calls:
        second_moments(lm, [2], corpus=ids_corpus, n_tokens=150, cache=cache, progress=False)
    assert len(calls) > 0 and len(cache_files(cache)) == 3
    other = parse_corpus(str(write_ids_corpus(tmp_path / "other.jsonl", seed=1)), seq_len=16)
    with count_calls(embed) as calls:
        diff = second_moments(lm, [2], corpus=other, n_tokens=200, cache=cache, progress=False)
    assert len(calls) > 0 and len(cache_files(cache)) == 4
    assert not torch.allclose(diff[2], first[2])
    # ... and so is another accumulation dtype
    with count_calls(embed) as calls:
        second_moments(lm, [2], corpus=ids_corpus, n_tokens=200, dtype="float64", cache=cache, progress=False)
    assert len(calls) > 0 and len(cache_files(cache)) == 5


def test_only_missing_layers_are_computed_and_pass_stops_after_last_missing(ids_corpus, tmp_path):
    lm = tiny_model("llama")
    cache = Cache(tmp_path / "cache")
    spec = arch_for(lm.model)
    uncached = second_moments(lm, [1, 2, 3], corpus=ids_corpus, n_tokens=120, batch_size=4, progress=False)
    second_moments(lm, [1, 3], corpus=ids_corpus, n_tokens=120, cache=cache, batch_size=4, progress=False)
    cached_file = next(p for p in cache_files(cache) if ".layers.3." in p.name)
    mtime = cached_file.stat().st_mtime_ns
    fired = []
    handle = get_module(lm.model, spec.block_name(3)).register_forward_pre_hook(lambda *a: fired.append(1))
    try:
        with count_calls(lm.model.get_input_embeddings()) as calls:
            stats = second_moments(lm, [1, 2, 3], corpus=ids_corpus, n_tokens=120, cache=cache, batch_size=4,
                                   progress=False)
    finally:
        handle.remove()
    assert stats.provenance["source"] == {"1": "cache", "2": "computed", "3": "cache"}
    assert len(calls) > 0 and fired == []          # one pass, cut after layer 2 (layer 3 was cached)
    assert cached_file.stat().st_mtime_ns == mtime
    for layer in (1, 2, 3):
        torch.testing.assert_close(stats[layer], uncached[layer], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- (d) crash safety

def test_half_written_cache_files_are_not_trusted(ids_corpus, tmp_path):
    lm = tiny_model("gptj")
    cache = Cache(tmp_path / "cache")
    good = second_moments(lm, [1], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    (path,) = cache_files(cache)
    full = path.read_bytes()

    # a crash before the rename leaves only a temporary file: nothing to read, so compute
    path.unlink()
    (path.parent / f".{path.name}.abc123.tmp").write_bytes(full[: len(full) // 2])
    with count_calls(lm.model.get_input_embeddings()) as calls:
        again = second_moments(lm, [1], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    assert len(calls) > 0 and torch.equal(again[1], good[1])

    # a truncated final file (e.g. copied by hand, disk full) is detected, recomputed and replaced
    path.write_bytes(full[: len(full) - 100])
    with count_calls(lm.model.get_input_embeddings()) as calls:
        again = second_moments(lm, [1], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    assert len(calls) > 0 and torch.equal(again[1], good[1])
    with count_calls(lm.model.get_input_embeddings()) as calls:     # the replacement is a valid entry
        assert torch.equal(second_moments(lm, [1], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)[1],
                           good[1])
    assert calls == []

    # a complete file written for another key (e.g. renamed) is not taken either
    other = second_moments(lm, [2], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    other_path = next(p for p in cache_files(cache) if ".h.2." in p.name)
    path.write_bytes(other_path.read_bytes())
    again = second_moments(lm, [1], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    assert again.provenance["source"] == {"1": "computed"} and torch.equal(again[1], good[1])
    assert not torch.equal(other[2], good[1])


# --------------------------------------------------------------------------- (e) projector

def test_null_space_projector_properties():
    g = torch.Generator().manual_seed(0)
    d = 24
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigvals = torch.cat([torch.full((10,), 1e-6), torch.linspace(0.5, 3.0, 14)]).double()
    C = (Q * eigvals) @ Q.T
    P = null_space_projector(C, 1e-2)
    assert P.dtype == torch.float64 and P.shape == (d, d)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-10)
    assert round(float(P.trace())) == 10                                # rank = eigenvalues below threshold
    assert float(torch.linalg.matrix_norm(P @ C, ord=2)) < 1e-5         # P kills the used directions
    torch.testing.assert_close(P, Q[:, :10] @ Q[:, :10].T, rtol=0, atol=1e-10)
    # the threshold decides: above every eigenvalue, P = I; below all, P = 0
    torch.testing.assert_close(null_space_projector(C, 10.0), torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)
    assert float(null_space_projector(C, 1e-9).abs().max()) == 0.0
    # float32 input gives a float32 projector computed in float64
    P32 = null_space_projector(C.float(), 1e-2)
    assert P32.dtype == torch.float32 and float((P32.double() - P).abs().max()) < 1e-5
    with pytest.raises(ConfigError, match="nullspace_threshold"):
        null_space_projector(C, -1.0)
    with pytest.raises(ConfigError, match="square"):
        null_space_projector(C[:3], 1e-2)


def test_cached_projector(ids_corpus, tmp_path):
    lm = tiny_model("llama")
    cache = Cache(tmp_path / "cache")
    stats = second_moments(lm, [2], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    C = stats[2].double()
    eig = torch.linalg.eigvalsh((C + C.T) / 2)
    # threshold in the widest (relative) gap of the middle of the spectrum, away from round-off
    i = max(range(10, len(eig) - 10), key=lambda j: float(eig[j + 1] / eig[j]))
    threshold = float((eig[i] * eig[i + 1]).sqrt())
    P = cached_projector(stats, 2, threshold, cache)
    assert round(float(P.trace())) == i + 1
    files = sorted(p.name for p in cache.root.rglob("*nullspace*.safetensors"))
    assert len(files) == 1
    # read back from the cache: same tensor; a different threshold is a different file
    stats_again = second_moments(lm, [2], corpus=ids_corpus, n_tokens=100, cache=cache, progress=False)
    assert torch.equal(cached_projector(stats_again, 2, threshold, cache), P)
    assert torch.equal(cached_projector(stats_again, 2, threshold, None), P)
    P2 = cached_projector(stats_again, 2, float(eig.max()) * 2, cache)
    assert len(list(cache.root.rglob("*nullspace*.safetensors"))) == 2
    assert round(float(P2.trace())) == P.shape[0]


# --------------------------------------------------------------------------- (f) corpora

def test_generated_corpus_is_deterministic_and_cached(tmp_path):
    lm = tiny_model("llama")
    spec = CorpusSpec(kind="generated", seed=7, seq_len=12, gen_batch_size=4)
    rng_before = torch.random.get_rng_state()
    a = list(iter_token_chunks(spec, lm, 100, progress=False))
    assert torch.equal(torch.random.get_rng_state(), rng_before)      # the caller's RNG is untouched
    b = list(iter_token_chunks(spec, lm, 100, progress=False))
    assert a == b and sum(map(len, a)) == 100
    assert all(1 <= len(c) <= 12 and c[0] == 0 for c in a)             # starts at BOS, <= seq_len
    c = list(iter_token_chunks(CorpusSpec(kind="generated", seed=8, seq_len=12, gen_batch_size=4), lm, 100,
                               progress=False))
    assert c != a
    # prefix-stable: fewer tokens are a prefix of more tokens
    shorter = [t for ch in iter_token_chunks(spec, lm, 30, progress=False) for t in ch]
    assert shorter == [t for ch in a for t in ch][:30]

    cache = Cache(tmp_path / "cache")
    assert list(iter_token_chunks(spec, lm, 100, cache=cache, progress=False)) == a
    with count_calls(lm.model.get_input_embeddings()) as calls:
        assert list(iter_token_chunks(spec, lm, 100, cache=cache, progress=False)) == a
    assert calls == []
    # the stream identity names the model and the sampling settings
    ident = spec.identity(lm)
    assert ident["model"] == lm.identity.fingerprint and ident["seed"] == 7 and ident["top_p"] == spec.top_p
    assert CorpusSpec(kind="generated", seed=7, seq_len=12, gen_batch_size=8).identity(lm) != ident


def test_stats_over_generated_corpus_reuse_the_sampled_text(tmp_path):
    """Sampling runs the model too: it must not meet the stop hook, and a second layer reuses the text."""
    lm = tiny_model("gpt_neox")
    cache = Cache(tmp_path / "cache")
    spec = CorpusSpec(kind="generated", seed=3, seq_len=12, gen_batch_size=4)
    first = second_moments(lm, [1], corpus=spec, n_tokens=96, cache=cache, batch_size=4, progress=False)
    assert first.n_tokens_used == 96
    chunks = list(iter_token_chunks(spec, lm, 96, progress=False))   # sampled again without the cache
    torch.testing.assert_close(first[1].double(), reference_moments(lm, 1, chunks), rtol=0, atol=1e-5)
    with count_calls(lm.model.get_input_embeddings()) as calls:
        second_moments(lm, [2], corpus=spec, n_tokens=96, cache=cache, batch_size=4, progress=False)
    assert len(calls) == -(-len(chunks) // 4)       # only the statistics batches: no sampling forward passes


def test_generated_sequences_end_at_first_eos():
    lm = tiny_model("gpt2")
    lm.model.config.eos_token_id = list(range(1, 64))          # half the vocabulary ends a sequence
    spec = CorpusSpec(kind="generated", seed=0, seq_len=10, gen_batch_size=8, top_p=1.0)
    rows = sample_batch(spec, lm, 0)
    assert len(rows) == 8
    for row in rows:
        assert row[0] == 0 and 2 <= len(row) <= 10
        assert not any(1 <= t < 64 for t in row[1:-1])          # nothing kept after an EOS
    assert any(1 <= row[-1] < 64 and len(row) < 10 for row in rows)


def test_long_documents_split_and_restart_with_bos():
    from editdecay.data.corpus import _split

    assert list(_split(list(range(10, 20)), 4, None)) == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    # a tokenizer that starts documents with BOS (id 1): continuation pieces start with it too
    assert list(_split([1] + list(range(10, 17)), 4, 1)) == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16]]
    assert list(_split([], 4, 1)) == []


def test_corpus_strings_parse():
    assert parse_corpus("generated") == CorpusSpec(kind="generated")
    assert parse_corpus("generated:5", seq_len=64) == CorpusSpec(kind="generated", seed=5, seq_len=64)
    hf = parse_corpus("hf:wikitext:wikitext-103-raw-v1")
    assert (hf.kind, hf.source, hf.config, hf.split) == ("hf", "wikitext", "wikitext-103-raw-v1", "train")
    assert parse_corpus("hf:openwebtext").config is None
    assert parse_corpus("hf:wikitext:wikitext-103-raw-v1").describe() == "hf:wikitext:wikitext-103-raw-v1"
    assert parse_corpus("/data/wiki.parquet").kind == "file"
    with pytest.raises(ConfigError, match="hf:NAME"):
        parse_corpus("hf:")
    with pytest.raises(ConfigError, match="seed"):
        parse_corpus("generated:x")
    with pytest.raises(ConfigError, match=r"\.csv"):
        parse_corpus("corpus.csv")
    with pytest.raises(ConfigError, match="seq_len"):
        parse_corpus("generated", seq_len=1)
    with pytest.raises(ConfigError, match="top_p"):
        parse_corpus("generated", top_p=0.0)


def test_hf_corpus_without_datasets_is_a_clear_error(monkeypatch):
    lm = tiny_model("gpt2")
    monkeypatch.setitem(sys.modules, "datasets", None)       # import fails as if not installed
    spec = parse_corpus("hf:wikitext:wikitext-103-raw-v1")
    assert spec.identity(lm)["name"] == "wikitext"
    with pytest.raises(ConfigError, match="datasets"):
        next(iter_token_chunks(spec, lm, 10, progress=False))


def test_corpus_file_errors(tmp_path):
    lm = tiny_model("gpt2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no tokens"):
        list(iter_token_chunks(parse_corpus(str(empty)), lm, 10, progress=False))
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match="nope.txt"):
        list(iter_token_chunks(parse_corpus(str(missing)), lm, 10, progress=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [3, 999]}) + "\n")
    with pytest.raises(DataError, match="999"):
        list(iter_token_chunks(parse_corpus(str(bad)), lm, 10, progress=False))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="'text'"):
        list(iter_token_chunks(parse_corpus(str(nofield)), lm, 10, progress=False))
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    with pytest.raises(ConfigError, match="no tokenizer"):
        list(iter_token_chunks(parse_corpus(str(text)), lm, 10, progress=False))


def test_text_jsonl_parquet_give_the_same_tokens(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["The first document.\nIt has two lines.", "Second one, " + "word " * 40, "Third."]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n\n   \n\n")                # blank lines (one with spaces) separate docs
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs}), parquet)

    lm = wrap(tiny_models.tiny_model("llama", n_layers=1, vocab_size=len(tokenizer)), tokenizer)
    want = [tokenizer.encode(d, add_special_tokens=True) for d in docs]
    flat = [t for ids in want for t in ids]
    got = {}
    for path in (txt, jsonl, parquet):
        spec = parse_corpus(str(path), seq_len=16)
        chunks = list(iter_token_chunks(spec, lm, 10_000, progress=False))
        assert all(len(c) <= 16 for c in chunks)
        got[path.suffix] = chunks
        assert [t for c in chunks for t in c] == flat        # this tokenizer adds no BOS: pieces simply split
        ident = spec.identity(lm)
        assert ident["tokenizer"] is not None and ident["seq_len"] == 16
    assert got[".txt"] == got[".jsonl"] == got[".parquet"]
    # the identity follows the content, not the path
    copy = tmp_path / "copy.txt"
    copy.write_bytes(txt.read_bytes())
    assert parse_corpus(str(copy)).identity(lm) == parse_corpus(str(txt)).identity(lm)
    txt.write_text("changed\n")
    assert parse_corpus(str(copy)).identity(lm) != parse_corpus(str(txt)).identity(lm)


# --------------------------------------------------------------------------- embedded model, end to end

@pytest.mark.slow
def test_embedded_model_generated_corpus_end_to_end(tmp_path):
    from editdecay.core.models import load_model

    lm = load_model("smollm2-135m")
    cache = Cache(tmp_path / "cache")
    spec = parse_corpus("generated", seq_len=48, gen_batch_size=4)
    stats = second_moments(lm, [3, 5], corpus=spec, n_tokens=160, cache=cache, batch_size=4, progress=False)
    assert stats.n_tokens_used == 160
    d_k = lm.model.config.intermediate_size
    chunks = list(iter_token_chunks(spec, lm, 160, cache=cache, progress=False))
    assert any(lm.tokenizer.decode(c).strip() for c in chunks)
    for layer in (3, 5):
        C = stats[layer]
        assert C.shape == (d_k, d_k)
        torch.testing.assert_close(C, C.T, rtol=0, atol=1e-6)
        assert float(torch.linalg.eigvalsh(C.double()).min()) > -1e-4        # PSD up to round-off
    ref = reference_moments(lm, 5, chunks)
    torch.testing.assert_close(stats[5].double(), ref, rtol=1e-4, atol=1e-5)
    with count_calls(lm.model.get_input_embeddings()) as calls:
        again = second_moments(lm, [5, 3], corpus=spec, n_tokens=160, cache=cache, batch_size=4, progress=False)
    assert calls == [] and torch.equal(again[3], stats[3])
    assert again.provenance["corpus_identity"]["model"] == lm.identity.fingerprint
    P = cached_projector(again, 3, 2e-2, cache)
    assert 0 < float(P.trace()) < d_k
    assert isinstance(again, LayerStats) and os.path.exists(cache.root)
