"""How frequent an edit's target is: in English at large (wordfreq), or in the cell's own token streams.

The study found that edits with frequent target words tend to survive fine-tuning
and edits with rare targets are erased (docs/PROTOCOL.md). Two methods (`METHODS`), chosen per report
(`editdecay report --frequency-method`), and the report names the one used:

`wordfreq` (the default): the target's Zipf frequency in English from the `wordfreq` package
(large multi-source word lists: Wikipedia, subtitles, news, books, web text, ...; offline, shipped
with the package). Zipf = log10(occurrences per billion words): 3 is once per million words, 6 once
per thousand; a multi-word target ("New Zealand dollar") is combined by wordfreq as the frequency
of the phrase assuming independent words; 0 is a word not in the list. This is the notion of a
"frequent word" the study's observation is about, and it spreads the targets out even when the
small embedded corpora contain none of them.

`corpus`: each target is counted as a token sequence in two token streams:
- the fine-tuning data: regenerated from the cell's config (the embedded task is
  deterministic given its settings; files are read again) and tokenised exactly as
  training tokenises it (recipe template and cutoff); the whole training split is
  counted, prompts included, since the model reads them too;
- the statistics corpus of the edit (E1): the generated stream is read from the
  editdecay cache where the statistics stage left it, a local file is read and
  tokenised again, both cut at the number of tokens the statistics used. A hub
  corpus, or a generated one no longer in the cache, is reported as unavailable
  (the report never samples text or downloads).

A target is counted in two spellings: with the scoring convention's word boundary
(`tokens.encode_target`, a leading space for BPE tokenizers) and bare (as at the start
of a line or after "Response:\\n"). Counts are exact occurrences of the contiguous token
sequence; frequencies are per million tokens of the stream.

`TargetFrequencies` memoises tokenizers and streams for one report run (an explicit
object, no module-level cache): many cells share a model, data and corpus.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from editdecay.core.files import MAX_RESULT_BYTES, json_or_none
from editdecay.report.records import CellRecord

log = logging.getLogger(__name__)

MAX_STREAM_TOKENS = 20_000_000     # a larger corpus is cut here (counting stays a few seconds)
METHODS = ("wordfreq", "corpus")
WORDFREQ_LANG, WORDFREQ_LIST = "en", "best"


def zipf_frequency(target: str | None) -> float | None:
    """wordfreq's Zipf frequency of `target` in English ('best' word list); None without a target."""
    if target is None or not str(target).strip():
        return None
    from wordfreq import zipf_frequency as zf

    return float(zf(str(target).strip(), WORDFREQ_LANG, wordlist=WORDFREQ_LIST))


def method_description(method: str) -> str:
    """One line for the report: which frequency method was used and what its numbers mean."""
    if method == "wordfreq":
        from importlib.metadata import version

        return (f"target frequency: wordfreq {version('wordfreq')} Zipf frequency in English (word list "
                f"'{WORDFREQ_LIST}'; log10 occurrences per billion words: 3 = once per million words, 6 = once per "
                f"thousand; 0 = not in the list); the corpus-count method is `editdecay report "
                f"--frequency-method corpus`")
    return ("target frequency: occurrences of the target's tokens in the cell's fine-tuning data and E1 statistics "
            "corpus (per million tokens); `--frequency-method wordfreq` (the default) uses English word frequencies")


@dataclass(frozen=True)
class TokenStream:
    """Token ids of one text source (sequences separated by -1), or why there are none."""

    name: str
    ids: np.ndarray | None
    n_tokens: int
    unavailable: str | None = None

    def count(self, variants: Sequence[Sequence[int]]) -> int | None:
        """Occurrences of any of the token sequences (summed over distinct spellings)."""
        if self.ids is None:
            return None
        total = 0
        arr = self.ids
        for seq in {tuple(v) for v in variants if v}:
            k = len(seq)
            if k > len(arr):
                continue
            hits = np.flatnonzero(arr[: len(arr) - k + 1] == seq[0])
            for j in range(1, k):
                hits = hits[arr[hits + j] == seq[j]]
            total += int(hits.size)
        return total

    def per_million(self, count: int | None) -> float | None:
        if count is None or not self.n_tokens:
            return None
        return 1e6 * count / self.n_tokens


