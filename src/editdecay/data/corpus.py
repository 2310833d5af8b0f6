"""Generic text for the key statistics (docs/METHODS.md E1): which corpus, and its tokens.

A corpus is named by a `CorpusSpec` and spelled on the command line as one string
(`parse_corpus`):

- ``generated`` (or ``generated:SEED``): text sampled from the model itself with a
  fixed seed. The default for the embedded model, since nothing can be downloaded.
- a local file: ``.txt``/``.text``/``.md`` (documents separated by blank lines),
  ``.jsonl`` (one record a line, field ``text``, or pre-tokenised ``input_ids``),
  ``.parquet`` (column ``text`` or ``input_ids``, read with pyarrow).
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face `datasets` dataset, streamed
  (needs the `datasets` package and a network connection or a populated HF cache),
  e.g. ``hf:wikitext:wikitext-103-raw-v1``.

`iter_token_chunks` turns any of them into token-id lists of at most `seq_len`
tokens until exactly `n_tokens` tokens have been produced (or the corpus ends).
`CorpusSpec.identity` names the token stream for cache keys: what would change
the tokens changes the identity.

Documents longer than `seq_len` are split into consecutive pieces rather than
truncated (the MEMIT reference truncates Wikipedia articles; splitting gets more
out of a small local file). A continuation piece starts with the tokenizer's BOS
token when the tokenizer puts one at the start of every document, so no piece
begins mid-text without the start-of-sequence token the model was trained with.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import ClassVar, Iterable, Iterator

import torch
from pydantic import Field, model_validator

from editdecay.core.cache import Cache, atomic_write_bytes, sha256_file, stable_hash
from editdecay.core.config import Config, check_choice
from editdecay.core.errors import ConfigError, DataError
from editdecay.core.models import LoadedModel
from editdecay.data.documents import BadLine, json_lines, read_text, split_documents
from editdecay.data.source import split_spec

log = logging.getLogger(__name__)

CORPUS_KINDS = ("generated", "file", "hf")
TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
GENERATED_FORMAT_VERSION = 2   # bump when the sampling distribution or the draw changes: old cached streams become
# stale. Not bumped for changes at the level of float rounding, which the stream already depends on (batch size,
# device): the cascade of candidate sizes in data/sampling.py renormalises by a running sum, 1 token in ~6k differs
                               # (2: one generator per sequence, sampled with a key/value cache, data/sampling.py)
_TOKENIZE_GROUP = 64           # documents per batched tokenizer call


class CorpusSpec(Config):
    """Which generic text the second-moment statistics (E1) are collected over.

    Only `generated` reads the sampling fields; only `file`/`hf` read `text_field`.
    Raises ConfigError naming the field (core.config).
    """

    config_name: ClassVar[str] = "corpus"

    kind: str = Field(description="generated (sampled from the model) | file | hf")
    source: str | None = Field(None, description="file path (kind=file) or dataset name (kind=hf)")
    config: str | None = Field(None, description="dataset configuration (kind=hf), e.g. wikitext-103-raw-v1")
    split: str = Field("train", description="dataset split (kind=hf)")
    text_field: str = Field("text", description="record field / column holding the text (file: jsonl, parquet; hf)")
    seq_len: int = Field(256, description="longest token sequence fed to the model")
    seed: int = Field(0, description="sampling seed (kind=generated)")
    temperature: float = Field(1.0, description="sampling temperature (kind=generated)")
    top_k: int = Field(0, description="0: no top-k truncation (kind=generated)")
    top_p: float = Field(0.95, description="nucleus sampling mass; 1.0: none (kind=generated)")
    gen_batch_size: int = Field(64, description="sequences sampled together (kind=generated); the text does not depend "
                                                "on it (each sequence has its own seed), the cache files do")

    @model_validator(mode="after")
    def _validate(self) -> "CorpusSpec":
        check_choice("corpus.kind", self.kind, CORPUS_KINDS)
        if self.kind in ("file", "hf") and not self.source:
            raise ConfigError(f"corpus.source: a {self.kind!r} corpus needs a "
                              f"{'file path' if self.kind == 'file' else 'dataset name'}, got {self.source!r}")
        if self.kind == "file":
            suffix = Path(self.source).suffix.lower()
            if suffix not in FILE_SUFFIXES:
                raise ConfigError(f"corpus.source: {self.source!r} has suffix {suffix!r}; a corpus file must end in "
                                  f"one of {', '.join(FILE_SUFFIXES)} (or use 'generated' or 'hf:NAME[:CONFIG]')")
        if self.seq_len < 2:
            raise ConfigError(f"corpus.seq_len: {self.seq_len!r}; give an integer >= 2")
        if self.gen_batch_size < 1:
            raise ConfigError(f"corpus.gen_batch_size: {self.gen_batch_size!r}; give an integer >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"corpus.temperature: {self.temperature!r}; give a finite number > 0")
        if self.top_k < 0:
            raise ConfigError(f"corpus.top_k: {self.top_k!r}; give an integer >= 0 (0 disables top-k)")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"corpus.top_p: {self.top_p!r}; give a number in (0, 1] (1 disables nucleus sampling)")
        return self

    def describe(self) -> str:
        """The command-line spelling (inverse of `parse_corpus` up to seq_len and sampling settings)."""
        if self.kind == "generated":
            return f"generated:{self.seed}"
        if self.kind == "hf":
            return f"hf:{self.source}" + (f":{self.config}" if self.config else "")
        return str(self.source)

    def sampling(self) -> dict:
        """Settings that determine a generated token stream (besides the model)."""
        return {"seed": self.seed, "seq_len": self.seq_len, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "gen_batch_size": self.gen_batch_size,
                "version": GENERATED_FORMAT_VERSION}

    def identity(self, lm: LoadedModel) -> dict:
        """What determines the token stream, for cache keys and result files.

        generated: the model's weight fingerprint and the sampling settings (the
        tokens are a function of both). file: the file's sha256 (not its path, so a
        moved file keeps its cache), the tokenizer and seq_len. hf: dataset name,
        config, split, field, tokenizer and seq_len.
        """
        if self.kind == "generated":
            return {"kind": "generated", "model": lm.identity.fingerprint, **self.sampling()}
        common = {"text_field": self.text_field, "seq_len": self.seq_len, "tokenizer": tokenizer_fingerprint(lm.tokenizer)}
        if self.kind == "file":
            path = self.path()
            return {"kind": "file", "sha256": sha256_file(path), "suffix": path.suffix.lower(), **common}
        return {"kind": "hf", "name": self.source, "config": self.config, "split": self.split, **common}

    def path(self) -> Path:
        """The corpus file, checked to exist (kind=file only)."""
        from editdecay.core.files import check_file

        return check_file(Path(self.source).expanduser(), "corpus.source: file")



def parse_corpus(text: str, **overrides) -> CorpusSpec:
    """Parse the CLI spelling: "generated", "generated:SEED", "hf:NAME", "hf:NAME:CONFIG" or a file path.

    `overrides` set the other `CorpusSpec` fields (seq_len, split, top_p, ...).
    """
    text = text.strip()
    if not text:
        raise ConfigError("corpus: empty string; use 'generated', a .txt/.jsonl/.parquet path or 'hf:NAME[:CONFIG]'")
    kind, rest = split_spec(text)
    if kind == "generated":
        seed = rest
        if seed:
            try:
                overrides = {**overrides, "seed": int(seed)}
            except ValueError:
                raise ConfigError(f"corpus: seed {seed!r} in {text!r} is not an integer; write e.g. 'generated:0'") from None
        return CorpusSpec(kind="generated", **overrides)
    if kind == "hf":
        name, config = split_spec(rest)
        if not name or ":" in config or (":" in rest and not config):
            raise ConfigError(f"corpus: {text!r}; a dataset is spelled 'hf:NAME' or 'hf:NAME:CONFIG', "
                              f"e.g. 'hf:wikitext:wikitext-103-raw-v1'")
        return CorpusSpec(kind="hf", source=name, config=config or None, **overrides)
    return CorpusSpec(kind="file", source=text, **overrides)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """Hash of a tokenizer's vocabulary, special tokens and how it encodes a probe text.

    Two tokenizers with the same fingerprint turn the same text into the same ids.
    None for models used without a tokenizer (pre-tokenised corpora only).
    """
    if tokenizer is None:
        return None
    probe = "Hello world. The café's 3 cats\n\nsat; ok?"
    return stable_hash({
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "probe": tokenizer.encode(probe, add_special_tokens=True),
    })


# --------------------------------------------------------------------------- token chunks

def iter_token_chunks(spec: CorpusSpec, lm: LoadedModel, n_tokens: int, *, cache: Cache | None = None,
                      progress: bool = True) -> Iterator[list[int]]:
    """Yield token-id lists (each 1..seq_len long) until exactly `n_tokens` ids have been yielded.

    Stops early, with a warning, if the corpus has fewer tokens. An empty corpus is a
    `DataError`. For `generated`, sampled batches are cached under `cache` when given
    (see `generated_chunks`).
    """
    if not (isinstance(n_tokens, int) and n_tokens >= 1):
        raise ConfigError(f"n_tokens: {n_tokens!r}; give a positive integer")
    if spec.kind == "generated":
        source: Iterable[list[int]] = generated_chunks(spec, lm, cache=cache, progress=progress)
    else:
        vocab = lm.model.get_input_embeddings().num_embeddings
        source = document_chunks(spec, lm.tokenizer, vocab)
    produced = 0
    for chunk in source:
        chunk = chunk[: n_tokens - produced]
        produced += len(chunk)
        yield chunk
        if produced >= n_tokens:
            return   # before pulling another chunk: for `generated` that would sample a whole batch
    if produced == 0:
        raise DataError(f"corpus {spec.describe()!r} has no tokens (no non-empty documents in field {spec.text_field!r})")
    if produced < n_tokens:
        log.warning("corpus %s ran out after %d of the %d requested tokens; using %d",
                    spec.describe(), produced, n_tokens, produced)


def _split(ids: list[int], seq_len: int, bos: int | None) -> Iterator[list[int]]:
    """Cut one document into pieces of <= seq_len; continuation pieces re-start with BOS (see module doc)."""
    if not ids:
        return
    yield ids[:seq_len]
    rest = ids[seq_len:]
    step = seq_len - 1 if bos is not None else seq_len
    for start in range(0, len(rest), step):
        piece = rest[start:start + step]
        yield ([bos] + piece) if bos is not None else piece


def document_chunks(spec: CorpusSpec, tokenizer, vocab_size: int) -> Iterator[list[int]]:
    """Token chunks of a file or `datasets` corpus, document by document."""
    where = spec.describe()
    docs = _file_documents(spec) if spec.kind == "file" else _hf_documents(spec)
    bos = None
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        probe = tokenizer.encode("a", add_special_tokens=True)
        bos = tokenizer.bos_token_id if probe[:1] == [tokenizer.bos_token_id] else None
    group: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer(group, add_special_tokens=True)["input_ids"]:
            yield from _split(list(ids), spec.seq_len, bos)
        group.clear()

    for index, doc in docs:
        if isinstance(doc, str):
            if not doc.strip():
                continue
            if tokenizer is None:
                raise ConfigError(f"corpus {where!r}: record {index} is text, but the model has no tokenizer; "
                                  f"give pre-tokenised 'input_ids' records or load a tokenizer")
            group.append(doc)
            if len(group) >= _TOKENIZE_GROUP:
                yield from flush()
        else:
            ids = [int(t) for t in doc]
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise DataError(f"corpus {where!r}: record {index} field 'input_ids' has token id {bad[0]}, "
                                f"outside the model's vocabulary [0, {vocab_size})")
            yield from _split(ids, spec.seq_len, None)
    if group:
        yield from flush()


def _file_documents(spec: CorpusSpec) -> Iterator[tuple[int, str | list[int]]]:
    """(record index, text or token ids) for each document of a local corpus file."""
    path = spec.path()
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        # Documents are separated by blank lines (data.documents rules).
        yield from enumerate(split_documents(read_text(path, "corpus file"), f"corpus file {str(path)!r}"))
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            for lineno, record in json_lines(f):
                if isinstance(record, BadLine):
                    raise DataError(f"corpus file {str(path)!r} line {lineno}: not JSON ({record.error})")
                yield lineno, _record_document(record, spec.text_field, f"{path} line {lineno}")
    else:  # .parquet
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        column = spec.text_field if spec.text_field in names else "input_ids" if "input_ids" in names else None
        if column is None:
            raise DataError(f"corpus file {str(path)!r} has no column {spec.text_field!r} or 'input_ids'; "
                            f"columns: {names}")
        index = 0
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield index, value
                index += 1


def _record_document(record, text_field: str, where: str) -> str | list[int]:
    if isinstance(record, dict):
        if isinstance(record.get(text_field), str):
            return record[text_field]
        if isinstance(record.get("input_ids"), list):
            return record["input_ids"]
    raise DataError(f"corpus {where}: record needs a string field {text_field!r} or a list field 'input_ids'; "
                    f"got {str(record)[:80]!r}")


def _hf_documents(spec: CorpusSpec) -> Iterator[tuple[int, str]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"corpus {spec.describe()!r} needs the 'datasets' package (pip install datasets); "
                          f"offline, use 'generated' or a local .txt/.jsonl/.parquet file") from None
    try:
        ds = datasets.load_dataset(spec.source, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # network, unknown name/config/split: all user-fixable
        raise ConfigError(f"corpus {spec.describe()!r} (split {spec.split!r}) could not be loaded: {e}. "
                          f"Offline, use 'generated' or a local file.") from e
    for index, record in enumerate(ds):
        value = record.get(spec.text_field)
        if not isinstance(value, str):
            raise DataError(f"corpus {spec.describe()!r}: record {index} has no string field {spec.text_field!r}; "
                            f"fields: {sorted(record)}")
        yield index, value


# --------------------------------------------------------------------------- generated text

def _start_token(lm: LoadedModel) -> int:
    for owner in (lm.tokenizer, lm.model.config):
        for attr in ("bos_token_id", "eos_token_id"):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, int):
                return value
    raise ConfigError("corpus 'generated': the model has neither a BOS nor an EOS token id to start sampling from; "
                      "set config.bos_token_id or use a file corpus")


def _eos_ids(lm: LoadedModel) -> list[int]:
    ids = set()
    for owner in (lm.tokenizer, lm.model.config, getattr(lm.model, "generation_config", None)):
        value = getattr(owner, "eos_token_id", None) if owner is not None else None
        ids.update([value] if isinstance(value, int) else list(value or []))
    return sorted(ids)


def _sequence_seed(seed: int, index: int) -> int:
    """The seed of sequence number `index` (0-based, over the whole stream) of the stream seeded `seed`."""
    return int(stable_hash({"seed": seed, "sequence": index}), 16) % (2 ** 62)


def sample_batch(spec: CorpusSpec, lm: LoadedModel, batch: int) -> list[list[int]]:
    """Sample generation batch number `batch`: sequences batch * gen_batch_size ... + gen_batch_size - 1 of the
    stream, each from the start token, together in one batch with a key/value cache (data/sampling.py).

    Each sequence draws from its own generator, seeded from (spec.seed, its index in the stream), so the caller's
    random state is untouched and the stream is prefix-stable: asking for more tokens appends batches and never
    changes earlier ones. Sequences end at the first EOS (kept) or at seq_len tokens. Same weights, settings and
    device give the same tokens; other devices may sample differently.
    """
    from editdecay.data.sampling import sample_sequences

    first = batch * spec.gen_batch_size
    seeds = [_sequence_seed(spec.seed, first + j) for j in range(spec.gen_batch_size)]
    return sample_sequences(lm.model, seeds, start=_start_token(lm), eos=_eos_ids(lm), max_len=spec.seq_len,
                            temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)


def _generated_parts(spec: CorpusSpec, fingerprint: str, batch: int) -> tuple[str, ...]:
    return ("corpora", "generated", fingerprint, stable_hash(spec.sampling()), f"batch-{batch:06d}.safetensors")


def cached_generated_chunks(spec: CorpusSpec, fingerprint: str, cache: Cache) -> Iterator[list[int]]:
    """The `generated` stream as `generated_chunks` cached it, read without a model (e.g. by reports).

    Raises FileNotFoundError at the first batch that was never sampled into `cache`.
    """
    meta = json.dumps(spec.sampling(), sort_keys=True)
    batch = 0
    while True:
        path = cache.path(*_generated_parts(spec, fingerprint, batch))
        rows = _load_generated(path, meta)
        if rows is None:
            raise FileNotFoundError(f"generated corpus batch {batch} is not in the cache ({path})")
        yield from rows
        batch += 1


def _load_generated(path, expect_meta: str) -> list[list[int]] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("sampling") != expect_meta:
                return None
        tensors = load_file(str(path))
        flat, lengths = tensors["ids"].tolist(), tensors["lengths"].tolist()
    except Exception as e:  # truncated or foreign file: sample again
        log.warning("ignoring unreadable cached corpus batch %s (%s)", path, e)
        return None
    if sum(lengths) != len(flat) or any(n < 1 for n in lengths):
        return None
    rows, at = [], 0
    for n in lengths:
        rows.append(flat[at:at + n])
        at += n
    return rows


def generated_chunks(spec: CorpusSpec, lm: LoadedModel, *, cache: Cache | None = None,
                     progress: bool = True) -> Iterator[list[int]]:
    """The endless, seeded stream of sequences sampled from the model, batch after batch.

    With a cache, every sampled batch is stored (atomically, safetensors) under
    corpora/generated/<model fingerprint>/<settings hash>/, so statistics for other
    layers, token counts or dtypes reuse the same text without sampling again.
    """
    from safetensors.torch import save
    from tqdm.auto import tqdm

    meta = json.dumps(spec.sampling(), sort_keys=True)
    bar = None
    batch = 0
    try:
        while True:
            path = cache.path(*_generated_parts(spec, lm.identity.fingerprint, batch)) if cache is not None else None
            rows = _load_generated(path, meta) if path is not None else None
            if rows is None:
                if bar is None:
                    bar = tqdm(desc="sampling corpus from the model", unit="tok", disable=not progress, leave=False)
                rows = sample_batch(spec, lm, batch)
                bar.update(sum(len(r) for r in rows))
                if path is not None:
                    flat = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
                    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
                    atomic_write_bytes(path, save({"ids": flat, "lengths": lengths}, metadata={"sampling": meta}))
            yield from rows
            batch += 1
    finally:
        if bar is not None:
            bar.close()


__all__ = ["CORPUS_KINDS", "CorpusSpec", "cached_generated_chunks", "document_chunks", "generated_chunks",
           "iter_token_chunks", "parse_corpus",
           "sample_batch", "tokenizer_fingerprint"]
