"""What every edit-data loader shares: rejection records and request validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from editdecay.core.errors import DataError
from editdecay.core.request import EditRequest


@dataclass(frozen=True)
class Rejection:
    index: int        # 0-based position of the record in its file
    field: str        # the offending field, e.g. "alt" or "requested_rewrite.subject"
    reason: str

    def __str__(self) -> str:
        return f"record {self.index}: field {self.field!r}: {self.reason}"


@dataclass(frozen=True)
class EditDataset:
    """Requests that passed validation plus an account of every record that did not."""

    name: str                          # e.g. "worldfacts", "zsre:/path/file.json"
    requests: tuple[EditRequest, ...]
    n_records: int                     # records in the source
    rejected: tuple[Rejection, ...] = ()
    options: dict = field(default_factory=dict)   # loader choices (e.g. zsre_target) recorded in results

    def summary(self) -> str:
        s = f"{self.name}: kept {len(self.requests)} of {self.n_records} records"
        if self.rejected:
            s += f", rejected {len(self.rejected)}:\n" + "\n".join(f"  - {r}" for r in self.rejected)
        return s

    def to_dict(self) -> dict:
        return {"name": self.name, "n_records": self.n_records, "n_kept": len(self.requests),
                "rejected": [vars(r) for r in self.rejected], "options": dict(self.options)}


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def validate_request(index: int, r: EditRequest, field_names: dict[str, str] | None = None) -> list[Rejection]:
    """Checks common to every source. `field_names` maps our field names to the source's
    (e.g. {"subject": "requested_rewrite.subject"}) so messages name what the user sees."""
    f = {"prompt": "prompt", "subject": "subject", "target_new": "target_new", "target_true": "target_true"}
    f.update(field_names or {})
    out = []
    if not r.subject.strip():
        out.append(Rejection(index, f["subject"], "empty subject"))
    if not r.target_new.strip():
        out.append(Rejection(index, f["target_new"], "empty target"))
    if r.prompt.count("{}") != 1:
        if r.subject.strip() and r.subject not in r.prompt:
            out.append(Rejection(index, f["prompt"], f"subject {r.subject!r} is not in the prompt {r.prompt!r}"))
        else:
            out.append(Rejection(index, f["prompt"], f"prompt template must contain exactly one '{{}}': {r.prompt!r}"))
    if r.target_true is not None and r.target_new.strip() and _norm(r.target_new) == _norm(r.target_true):
        out.append(Rejection(index, f["target_new"], f"target {r.target_new!r} equals the true answer"))
    return out


def finish(name: str, n_records: int, kept: list[EditRequest], rejected: list[Rejection], *,
           strict: bool, options: dict | None = None) -> EditDataset:
    """Build the dataset; with `strict`, any rejection is an error naming every record."""
    if strict and rejected:
        lines = "\n".join(f"  - {r}" for r in rejected)
        raise DataError(f"{name}: {len(rejected)} record(s) rejected (--strict):\n{lines}")
    if not kept:
        raise DataError(f"{name}: no usable records out of {n_records}")
    return EditDataset(name, tuple(kept), n_records, tuple(rejected), dict(options or {}))
