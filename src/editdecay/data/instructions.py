"""Fine-tuning data: instruction records and plain text, loaded, validated and tokenised.

Sources (named on the command line):
- `embedded`            the generated task of `data.embedded_task` (training split)
- `chatterbot[:DIR]`    human-written question/answer pairs of the `chatterbot-corpus` package (English, BSD-3-Clause;
                        training split of `data.chatterbot`), or of a directory of files in its YAML format
- `instructions:PATH`   Commonsense170K-shaped records {instruction, input, output} in .json (a list) or .jsonl
- `text:PATH`           a plain text file; documents are separated by blank lines; every token is trained
- `hf:NAME[:SPLIT]`     a `datasets` hub name with instruction records (needs network and `pip install datasets`)

Two stages, so mistakes surface early: `load_source` reads and validates records
without a model (a missing field or an empty file fails before any model is
loaded); `tokenize` needs the tokenizer and checks the cutoff against the prompt
template before training starts.

Loss masking: for instruction data the prompt tokens get label -100, so the loss
covers the response and the end token only (unless `train_on_prompt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from editdecay.core.config import did_you_mean
from editdecay.core.errors import ConfigError, DataError
from editdecay.data.documents import (
    read_records,
    read_text,
    split_documents,
    strict_rows,
)
from editdecay.data.embedded_task import EmbeddedTask
from editdecay.data.prompts import TEMPLATES, InstructionRecord, render_prompt

log = logging.getLogger(__name__)

SOURCES = ("embedded", "chatterbot", "instructions", "text", "hf")   # the prefixes `load_source` reads
HELD_OUT_TASKS = ("embedded", "chatterbot")    # sources with a held-out split scored during fine-tuning (measure/task)
# The names those held-out tasks are recorded under (`task_name`): chatterbot in its multiple-choice format is
# "chatterbot-choice" (data/chatterbot.py, `ChatterbotCorpus.name`).
HELD_OUT_NAMES = ("embedded", "chatterbot", "chatterbot-choice")

IGNORE_INDEX = -100   # label of tokens that do not count in the loss (torch cross_entropy's ignore_index)

@dataclass(frozen=True)
class Source:
    """Validated records of one source, before tokenisation. Exactly one of `records`/`texts` is set."""

    spec: str
    kind: str                                   # embedded | chatterbot | instructions | text | hf
    records: tuple[InstructionRecord, ...] = ()
    texts: tuple[str, ...] = ()
    identity: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.records) or len(self.texts)


def load_source(spec: str, *, task=None) -> Source:
    """Parse a data spec and load its records (the training split where the source has a held-out one).

    `task`: the `EmbeddedTask` behind `embedded`, or the `ChatterbotCorpus` behind `chatterbot` (default: the
    default one). The identity (recorded in results, part of grid stage ids) includes the source's name,
    licence and record counts where it has them.
    """
    kind, _, rest = spec.partition(":")
    if kind == "embedded":
        task = task or EmbeddedTask()
        train, _ = task.records()
        return Source(spec, "embedded", records=train, identity={"spec": spec, **task.identity()})
    if kind == "chatterbot":
        from editdecay.data.chatterbot import ChatterbotCorpus

        if task is None or not isinstance(task, ChatterbotCorpus):
            task = ChatterbotCorpus(root=rest or None)
        elif rest and Path(rest).expanduser().resolve() != task.directory:
            raise ConfigError(f"data {spec!r}: the directory differs from the corpus given as task "
                              f"({task.directory}); give one directory")
        train, _ = task.records()
        return _finish(Source(spec, "chatterbot", records=train, identity={"spec": spec, **task.identity()}))
    if kind == "instructions":
        path = _existing(spec, rest)
        records = _read_instruction_file(path)
        return _finish(Source(spec, "instructions", records=records,
                              identity={"spec": spec, "path": str(path), "sha256": _sha256(path)}))
    if kind == "text":
        path = _existing(spec, rest)
        texts = tuple(split_documents(read_text(path, "text file")))
        return _finish(Source(spec, "text", texts=texts,
                              identity={"spec": spec, "path": str(path), "sha256": _sha256(path)}))
    if kind == "hf":
        name, _, split = rest.partition(":")
        return _finish(_load_hub(spec, name, split or "train"))
    raise ConfigError(f"data {spec!r}: unknown source {kind!r}{did_you_mean(kind, SOURCES)}; use embedded, chatterbot[:DIR], instructions:PATH, "
                      f"text:PATH or hf:NAME[:SPLIT]")


def _finish(src: Source) -> Source:
    if src.n == 0:
        raise DataError(f"data {src.spec!r}: the dataset is empty (0 records); give a file with at least one record")
    return Source(src.spec, src.kind, src.records, src.texts, {**src.identity, "n_records": src.n})


def _existing(spec: str, path: str) -> Path:
    if not path:
        raise ConfigError(f"data {spec!r}: give a file, e.g. {spec.split(':')[0]}:/path/to/file")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data {spec!r}: file {p} does not exist")
    return p


def _sha256(path: Path) -> str:
    from editdecay.core.cache import sha256_file

    return sha256_file(path)


def _read_instruction_file(path: Path) -> tuple[InstructionRecord, ...]:
    """Records of a .json list or .jsonl file (data.documents rules); a line that does not parse is an error."""
    return records_from_rows(strict_rows(read_records(path, "instruction file"), path), str(path))


def records_from_rows(rows: Sequence, where: str) -> tuple[InstructionRecord, ...]:
    """Validate raw rows; every problem is reported with its record index and field (first 5 shown)."""
    out, problems = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"record {i}: expected an object with instruction/input/output, got {type(row).__name__}")
            continue
        bad = [f for f in ("instruction", "output") if not isinstance(row.get(f), str) or not row[f].strip()]
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            bad.append("input")
        if bad:
            problems.append(f"record {i}: field {bad[0]!r} is missing, empty or not a string")
            continue
        out.append(InstructionRecord(row["instruction"], inp, row["output"]))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{where}: {len(problems)} unusable record(s){more}:\n  " + "\n  ".join(problems[:5]))
    return tuple(out)


def _load_hub(spec: str, name: str, split: str) -> Source:
    if not name:
        raise ConfigError(f"data {spec!r}: give a dataset name, e.g. hf:zwhe99/commonsense_170k")
    try:
        import datasets
    except ModuleNotFoundError:
        raise ConfigError(f"data {spec!r}: loading hub datasets needs the `datasets` package: pip install datasets; "
                          f"or download the file and use instructions:PATH") from None
    ds = datasets.load_dataset(name, split=split)
    records = records_from_rows(list(ds), f"{name}[{split}]")
    return Source(spec, "hf", records=records,
                  identity={"spec": spec, "name": name, "split": split,
                            "fingerprint": getattr(ds, "_fingerprint", None)})


# -- tokenisation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One training sequence. `labels[i]` is the target of position i (the model shifts internally:
    logits at i-1 predict token i); IGNORE_INDEX where the token does not count."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class TrainingSet:
    examples: tuple[Example, ...]
    identity: dict              # source identity + tokenisation settings and counts, recorded in results


def min_prompt_tokens(tokenizer, template: str) -> int:
    """Tokens of the shortest possible prompt: the template with empty instruction and no input."""
    return len(tokenizer.encode(render_prompt(InstructionRecord("", "", ""), template), add_special_tokens=True))


def tokenize(source: Source, tokenizer, *, cutoff_len: int, template: str = "alpaca",
             train_on_prompt: bool = False) -> TrainingSet:
    """Turn a source into training examples of at most `cutoff_len` tokens.

    Instruction records: prompt + response + end token, cut at the end when too long; a record whose prompt
    alone fills the cutoff is dropped (and counted). Text: documents joined by the end token and split into
    blocks of `cutoff_len` tokens, every token trained.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"template={template!r} is not valid; use one of {', '.join(TEMPLATES)}")
    eos = tokenizer.eos_token_id
    counts = {"n_dropped_too_long": 0, "n_truncated": 0}
    examples: list[Example] = []
    if source.records:
        need = min_prompt_tokens(tokenizer, template) + 1
        if cutoff_len < need:
            raise ConfigError(f"cutoff_len={cutoff_len} is shorter than the prompt template {template!r} "
                              f"({need - 1} tokens with empty fields) plus one response token; use cutoff_len >= "
                              f"{need}, or template='compact' (shorter)")
        for r in source.records:
            p = tokenizer.encode(render_prompt(r, template), add_special_tokens=True)
            t = tokenizer.encode(r.output, add_special_tokens=False) + ([eos] if eos is not None else [])
            if len(p) >= cutoff_len:
                counts["n_dropped_too_long"] += 1
                continue
            ids = (p + t)[:cutoff_len]
            counts["n_truncated"] += len(p) + len(t) > cutoff_len
            labels = ids if train_on_prompt else [IGNORE_INDEX] * len(p) + ids[len(p):]
            examples.append(Example(tuple(ids), tuple(labels)))
        if counts["n_dropped_too_long"]:
            log.warning("%s: %d of %d records have prompts of >= cutoff_len=%d tokens and were dropped",
                        source.spec, counts["n_dropped_too_long"], len(source.records), cutoff_len)
    else:
        stream: list[int] = []
        for doc in source.texts:
            stream += tokenizer.encode(doc, add_special_tokens=True) + ([eos] if eos is not None else [])
        for start in range(0, len(stream), cutoff_len):
            block = stream[start:start + cutoff_len]
            if len(block) >= 2:      # one token has nothing to predict
                examples.append(Example(tuple(block), tuple(block)))
    if not examples:
        raise DataError(f"data {source.spec!r}: no training examples left after tokenisation with cutoff_len="
                        f"{cutoff_len} ({source.n} records; {counts['n_dropped_too_long']} too long)")
    n_tokens = sum(len(e.input_ids) for e in examples)
    # The model never predicts position 0, so a label there does not count.
    n_loss = sum(sum(1 for l in e.labels[1:] if l != IGNORE_INDEX) for e in examples)
    if n_loss == 0:
        raise DataError(f"data {source.spec!r}: no token carries a loss (every response was cut off); "
                        f"raise cutoff_len={cutoff_len}")
    identity = {**source.identity, "kind": source.kind, "template": template if source.records else None,
                "cutoff_len": cutoff_len, "train_on_prompt": train_on_prompt, "n_examples": len(examples),
                "n_tokens": n_tokens, "n_loss_tokens": n_loss, **counts, "examples_sha256": digest(examples)}
    return TrainingSet(tuple(examples), identity)


def digest(examples: Sequence[Example]) -> str:
    """Short content hash of tokenised examples (for result files)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]
