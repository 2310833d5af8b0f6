"""The edit request record, shared by every loader, editor and metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MetricStyle = Literal["counterfact", "zsre"]


def fill(template: str, subject: str) -> str:
    """Put the subject into a prompt template. Plain replacement, never str.format:
    real prompts contain other braces and must not be interpreted."""
    return template.replace("{}", subject)


def slot_problem(template: str, subject: str) -> str | None:
    """Why `template` is not a prompt template for `subject` (exactly one `{}` slot), or None.

    Names the real reason: no slot (and whether the subject is written out instead), or several
    slots (the subject would be filled into each, and the edit read at the last one).
    """
    n = template.count("{}")
    if n == 1:
        return None
    if n == 0:
        if subject.strip() and subject in template:
            return (f"the prompt {template!r} writes the subject {subject!r} out instead of a '{{}}' slot; "
                    f"replace the subject with '{{}}'")
        return f"the prompt {template!r} has no '{{}}' slot for the subject {subject!r}"
    return (f"the prompt {template!r} has {n} '{{}}' slots; a template has exactly one, where the subject "
            f"{subject!r} goes")


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model (docs/METHODS.md E2-E3) plus what to measure (E6).

    `prompt` is a template with exactly one `{}` for the subject. Paraphrase and
    neighbourhood prompts are complete prompts. For CounterFact-style metrics the
    neighbourhood answer is the prompt's true object; for zsRE-style metrics it is
    the gold `loc_ans`.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    metric_style: MetricStyle = "counterfact"
    source: str = ""
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def rewrite_prompt(self) -> str:
        return fill(self.prompt, self.subject)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EditRequest":
        kw = dict(d)
        for k in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "generation_prompts"):
            kw[k] = tuple(kw.get(k, ()))
        kw["extra"] = tuple(tuple(x) for x in kw.get("extra", ()))
        return cls(**kw)
