"""Decay measures between the edited model M_e and the edited-then-fine-tuned model M_ef (ALGORITHMS.md E7)."""

from __future__ import annotations

from typing import Sequence

from editdecay.measure.metrics import RequestOutcome

SUCCESS_THRESHOLD = 0.5   # a request counts as a success when its efficacy outcome is >= 0.5


def success(outcome: RequestOutcome) -> bool:
    """E7 success of one request: efficacy >= 0.5 (CounterFact: a 0/1 comparison; zsRE: token accuracy)."""
    return outcome.efficacy >= SUCCESS_THRESHOLD


def edit_flip_ratio(edited: Sequence[RequestOutcome], finetuned: Sequence[RequestOutcome]) -> dict:
    """E7: EFR = |{i : success_i(M_e) and not success_i(M_ef)}| / |{i : success_i(M_e)}|.

    Outcomes are matched by case_id. `value` is None when no request succeeded on M_e (the ratio is undefined).
    """
    after = {o.case_id: o for o in finetuned}
    missing = [o.case_id for o in edited if o.case_id not in after]
    if missing:
        raise ValueError(f"edit_flip_ratio: no fine-tuned outcome for case_id {missing[0]!r}")
    succeeded = [o for o in edited if success(o)]
    flipped = [o.case_id for o in succeeded if not success(after[o.case_id])]
    return {"value": len(flipped) / len(succeeded) if succeeded else None, "n_success_edited": len(succeeded),
            "n_flipped": len(flipped), "n": len(edited), "threshold": SUCCESS_THRESHOLD, "flipped": flipped}


def relative_decrease_of(edited: float | None, finetuned: float | None) -> float | None:
    """E7: (S(M_e) - S(M_ef)) / S(M_e); None where S(M_e) is 0 or either score is missing."""
    if edited is None or finetuned is None or edited == 0:
        return None
    return (edited - finetuned) / edited


def relative_decrease(edited: dict, finetuned: dict, keys=("efficacy", "paraphrase", "neighborhood")) -> dict:
    """E7 relative decrease of each score in `keys` (see `relative_decrease_of`)."""
    return {k: relative_decrease_of(edited.get(k), finetuned.get(k)) for k in keys}
