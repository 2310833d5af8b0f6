"""Decay measures between the edited model M_e and the edited-then-fine-tuned model M_ef (docs/METHODS.md E7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from editdecay.measure.metrics import RequestOutcome

SUCCESS_THRESHOLD = 0.5   # a request counts as a success when its efficacy outcome is >= 0.5


def success(outcome: RequestOutcome) -> bool:
    """E7 success of one request: efficacy >= 0.5 (CounterFact: a 0/1 comparison; zsRE: token accuracy)."""
    return outcome.efficacy >= SUCCESS_THRESHOLD


@dataclass(frozen=True)
class EditFlip:
    """E7 Edit Flip Ratio with its counts. `value` is None when no request succeeded on M_e (undefined)."""

    value: float | None
    n_flipped: int
    n_success_edited: int
    n: int                         # requests compared
    n_recovered: int               # failed on M_e, succeed on M_ef (not part of the EFR)
    flipped: tuple[str, ...]       # case ids of the flipped requests

    def to_dict(self) -> dict:
        """The shape stored in result files under `decay.edit_flip_ratio`."""
        return {"value": self.value, "n_success_edited": self.n_success_edited, "n_flipped": self.n_flipped,
                "n": self.n, "threshold": SUCCESS_THRESHOLD, "flipped": list(self.flipped)}


def edit_flip(rows: Iterable[tuple[str, bool, bool]]) -> EditFlip:
    """E7: EFR = |{i : success_i(M_e) and not success_i(M_ef)}| / |{i : success_i(M_e)}|.

    rows: (case_id, success on M_e, success on M_ef) per request. The one implementation, used by
    fine-tuning results (`edit_flip_ratio`) and by the report (recomputed from per-request rows).
    """
    rows = list(rows)
    succeeded = [cid for cid, before, _ in rows if before]
    flipped = tuple(cid for cid, before, after in rows if before and not after)
    recovered = sum(1 for _, before, after in rows if not before and after)
    return EditFlip(len(flipped) / len(succeeded) if succeeded else None, len(flipped), len(succeeded), len(rows),
                    recovered, flipped)


def edit_flip_ratio(edited: Sequence[RequestOutcome], finetuned: Sequence[RequestOutcome]) -> dict:
    """E7 Edit Flip Ratio of two models' outcomes, matched by case_id, as stored in results (`EditFlip.to_dict`).

    Raises ValueError when a request of `edited` has no fine-tuned outcome.
    """
    after = {o.case_id: o for o in finetuned}
    missing = [o.case_id for o in edited if o.case_id not in after]
    if missing:
        raise ValueError(f"edit_flip_ratio: no fine-tuned outcome for case_id {missing[0]!r}")
    return edit_flip((o.case_id, success(o), success(after[o.case_id])) for o in edited).to_dict()


def relative_decrease_of(edited: float | None, finetuned: float | None) -> float | None:
    """E7: (S(M_e) - S(M_ef)) / S(M_e); None where S(M_e) is 0 or either score is missing."""
    if edited is None or finetuned is None or edited == 0:
        return None
    return (edited - finetuned) / edited


def relative_decrease(edited: dict, finetuned: dict, keys=("efficacy", "paraphrase", "neighborhood")) -> dict:
    """E7 relative decrease of each score in `keys` (see `relative_decrease_of`)."""
    return {k: relative_decrease_of(edited.get(k), finetuned.get(k)) for k in keys}
