"""CounterFact / MultiCounterFact edit data (public schema), scored CounterFact-style (E6).

A record looks like

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"},
                           "relation_id": "P103"},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "generation_prompts": [...],
     "attribute_prompts": [...], "pararel_idx": 2796}

Neighbourhood prompts are about other subjects that share the relation and the
*true* object, so their expected answer is `target_true` (E6 NS compares
NLL(true) against NLL(new) there). Fields not listed above are ignored.

This module also holds the file reader and field checks that the zsRE loader
shares: a JSON list of records, or JSON Lines with one record per line.
"""

from __future__ import annotations

from pathlib import Path

from editdecay.core.request import EditRequest
from editdecay.data.common import EditDataset, Rejection, finish, validate_request
from editdecay.data.documents import read_records
from editdecay.data.records import _kind, _show, record_problem, text_field, text_list
from editdecay.data.source import EDIT, DataSource, DataSpec, EditOptions


def _sub_object(container: dict, key: str, name: str, index: int, out: list[Rejection]) -> dict | None:
    if key not in container:
        out.append(Rejection(index, name, "missing"))
        return None
    v = container[key]
    if not isinstance(v, dict):
        out.append(Rejection(index, name, f"expected a JSON object, got a {_kind(v)}: {_show(v)}"))
        return None
    return v


def _target(rw: dict, key: str, index: int, out: list[Rejection]) -> str | None:
    """`requested_rewrite.<key>.str`, stripped (targets are scored with a leading space, tokens.py)."""
    obj = _sub_object(rw, key, f"requested_rewrite.{key}", index, out)
    if obj is None:
        return None
    s = text_field(obj, "str", f"requested_rewrite.{key}.str", index, out)
    return s.strip() if s is not None else None


FIELD_NAMES = {"prompt": "requested_rewrite.prompt", "subject": "requested_rewrite.subject",
               "target_new": "requested_rewrite.target_new.str", "target_true": "requested_rewrite.target_true.str"}


def _case_id(index: int, rec: dict, out: list[Rejection]) -> str | None:
    if rec.get("case_id") is None:
        return str(index)
    v = rec["case_id"]
    if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip():
        out.append(Rejection(index, "case_id", f"expected an integer or a non-empty string, got {_show(v)}"))
        return None
    return str(v)


def parse_record(index: int, rec, seen: dict[str, int]) -> tuple[EditRequest | None, list[Rejection]]:
    """One CounterFact record -> (request, []) or (None, its problems): every schema problem,
    or, when the schema is sound, what validate_request finds. `seen` maps
    the case ids of requests kept so far to their record index (ids must be unique)."""
    bad = record_problem(index, rec)
    if bad is not None:
        return None, [bad]
    out: list[Rejection] = []
    case_id = _case_id(index, rec, out)
    if case_id is not None and case_id in seen:
        out.append(Rejection(index, "case_id", f"{case_id!r} is already used by record {seen[case_id]}"))
    rw = _sub_object(rec, "requested_rewrite", "requested_rewrite", index, out)
    prompt = subject = target_new = target_true = relation_id = None
    if rw is not None:
        prompt = text_field(rw, "prompt", "requested_rewrite.prompt", index, out)
        subject = text_field(rw, "subject", "requested_rewrite.subject", index, out)
        target_new = _target(rw, "target_new", index, out)
        target_true = _target(rw, "target_true", index, out)
        relation_id = text_field(rw, "relation_id", "requested_rewrite.relation_id", index, out, required=False)
    paraphrases = text_list(rec, "paraphrase_prompts", "paraphrase_prompts", index, out)
    neighbours = text_list(rec, "neighborhood_prompts", "neighborhood_prompts", index, out)
    generation = text_list(rec, "generation_prompts", "generation_prompts", index, out, required=False)
    if out:
        return None, out
    extra = tuple((f"{k}.id", str(rw[k]["id"])) for k in ("target_new", "target_true") if rw[k].get("id") is not None)
    if rec.get("pararel_idx") is not None:
        extra += (("pararel_idx", str(rec["pararel_idx"])),)
    req = EditRequest(
        case_id=case_id, prompt=prompt, subject=subject.strip(), target_new=target_new, target_true=target_true,
        paraphrase_prompts=paraphrases, neighborhood_prompts=neighbours,
        neighborhood_answers=(target_true,) * len(neighbours),   # E6: neighbours keep the true object
        generation_prompts=generation, relation_id=relation_id, metric_style="counterfact",
        source="counterfact", extra=extra,
    )
    problems = validate_request(index, req, FIELD_NAMES)
    return (None, problems) if problems else (req, [])


def load_counterfact(path: str | Path, *, strict: bool = False) -> EditDataset:
    """Load a CounterFact or MultiCounterFact file (JSON list or JSON Lines).

    Every record is either kept or rejected with its 0-based index and field; with
    `strict`, any rejection raises DataError listing all of them.
    """
    records = read_records(path)
    kept: list[EditRequest] = []
    rejected: list[Rejection] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        req, problems = parse_record(i, rec, seen)
        if req is None:
            rejected.extend(problems)
        else:
            seen[req.case_id] = i
            kept.append(req)
    return finish(f"counterfact:{path}", len(records), kept, rejected, strict=strict)


class CounterFact(DataSource):
    """`counterfact:PATH` (also `mcf:`, `multicounterfact:`): a CounterFact or MultiCounterFact file."""

    prefix = "counterfact"
    aliases = ("mcf", "multicounterfact")
    roles = (EDIT,)
    description = "CounterFact / MultiCounterFact records (ROME's public schema), scored CounterFact-style"
    argument = "PATH"
    local_path = True

    def label(self, spec: DataSpec) -> str:
        return self.prefix

    def edit_data(self, spec: DataSpec, options: EditOptions) -> EditDataset:
        return load_counterfact(self.path(spec), strict=options.strict)
