"""What every edit-data loader shares: rejection records and request validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from editdecay.core.errors import DataError
from editdecay.core.request import EditRequest, slot_problem


@dataclass(frozen=True)
class Rejection:
    index: int        # 0-based position of the record in its file
    field: str        # the offending field, e.g. "alt" or "requested_rewrite.subject"
    reason: str

    def __str__(self) -> str:
        return f"record {self.index}: field {self.field!r}: {self.reason}"


@dataclass(frozen=True)
class EditDataset:
    """Requests that passed validation plus an account of every record that did not.

    Counts are of records, not of problems: one record can have several rejections (one per bad
    field), and `n_usable + n_rejected == n_records`. `requests` may be a `--limit` sample of the
    usable records (then `len(requests) <= n_usable`).
    """

    name: str                          # e.g. "worldfacts", "zsre:/path/file.json"
    requests: tuple[EditRequest, ...]
    n_records: int                     # records in the source
    rejected: tuple[Rejection, ...] = ()          # every problem found, several per record possible
    options: dict = field(default_factory=dict)   # loader choices (e.g. zsre_target) recorded in results
    n_rejected: int | None = None      # records rejected; None: the distinct indices of `rejected`

    @property
    def rejected_records(self) -> int:
        return self.n_rejected if self.n_rejected is not None else len({r.index for r in self.rejected})

    @property
    def n_usable(self) -> int:
        return self.n_records - self.rejected_records

    def summary(self) -> str:
        s = f"{self.name}: {self.n_usable} of {self.n_records} records usable"
        if len(self.requests) != self.n_usable:
            s += f" ({len(self.requests)} used)"
        if self.rejected:
            s += f", {rejection_lines(self.rejected, self.rejected_records)}"
        return s

    def to_dict(self) -> dict:
        return {"name": self.name, "n_records": self.n_records, "n_usable": self.n_usable,
                "n_rejected": self.rejected_records, "n_kept": len(self.requests),
                "rejected": [vars(r) for r in self.rejected], "options": dict(self.options)}


SHOWN_RECORDS = 5       # rejected records whose problems a message lists (results keep every one)


class UnusableRecords(DataError):
    """A data file none (or, for fine-tuning records, not all) of whose records can be used; the loaders raise it
    so that `data.sources` can add which loader the file looks made for."""


def rejection_lines(rejected, n_records_rejected: int) -> str:
    """'3 record(s) rejected (4 problems):' and one '  - record I: field F: reason' line per problem, for the
    first SHOWN_RECORDS rejected records only (a file of the wrong format has a problem in every field of every
    record: 150,000 lines say less than five records' worth and a count)."""
    problems = f" ({len(rejected)} problems)" if len(rejected) != n_records_rejected else ""
    first = sorted({r.index for r in rejected})[:SHOWN_RECORDS]
    shown = [r for r in rejected if r.index in first]
    head = (f"the problems of the first {len(first)} of them" if len(first) < n_records_rejected else "")
    return (f"{n_records_rejected} record(s) rejected{problems}{'; ' + head if head else ''}:\n"
            + "\n".join(f"  - {r}" for r in shown))


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
    slots = slot_problem(r.prompt, r.subject)
    if slots is not None:
        out.append(Rejection(index, f["prompt"], slots))
    if r.target_true is not None and r.target_new.strip() and _norm(r.target_new) == _norm(r.target_true):
        out.append(Rejection(index, f["target_new"], f"target {r.target_new!r} equals the true answer"))
    return out


def finish(name: str, n_records: int, kept: list[EditRequest], rejected: list[Rejection], *,
           strict: bool, options: dict | None = None) -> EditDataset:
    """Build the dataset; with `strict`, any rejection is an error naming every record.

    Every record is kept or rejected: `n_records - len(kept)` records are rejected (DataError if a loader's
    counts disagree). When no record is usable, the error lists every rejection, with or without `strict`.
    """
    n_rejected = n_records - len(kept)
    if n_rejected < 0 or (n_rejected and not rejected):
        raise DataError(f"{name}: {len(kept)} records kept of {n_records} with {len(rejected)} rejections: "
                        f"the loader's counts do not add up")
    if strict and rejected:
        raise DataError(f"{name}: {rejection_lines(rejected, n_rejected)}\n(--strict: any rejection is an error)")
    if not kept:
        detail = f": {rejection_lines(rejected, n_rejected)}" if rejected else ""
        raise UnusableRecords(f"{name}: no usable records out of {n_records}{detail}")
    return EditDataset(name, tuple(kept), n_records, tuple(rejected), dict(options or {}), n_rejected)