def _stream(name: str, sequences) -> TokenStream:
    parts, n = [], 0
    for seq in sequences:
        if n >= MAX_STREAM_TOKENS:
            break
        parts.append(np.asarray(list(seq), dtype=np.int64))
        parts.append(np.array([-1], dtype=np.int64))
        n += len(seq)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return TokenStream(name, ids, n)


@dataclass(frozen=True)
class TargetCount:
    target: str | None
    finetune_count: int | None
    finetune_per_million: float | None
    corpus_count: int | None
    corpus_per_million: float | None
    zipf: float | None = None          # wordfreq method: Zipf frequency in English


class TargetFrequencies:
    """Frequencies of edit targets per cell (`method`: wordfreq | corpus, see the module docstring); sources
    that cannot be read are reported, not raised. ConfigError for an unknown method."""

    def __init__(self, results_root: Path, cache_dir: str | Path | None = None, method: str = "wordfreq"):
        from editdecay.core.cache import Cache
        from editdecay.core.errors import ConfigError

        if method not in METHODS:
            raise ConfigError(f"frequency method {method!r} is not valid; use one of {', '.join(METHODS)}")
        self.method = method
        self.root = Path(results_root)
        self.cache = Cache(Path(cache_dir)) if cache_dir else Cache.default()
        self._tokenizers: dict[str, object] = {}
        self._streams: dict[str, TokenStream] = {}
        self.problems: dict[str, str] = {}       # source name -> why it is unavailable

    # ------------------------------------------------------------------ inputs

    def tokenizer(self, cell: CellRecord):
        model = (cell.result or {}).get("model") or {}
        name = ((cell.result or {}).get("config") or {}).get("model", {}).get("name") or model.get("name")
        source = model.get("source")
        key = source or name
        if key in self._tokenizers:
            return self._tokenizers[key]
        tok = None
        try:
            from transformers import AutoTokenizer

            from editdecay.core.models import EMBEDDED_NAME, resolve_source

            if not (source and Path(source).is_dir()):
                source = resolve_source(name, self.cache) if name == EMBEDDED_NAME else name
            # Never a download: a hub model's tokenizer is used only if it is in the local Hugging Face cache.
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as e:       # any failure only makes the frequencies unavailable
            self.problems[f"tokenizer of {name}"] = f"cannot load the tokenizer ({e})"
        self._tokenizers[key] = tok
        return tok

    def targets(self, cell: CellRecord) -> dict[str, str]:
        """case_id -> target_new, from the patch stage's saved requests, else by loading the edit data again."""
        stage = ((cell.result or {}).get("stages") or {}).get("patch") or {}
        path = self.root / "stages" / str(stage.get("id")) / "patch" / "patch.json"
        try:
            reqs = (json_or_none(path, limit=MAX_RESULT_BYTES) or {})["requests"]
            return {r["case_id"]: r["target_new"] for r in reqs}
        except (OSError, ValueError, KeyError, TypeError) as e:   # no usable patch.json: load the data again
            log.debug("%s: no requests in %s (%s); loading the edit data", cell.label, path, e)
        spec = ((cell.result or {}).get("config") or {}).get("requests") or {}
        try:
            from editdecay.data import load_edit_data

            ds = load_edit_data(spec["data"], zsre_target=spec.get("zsre_target", "answers"),
                                strict=spec.get("strict", False), limit=spec["n"], seed=spec.get("seed"))
            return {r.case_id: r.target_new for r in ds.requests}
        except Exception as e:
            self.problems[f"edit data of {cell.label}"] = f"cannot read the edit requests ({e})"
            return {}

    def finetune_stream(self, cell: CellRecord, tok) -> TokenStream:
        cfg = (cell.result or {}).get("config") or {}
        recipe = cfg.get("recipe") or {}
        spec = cfg.get("finetune_data")
        settings = {k: cfg.get(k) for k in ("data_settings", "task", "chatterbot")}
        key = json.dumps(["ft", spec, settings, recipe.get("template"), recipe.get("cutoff_len"),
                          recipe.get("train_on_prompt"), getattr(tok, "name_or_path", None)], sort_keys=True)
        if key not in self._streams:
            name = f"fine-tuning data {spec}"
            try:
                from editdecay.data.instructions import tokenize
                from editdecay.report.records import training_data

                source, _ = training_data(cfg)
                ts = tokenize(source, tok, cutoff_len=recipe["cutoff_len"], template=recipe.get("template", "alpaca"),
                              train_on_prompt=recipe.get("train_on_prompt", False))
                self._streams[key] = _stream(name, (e.input_ids for e in ts.examples))
            except Exception as e:
                self._streams[key] = TokenStream(name, None, 0, f"cannot regenerate {spec!r} ({e})")
        return self._streams[key]

    def corpus_stream(self, cell: CellRecord, tok) -> TokenStream:
        from editdecay.data.corpus import CorpusSpec, parse_corpus

        result = cell.result or {}
        editor = (result.get("config") or {}).get("editor") or {}
        fingerprint = (result.get("model") or {}).get("fingerprint")
        spec, n_tokens = None, editor.get("stats_tokens")
        prov = self._statistics_provenance(cell)
        try:
            if prov and prov.get("corpus_spec"):
                spec = CorpusSpec(**prov["corpus_spec"])
                used = prov.get("n_tokens_used") or {}
                n_tokens = max(used.values()) if used else prov.get("n_tokens_requested", n_tokens)
            elif editor.get("stats_corpus"):
                spec = parse_corpus(editor["stats_corpus"])
        except Exception as e:
            return TokenStream("statistics corpus", None, 0, f"its description is unreadable ({e})")
        if spec is None or not n_tokens:
            return TokenStream("statistics corpus", None, 0, "the cell records no statistics corpus")
        name = f"statistics corpus {spec.describe()} ({n_tokens} tokens)"
        key = json.dumps(["corpus", spec.to_dict(), n_tokens, fingerprint, getattr(tok, "name_or_path", None)],
                         sort_keys=True, default=str)
        if key not in self._streams:
            try:
                self._streams[key] = self._read_corpus(name, spec, int(n_tokens), fingerprint, tok)
            except Exception as e:
                self._streams[key] = TokenStream(name, None, 0, f"cannot read it ({e})")
        return self._streams[key]

    def _statistics_provenance(self, cell: CellRecord) -> Mapping | None:
        stage = ((cell.result or {}).get("stages") or {}).get("patch") or {}
        try:
            manifest = json_or_none(self.root / "stages" / str(stage.get("id")) / "stage.json") or {}
            return manifest["outputs"]["statistics"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _read_corpus(self, name: str, spec, n_tokens: int, fingerprint: str | None, tok) -> TokenStream:
        def cut(chunks):
            left = n_tokens
            for chunk in chunks:
                if left <= 0:
                    return
                chunk = list(chunk)[:left]
                left -= len(chunk)
                yield chunk

        if spec.kind == "generated":
            from editdecay.data.corpus import (
                cached_generated_chunks,  # the cached batches, read without a model
            )

            return _stream(name, cut(cached_generated_chunks(spec, str(fingerprint), self.cache)))
        if spec.kind == "file":
            from editdecay.data.corpus import (
                document_chunks,  # the same document splitting E1 used
            )

            return _stream(name, cut(document_chunks(spec, tok, len(tok))))
        return TokenStream(name, None, 0, "a hub corpus is not read by the report (it would need the network)")

    # ------------------------------------------------------------------ counts

    def counts(self, cell: CellRecord) -> dict[str, TargetCount]:
        """case_id -> its target's frequency: Zipf (wordfreq method) or counts in the cell's fine-tuning data and
        statistics corpus (corpus method)."""
        from editdecay.core.tokens import encode_target

        targets = self.targets(cell)
        if self.method == "wordfreq":
            return {cid: TargetCount(t, None, None, None, None, zipf_frequency(t)) for cid, t in targets.items()}
        tok = self.tokenizer(cell) if targets else None
        out: dict[str, TargetCount] = {}
        if tok is None:
            return {cid: TargetCount(t, None, None, None, None) for cid, t in targets.items()}
        ft, corpus = self.finetune_stream(cell, tok), self.corpus_stream(cell, tok)
        for stream in (ft, corpus):
            if stream.unavailable:
                self.problems[stream.name] = stream.unavailable
        for cid, target in targets.items():
            try:
                variants = [encode_target(tok, target), tok.encode(target.strip(), add_special_tokens=False)]
            except Exception:
                variants = []
            fc, cc = ft.count(variants), corpus.count(variants)
            out[cid] = TargetCount(target, fc, ft.per_million(fc), cc, corpus.per_million(cc))
        return out


__all__ = ["MAX_STREAM_TOKENS", "METHODS", "TargetCount", "TargetFrequencies", "TokenStream", "method_description",
           "zipf_frequency"]
