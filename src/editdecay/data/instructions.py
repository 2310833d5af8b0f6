"""Fine-tuning data: instruction records and plain text, loaded, validated and tokenised.

The file and hub sources live here (`instructions:PATH`, `text:PATH`, `hf:NAME[:SPLIT]`); `embedded` and
`chatterbot[:DIR]` live with their tasks (data/embedded_task.py, data/chatterbot.py); data/sources.py lists
them all.

Two stages, so mistakes surface early: `data.load_source` reads and validates records
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from editdecay.core.errors import ConfigError, DataError
from editdecay.data.common import UnusableRecords
from editdecay.data.documents import (
    MAX_DOCUMENT_CHARS,
    read_records,
    read_text,
    split_documents,
    strict_rows,
)
from editdecay.data.prompts import TEMPLATES, InstructionRecord, render_prompt
from editdecay.data.source import FINETUNE, DataSource, DataSpec, Source, split_spec

log = logging.getLogger(__name__)

SHOWN = 5             # unusable records listed in an error (the count says how many there are)
IGNORE_INDEX = -100   # label of tokens that do not count in the loss (torch cross_entropy's ignore_index)

def _existing(spec: DataSpec) -> Path:
    from editdecay.core.files import check_file

    return check_file(Path(spec.argument).expanduser(), f"data {spec.text!r}: file")


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
        long = next((f for f in ("instruction", "input", "output") if len(row.get(f) or "") > MAX_DOCUMENT_CHARS), None)
        if long:
            problems.append(f"record {i}: field {long!r} is {len(row[long]):,} characters long, more than "
                            f"{MAX_DOCUMENT_CHARS:,}")
            continue
        out.append(InstructionRecord(row["instruction"], inp, row["output"]))
    if problems:
        shown = f"; the first {SHOWN}" if len(problems) > SHOWN else ""
        raise UnusableRecords(f"{where}: {len(problems)} of {len(rows)} records are unusable{shown}:\n  "
                        + "\n  ".join(problems[:SHOWN]))
    return tuple(out)


class InstructionFile(DataSource):
    """`instructions:PATH`: Commonsense170K-shaped records {instruction, input, output}, .json (a list) or .jsonl."""

    prefix = "instructions"
    roles = (FINETUNE,)
    description = "instruction records {instruction, input, output} in a .json list or .jsonl file"
    argument = "PATH"
    local_path = True

    def training_data(self, spec: DataSpec, task=None) -> Source:
        path = _existing(spec)
        return Source(spec.text, self.prefix, records=_read_instruction_file(path),
                      identity={"spec": spec.text, "path": str(path), "sha256": _sha256(path)})


class TextFile(DataSource):
    """`text:PATH`: a plain text file; documents are separated by blank lines; every token is trained."""

    prefix = "text"
    roles = (FINETUNE,)
    description = "plain text, documents separated by blank lines, every token trained"
    argument = "PATH"
    local_path = True
    accepts_any_file = True             # any UTF-8 text is a text: loading one says nothing of its format

    def training_data(self, spec: DataSpec, task=None) -> Source:
        path = _existing(spec)
        texts = split_documents(read_text(path, "text file"), f"text file {str(path)!r}")
        return Source(spec.text, self.prefix, texts=tuple(texts),
                      identity={"spec": spec.text, "path": str(path), "sha256": _sha256(path)})


class HubDataset(DataSource):
    """`hf:NAME[:SPLIT]`: instruction records of a `datasets` hub dataset (needs network and `pip install datasets`)."""

    prefix = "hf"
    roles = (FINETUNE,)
    description = "instruction records of a Hugging Face hub dataset (network; the `datasets` package)"
    argument = "NAME[:SPLIT]"
    offline = False

    def label(self, spec: DataSpec) -> str:
        return split_spec(spec.argument)[0].split("/")[-1]

    def training_data(self, spec: DataSpec, task=None) -> Source:
        name, split = split_spec(spec.argument)
        split = split or "train"
        try:
            import datasets
        except ModuleNotFoundError:
            raise ConfigError(f"data {spec.text!r}: loading hub datasets needs the `datasets` package: pip install "
                              f"datasets; or download the file and use instructions:PATH") from None
        ds = datasets.load_dataset(name, split=split)
        records = records_from_rows(list(ds), f"{name}[{split}]")
        return Source(spec.text, self.prefix, records=records,
                      identity={"spec": spec.text, "name": name, "split": split,
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
