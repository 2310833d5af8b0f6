"""Which facts make the knowledge control (measure/knowledge.py): records of the edit data that were not edited.

The control must never overlap the edited requests: a control fact is a usable record of the same data whose
case id is not edited and whose subject is not an edited subject (an edit of a subject changes other facts about
it, which is what NS measures, so those would not be pre-trained knowledge under fine-tuning alone). Nothing here
reads a model.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from editdecay.core.errors import ConfigError
from editdecay.core.request import EditRequest


def control_requests(requests: Sequence[EditRequest], edited: Iterable[str], n: int,
                     seed: int | None = None) -> tuple[EditRequest, ...]:
    """`n` requests of `requests` (every usable record of the edit data) whose case id and subject are not among
    the edited ones: the first `n` in file order, or a seeded sample. The subject is excluded as well, because an
    edit of a subject changes other facts about it (what NS measures), which would not be pre-trained knowledge
    under fine-tuning alone.

    Raises ConfigError naming how many are available when fewer than `n` remain.
    """
    if n < 1:
        raise ConfigError(f"n_control={n} is not valid; use a positive number of control facts")
    edited = set(edited)
    subjects = {r.subject for r in requests if r.case_id in edited}
    free = [r for r in requests if r.case_id not in edited and r.subject not in subjects]
    if len(free) < n:
        raise ConfigError(f"n_control={n}: the edit data holds only {len(free)} usable records that were not "
                          f"edited (nor share an edited subject); use n_control <= {len(free)} or fewer edits")
    return tuple(random.Random(seed).sample(free, n) if seed is not None else free[:n])


def n_free(requests: Sequence[EditRequest], edited: Iterable[str]) -> int:
    """How many of `requests` could be control facts (`control_requests`)."""
    edited = set(edited)
    subjects = {r.subject for r in requests if r.case_id in edited}
    return sum(1 for r in requests if r.case_id not in edited and r.subject not in subjects)


__all__ = ["control_requests", "n_free"]
