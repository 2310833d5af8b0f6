"""The knowledge control: is edited knowledge forgotten faster than what the model knew before?

Reviewers of the study asked for this comparison (and Wen & Zhang, arXiv 2507.14198, report that edited
knowledge is forgotten faster than pre-trained knowledge under fine-tuning). The control is a set of facts
from the same edit data that were NOT edited (data/control.py `control_requests`: never overlapping the edited
requests),
scored with the same prompts and the same E6 metric on every model; the facts the reference model knows
(`knows`) are followed through fine-tuning exactly as edits are:

    knowledge flip ratio  KFR = |{j known on A, not known on B}| / |{j known on A}|
    edit flip ratio       EFR = |{i edit succeeds on M_e, fails on M_ef}| / |{i succeeds on M_e}|   (E7)

with (A, B) = (M_e, M_ef) beside the EFR of the same fine-tuning, and (M0, M_f) for the unedited model.

"Knows" uses the request's own comparison: with a true target (CounterFact, worldfacts, zsRE with the `alt`
target) the model knows the fact when it prefers the true object, NLL(true) < NLL(new) on the rewrite prompt
(margin < 0); without one (zsRE with the `answers` target, where target_new IS the true answer) when the
answer's token accuracy is >= 0.5 (E6 efficacy).

`compare_flips` tests, per cell, whether edits flip more often than known facts: the two groups are different
items under the same fine-tuning, so the test is Fisher's exact test on the 2x2 table (flipped / kept by group;
scipy.stats.fisher_exact, one-sided "edits flip more" and two-sided), not a paired item test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from editdecay.data.control import control_requests, n_free  # noqa: F401  (the control's selection, re-exported)
from editdecay.measure.decay import SUCCESS_THRESHOLD
from editdecay.measure.metrics import RequestOutcome


def knows(outcome: RequestOutcome) -> bool:
    """The model knows the request's true fact (module docstring)."""
    if outcome.margin is not None:
        return outcome.margin < 0
    return outcome.efficacy >= SUCCESS_THRESHOLD


@dataclass(frozen=True)
class KnowledgeFlip:
    """KFR with its counts; `value` None when the reference model knew none of the control facts."""

    value: float | None
    n_flipped: int
    n_known: int
    n: int
    flipped: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"value": self.value, "n_flipped": self.n_flipped, "n_known": self.n_known, "n": self.n,
                "flipped": list(self.flipped)}


def knowledge_flip(before: Sequence[RequestOutcome], after: Sequence[RequestOutcome]) -> KnowledgeFlip:
    """KFR between a reference model's and a fine-tuned model's outcomes of the control facts (by case id).
    Raises ValueError naming a case id measured on one model only."""
    later = {o.case_id: o for o in after}
    missing = [o.case_id for o in before if o.case_id not in later]
    if missing:
        raise ValueError(f"knowledge_flip: no fine-tuned outcome for control fact {missing[0]!r}")
    known = [o.case_id for o in before if knows(o)]
    flipped = tuple(c for c in known if not knows(later[c]))
    return KnowledgeFlip(len(flipped) / len(known) if known else None, len(flipped), len(known), len(before), flipped)


def compare_flips(edit_flipped: int, edit_n: int, known_flipped: int, known_n: int) -> dict:
    """Fisher's exact test of 'edits flip more often than known facts' on one cell's counts.

    Returns {edit_flip_ratio, knowledge_flip_ratio, difference, odds_ratio, p_greater, p_two_sided, n_edits,
    n_known}; the ratios and p-values are None when either group is empty.
    """
    out = {"edit_flip_ratio": edit_flipped / edit_n if edit_n else None,
           "knowledge_flip_ratio": known_flipped / known_n if known_n else None, "n_edits": edit_n,
           "n_known": known_n, "difference": None, "odds_ratio": None, "p_greater": None, "p_two_sided": None,
           "test": "Fisher's exact test (scipy.stats.fisher_exact), edits vs known facts, flipped vs kept"}
    if not edit_n or not known_n:
        return out
    from scipy.stats import fisher_exact

    table = [[edit_flipped, edit_n - edit_flipped], [known_flipped, known_n - known_flipped]]
    odds, p_greater = fisher_exact(table, alternative="greater")
    _, p_two = fisher_exact(table, alternative="two-sided")
    out.update(difference=out["edit_flip_ratio"] - out["knowledge_flip_ratio"],
               odds_ratio=None if odds != odds or odds == float("inf") else float(odds),
               p_greater=float(p_greater), p_two_sided=float(p_two))
    return out


__all__ = ["KnowledgeFlip", "compare_flips", "control_requests", "knowledge_flip", "knows", "n_free"]
