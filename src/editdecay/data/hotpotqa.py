"""`hotpotqa:PATH`: HotpotQA's official JSON as fine-tuning data (instruction records), offline.

HotpotQA (Yang et al., EMNLP 2018; https://hotpotqa.github.io; licence CC BY-SA 4.0) is a list of records
{`_id`, `question`, `answer`, `supporting_facts`: [[title, sentence index], ...], `context`: [[title,
[sentence, ...]], ...], `type`, `level`}; `hotpot_train_v1.1.json` and the dev files share the format (the
test file has no answers and cannot be used). Later versions of the study fine-tune on it as a second data
set beside Commonsense170K.

Records. One instruction record per question:
    instruction = the question,
    input       = the supporting paragraphs: every paragraph of `context` whose title appears in
                  `supporting_facts`, whole, in the order of `context`, each as "Title: sentence sentence ...",
                  separated by a blank line (HotpotQA's sentences carry their leading spaces; joined as given),
    output      = the answer.
Why the supporting paragraphs and not all of `context`: the distractor setting's ten paragraphs are about
1,000-1,500 tokens, far beyond the study's cutoff of 256 tokens, so nearly every record would be dropped or
cut before its answer; without any paragraph (closed book) the model is trained to state multi-hop answers
it was never shown evidence for, i.e. to memorise new facts, which would confound a study of how edited
facts survive. The supporting paragraphs make each record an answerable reading-comprehension instruction
(typically 150-300 tokens), the fine-tuning HotpotQA was built for.

Records that cannot be used are skipped, logged with their index and `_id`, counted and listed (first 20) in
the identity under `skipped`: a record that is not an object, a missing or empty question or answer (the
test file), a `context` or `supporting_facts` that is not in the format above, and a supporting title that
names no paragraph of `context`. A file with no usable record is a DataError.
"""

from __future__ import annotations

import logging
from pathlib import Path

from editdecay.core.errors import ConfigError, DataError
from editdecay.data.documents import read_records, strict_rows
from editdecay.data.prompts import InstructionRecord
from editdecay.data.source import FINETUNE, DataSource, DataSpec, Source

log = logging.getLogger(__name__)

LICENCE = "CC-BY-SA-4.0"
FORMAT_VERSION = 1          # bump when `to_record` builds records differently (it is in the identity)
N_LISTED = 20


def paragraphs(context) -> list[tuple[str, str]]:
    """[(title, paragraph text)] of a record's `context`; ValueError naming what is malformed."""
    if not isinstance(context, list) or not context:
        raise ValueError("field 'context' is not a non-empty list of [title, sentences] pairs")
    out = []
    for j, item in enumerate(context):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], list) or not all(isinstance(s, str) for s in item[1])):
            raise ValueError(f"context[{j}] is not a [title, [sentence, ...]] pair")
        out.append((item[0], "".join(item[1]).strip()))
    return out


def to_record(row) -> InstructionRecord:
    """The instruction record of one HotpotQA record (module docstring); ValueError naming the field."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with question/answer/context/supporting_facts, got "
                         f"{type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"field {key!r} is missing, empty or not a string")
    paras = paragraphs(row.get("context"))
    facts = row.get("supporting_facts")
    if not isinstance(facts, list) or not facts or not all(
            isinstance(f, (list, tuple)) and len(f) == 2 and isinstance(f[0], str) for f in facts):
        raise ValueError("field 'supporting_facts' is not a non-empty list of [title, sentence index] pairs")
    titles = {f[0] for f in facts}
    missing = sorted(titles - {t for t, _ in paras})
    if missing:
        raise ValueError(f"supporting title {missing[0]!r} names no paragraph of 'context'")
    text = "\n\n".join(f"{t}: {p}" for t, p in paras if t in titles)
    return InstructionRecord(row["question"].strip(), text, row["answer"].strip())


def load(path: Path, spec: str) -> Source:
    """Instruction records of a HotpotQA file; unusable records skipped and named (module docstring)."""
    rows = strict_rows(read_records(path, "HotpotQA file"), path)
    records, skipped = [], []
    for i, row in enumerate(rows):
        try:
            records.append(to_record(row))
        except ValueError as e:
            rid = row.get("_id") if isinstance(row, dict) else None
            skipped.append({"index": i, "id": rid, "reason": str(e)})
    if skipped:
        log.warning("%s: %d of %d HotpotQA records cannot be used and are skipped, e.g. record %d (%s): %s",
                    path, len(skipped), len(rows), skipped[0]["index"], skipped[0]["id"], skipped[0]["reason"])
    if not records:
        first = f"; record {skipped[0]['index']}: {skipped[0]['reason']}" if skipped else ""
        raise DataError(f"{path}: no usable HotpotQA record ({len(rows)} read{first}); give HotpotQA's train or "
                        f"dev JSON (question, answer, context, supporting_facts)")
    from editdecay.core.cache import sha256_file

    return Source(spec, HotpotQA.prefix, records=tuple(records),
                  identity={"spec": spec, "path": str(path), "sha256": sha256_file(path), "licence": LICENCE,
                            "format_version": FORMAT_VERSION, "context": "supporting paragraphs",
                            "n_read": len(rows), "n_skipped": len(skipped), "skipped": skipped[:N_LISTED]})


class HotpotQA(DataSource):
    """`hotpotqa:PATH`: HotpotQA's official JSON; question + supporting paragraphs -> answer."""

    prefix = "hotpotqa"
    roles = (FINETUNE,)
    description = ("HotpotQA's official JSON (train or dev): the question with its supporting paragraphs as "
                   "input, the answer as output")
    licence = LICENCE
    argument = "PATH"
    local_path = True

    def training_data(self, spec: DataSpec, task=None) -> Source:
        path = self.path(spec)
        if not path.is_file():
            raise ConfigError(f"data {spec.text!r}: file {path} does not exist (HotpotQA's JSON, e.g. "
                              f"hotpot_train_v1.1.json)")
        return load(path, spec.text)


__all__ = ["HotpotQA", "LICENCE", "load", "paragraphs", "to_record"]
