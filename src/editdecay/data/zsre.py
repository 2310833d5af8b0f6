"""zsRE edit data in the public MEND evaluation schema, scored zsRE-style (E6 token accuracy).

A record: subject, src (the question), pred (a QA model's wrong-or-right answer),
rephrase (a paraphrased question), alt (a counterfactual answer), answers (gold
answers, a list), loc / loc_ans (an unrelated NQ question and its gold answer),
cond (ignored).

Which field is the edit target differs between public codebases (docs/METHODS.md E6):

- target="answers" (default; MEMIT / AlphaEdit, and so the study): the edit writes
  `answers[0]`. MEMIT gives these requests no true target at all (a placeholder
  end-of-text token); nothing in E6 zsRE scoring needs one. We set
  target_true = `pred` where it differs from `answers[0]`, so the survival table
  (E7) can report how strongly the model prefers the edit over the old
  prediction, and target_true = None where `pred` equals `answers[0]` (89 of the
  first 301 public records): those records are still edited, as in MEMIT, and
  rejecting them as "target equals the true answer" would silently shrink and
  bias the study's data.
- target="alt" (EasyEdit): the edit writes `alt`, a counterfactual, and
  target_true = `answers[0]`. A record whose `alt` is empty or equals
  `answers[0]` is not a counterfactual and is rejected under field "alt".

The prompt template is `src` with the subject's occurrence replaced by "{}", so the
rewrite prompt is `src` character for character (double spaces included). The
subject is found at word boundaries, tolerating differences in whitespace runs and
case; the request's subject is then spelt as in `src`, which is the text the model
reads. Targets are stripped (several `alt`/`pred` values start with a space;
tokens.py adds the word-boundary space itself). Neighbourhood prompts are `loc`
as given, with `loc_ans` as their answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from editdecay.core.errors import ConfigError
from editdecay.core.request import EditRequest
from editdecay.data.common import (
    EditDataset,
    Rejection,
    _norm,
    finish,
    validate_request,
)
from editdecay.data.documents import read_records
from editdecay.data.source import EDIT, DataSource, DataSpec, EditOptions
from editdecay.data.records import record_problem, text_field

TARGETS = ("answers", "alt")


def locate_subject(src: str, subject: str) -> tuple[int, int] | None:
    """The (start, end) span of `subject` in `src`, or None.

    Tried in order: whole-word match, whole-word ignoring case, then the same
    inside words. Any run of whitespace in the subject matches any run in `src`.
    The first match is used, so a subject named twice keeps its second mention literal.
    """
    words = subject.split()
    if not words:
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    left = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
    right = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
    for pattern in (left + body + right, body):
        for flags in (0, re.IGNORECASE):
            m = re.search(pattern, src, flags)
            if m:
                return m.span()
    return None


def _first_answer(rec: dict, index: int, out: list[Rejection]) -> str | None:
    """answers[0], stripped: the MEMIT/AlphaEdit edit target and the EasyEdit true answer."""
    if "answers" not in rec:
        out.append(Rejection(index, "answers", "missing"))
        return None
    answers = rec["answers"]
    if not isinstance(answers, list):
        out.append(Rejection(index, "answers", f"expected a list of strings, got {type(answers).__name__}: "
                                               f"{answers!r:.60}"))
        return None
    if not answers:
        out.append(Rejection(index, "answers", "empty list; the gold answer is answers[0]"))
        return None
    first = text_field({"a": answers[0]}, "a", "answers[0]", index, out)
    return first.strip() if first is not None else None


def parse_record(index: int, rec, target: str) -> tuple[EditRequest | None, list[Rejection]]:
    """One zsRE record -> (request, []) or (None, its problems): every schema problem,
    or, when the schema is sound, what validate_request finds."""
    bad = record_problem(index, rec)
    if bad is not None:
        return None, [bad]
    out: list[Rejection] = []
    subject = text_field(rec, "subject", "subject", index, out)
    src = text_field(rec, "src", "src", index, out)
    rephrase = text_field(rec, "rephrase", "rephrase", index, out)
    loc = text_field(rec, "loc", "loc", index, out)
    loc_ans = text_field(rec, "loc_ans", "loc_ans", index, out)
    answer = _first_answer(rec, index, out)
    # the field the current mode does not need is read without complaint, only for `extra`
    pred = text_field(rec, "pred", "pred", index, out if target == "answers" else [])
    alt = text_field(rec, "alt", "alt", index, out) if target == "alt" else None
    if out:
        return None, out
    span = locate_subject(src, subject)
    if span is None:
        return None, [Rejection(index, "src", f"subject {subject!r} does not occur in src {src!r}")]
    start, end = span
    if target == "answers":
        target_new, names = answer, {"target_new": "answers[0]", "target_true": "pred"}
        target_true = None if _norm(pred) == _norm(answer) else pred.strip()
    else:
        target_new, names = alt.strip(), {"target_new": "alt", "target_true": "answers[0]"}
        target_true = answer
    extra = (("pred", pred.strip()),) if pred is not None else ()
    if len(rec["answers"]) > 1:
        extra += (("answers", json.dumps(rec["answers"], ensure_ascii=False)),)
    req = EditRequest(
        case_id=f"zsre-{index}", prompt=src[:start] + "{}" + src[end:], subject=src[start:end],
        target_new=target_new, target_true=target_true,
        paraphrase_prompts=(rephrase,), neighborhood_prompts=(loc,), neighborhood_answers=(loc_ans.strip(),),
        metric_style="zsre", source="zsre", extra=extra,
    )
    problems = validate_request(index, req, {"prompt": "src", "subject": "subject", **names})
    return (None, problems) if problems else (req, [])


def load_zsre(path: str | Path, *, target: str = "answers", strict: bool = False) -> EditDataset:
    """Load zsRE records (JSON list or JSON Lines) as zsRE-style edit requests.

    `target` picks the edit target ("answers": answers[0], "alt": alt; see the module
    docstring) and is recorded in the dataset's options. Every record is kept or
    rejected with its 0-based index and field; with `strict`, any rejection raises
    DataError listing all of them.
    """
    if target not in TARGETS:
        raise ConfigError(f"zsre target {target!r} is not valid; use 'answers' (edit to answers[0], as MEMIT and "
                          "AlphaEdit do) or 'alt' (edit to the counterfactual alt, as EasyEdit does)")
    records = read_records(path)
    kept: list[EditRequest] = []
    rejected: list[Rejection] = []
    for i, rec in enumerate(records):
        req, problems = parse_record(i, rec, target)
        if req is None:
            rejected.extend(problems)
        else:
            kept.append(req)
    return finish(f"zsre:{path}", len(records), kept, rejected, strict=strict, options={"zsre_target": target})


class Zsre(DataSource):
    """`zsre:PATH`: zsRE records in the public MEND evaluation schema."""

    prefix = "zsre"
    roles = (EDIT,)
    description = "zsRE question/answer edits in MEND's evaluation schema, scored zsRE-style (token accuracy)"
    argument = "PATH"
    local_path = True

    def label(self, spec: DataSpec) -> str:
        return self.prefix

    def edit_data(self, spec: DataSpec, options: EditOptions) -> EditDataset:
        return load_zsre(self.path(spec), target=options.zsre_target, strict=options.strict)
