"""Perplexity on a local text corpus (`ppl:FILE`), scored by lm-eval's rolling log-likelihood.

lm-eval does the scoring (`loglikelihood_rolling`: every token of a document,
the first one conditioned on the model's prefix token, long documents in
windows of the model's context), so no perplexity code is written here. The
task is an in-memory lm-eval config whose documents come from `custom_dataset`:
the corpus is read and checked once by this module, and no cache file is written.

Metrics: lm-eval's word_perplexity, byte_perplexity and bits_per_byte, plus
token_perplexity = exp(-sum of document log-likelihoods / number of tokens
scored), with the token count taken from the same tokenisation lm-eval used
(`HFLM.tok_encode`) and the log-likelihoods from lm-eval's per-document outputs.

Corpus formats: .txt (documents separated by blank lines), .jsonl (one object
with a "text" field per line), .json (a list of strings or of such objects).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from editdecay.core.errors import DataError
from editdecay.data.documents import BadLine, json_lines, read_text, split_documents

METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def read_corpus(path: Path) -> list[str]:
    """The documents of a corpus file, stripped; empty documents are dropped. DataError names what is wrong."""
    path = Path(path)
    text = read_text(path, "perplexity corpus")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        docs = split_documents(text, f"perplexity corpus {str(path)!r}")
    elif suffix == ".jsonl":
        docs = []
        for i, value in json_lines(text.splitlines()):
            if isinstance(value, BadLine):
                raise DataError(f"{path}:{i}: not valid JSON ({value.error})")
            docs.append(_text_of(value, f"{path}:{i}"))
    elif suffix == ".json":
        data = _json(text, str(path))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of strings or of {{\"text\": ...}} objects")
        docs = [_text_of(x, f"{path}[{i}]") for i, x in enumerate(data)]
    else:
        raise DataError(f"perplexity corpus {str(path)!r}: use a .txt, .jsonl or .json file")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"perplexity corpus {str(path)!r} holds no text")
    return docs


def _json(text: str, where: str):
    from editdecay.core.files import parse_json

    return parse_json(text, where, error=DataError)


def _text_of(x, where: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, dict) and isinstance(x.get("text"), str):
        return x["text"]
    raise DataError(f"{where}: expected a string or an object with a string 'text' field, got {str(x)[:80]!r}")


def task_name(path: Path) -> str:
    return "ppl_" + (re.sub(r"[^A-Za-z0-9]+", "_", Path(path).stem).strip("_").lower() or "corpus")


class _Documents:
    """lm-eval's `custom_dataset` hook: called with the task's metadata, returns the documents as a split.
    A class rather than a closure so the config stays printable in lm-eval's logs."""

    def __init__(self, docs: list[str]):
        self.docs = docs

    def __call__(self, **_metadata):
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": self.docs})})

    def __repr__(self) -> str:
        return f"<{len(self.docs)} documents>"


def lm_eval_config(path: Path, digest: str | None = None) -> dict:
    """The lm-eval task config (a dict, as `TaskManager.load` takes it) for perplexity on `path`."""
    docs = read_corpus(path)
    return {
        "task": task_name(path), "custom_dataset": _Documents(docs), "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in METRICS],
        "metadata": {"version": 1.0, "corpus": str(path), "sha256": digest, "n_documents": len(docs)},
    }


def token_perplexity(samples: list[dict], tok_encode) -> dict:
    """token_perplexity and n_tokens from lm-eval's logged samples of a rolling task (see module docstring)."""
    total_ll, n_tokens = 0.0, 0
    for s in samples:
        text = s["arguments"][0][0]               # the string lm-eval scored: doc_to_target(doc)
        ll = s["filtered_resps"][0]
        total_ll += float(ll[0] if isinstance(ll, (list, tuple)) else ll)
        n_tokens += len(tok_encode(text))
    value = math.exp(-total_ll / n_tokens) if n_tokens else None
    return {"token_perplexity": value, "n_tokens": n_tokens}


__all__ = ["METRICS", "lm_eval_config", "read_corpus", "task_name", "token_perplexity"]
