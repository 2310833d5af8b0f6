"""Context templates for keys and target values (docs/METHODS.md E2, E3).

The reference samples short texts from the model itself and prepends them to the
edit prompt ("<text>. {}"), so the edit generalises beyond one exact context.
Here sampling uses a private, seeded generator: the same model and seed always
give the same prefixes.

The templates come in context TYPES, kept as data (`ContextTemplates.groups`):
type 1 is the bare prompt ("{}",), type 2 the sampled prefixes. E2 averages the
keys within each type, then averages the type means, so with 5 prefixes the bare
prompt weighs 1/2 and each prefixed prompt 1/10 (`ContextTemplates.key_weights`).
E3's NLL is a plain mean over all rendered prompts (`ContextTemplates.flat`).
This follows the original code: memit `memit/compute_ks.py` `compute_ks` (the same
function in rome/ and in AlphaEdit's `AlphaEdit/compute_ks.py`), with the
templates built as `[["{}"], [<5 sampled prefixes>]]` by `get_context_templates`
in memit `memit/memit_main.py` and AlphaEdit `AlphaEdit/AlphaEdit_main.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editdecay.core.devices import input_device
from editdecay.core.errors import ConfigError
from editdecay.core.tokens import encode_prompt, pad_id

SEED_WORDS = ("The", "Therefore", "Because", "I", "You", "It", "When", "In")

KEY_AVERAGE_RULE = ("E2: keys are averaged within each context type, then the type means are averaged "
                    "(memit/compute_ks.py compute_ks); E3's NLL is a plain mean over all templates")


@dataclass(frozen=True)
class ContextTemplates:
    """Context templates grouped by context type (E2).

    `groups[g]` is a tuple of templates, each with exactly one "{}" slot for the edit
    prompt. The first group is normally the bare ("{}",). Raises ConfigError on an
    empty group or a template without exactly one slot.
    """

    groups: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        groups = tuple(tuple(g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        if not groups:
            raise ConfigError("context templates: give at least one context type, e.g. (('{}',),)")
        for i, g in enumerate(groups):
            if not g:
                raise ConfigError(f"context templates: context type {i} is empty; every type needs a template")
            for t in g:
                if not isinstance(t, str) or t.count("{}") != 1:
                    raise ConfigError(f"context templates: type {i} template {t!r} must contain exactly one '{{}}'")

    @classmethod
    def of(cls, *groups) -> "ContextTemplates":
        """`ContextTemplates.of(["{}"], ["A. {}", "B. {}"])`: the groups in order."""
        return cls(tuple(tuple(g) for g in groups))

    @property
    def flat(self) -> tuple[str, ...]:
        """All templates, type after type (the order of rendered prompts everywhere)."""
        return tuple(t for g in self.groups for t in g)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.groups)

    @property
    def key_weights(self) -> tuple[float, ...]:
        """E2 weight of each flat template in the key average: 1 / (types * size of its type); they sum to 1."""
        n = len(self.groups)
        return tuple(1.0 / (n * len(g)) for g in self.groups for _ in g)

    def __len__(self) -> int:
        return sum(self.group_sizes)

    def to_dict(self) -> dict:
        """JSON record for results and patches: the groups, the flat order, the E2 weights and the rule."""
        return {"groups": [list(g) for g in self.groups], "flat": list(self.flat),
                "key_weights": list(self.key_weights), "key_average": KEY_AVERAGE_RULE}


def mean_over_context_types(k: torch.Tensor, templates: ContextTemplates) -> torch.Tensor:
    """E2's two-level mean. k: (n, T, ...) with T = len(templates) in `templates.flat` order.

    Returns (n, ...): the mean over context types of the mean within each type, as the
    original memit `compute_ks` does it (mean per type, then mean of the type means).
    """
    if k.shape[1] != len(templates):
        raise ValueError(f"keys have {k.shape[1]} templates per request, the context templates {len(templates)}")
    means, start = [], 0
    for size in templates.group_sizes:
        means.append(k[:, start:start + size].mean(1))
        start += size
    return torch.stack(means, 1).mean(1)


@torch.no_grad()
def context_templates(model, tokenizer, *, n: int = 5, length: int = 10, seed: int = 0) -> ContextTemplates:
    """Return the types [("{}",), ("<sampled text>. {}", ...)]: the bare prompt and n sampled prefixes.

    `length` is the number of tokens sampled per prefix. n=0 gives only the bare type.
    """
    if n <= 0:
        return ContextTemplates.of(["{}"])
    device = input_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for i in range(n):
        ids = encode_prompt(tokenizer, SEED_WORDS[i % len(SEED_WORDS)])
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float().cpu()
            top = torch.topk(logits, 5)  # top-5 sampling, as in the reference
            choice = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)].item()
            if choice == pad_id(tokenizer) or choice == tokenizer.eos_token_id:
                break
            ids.append(choice)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        out.append(f"{text}. {{}}")
    return ContextTemplates.of(["{}"], out)


__all__ = ["KEY_AVERAGE_RULE", "ContextTemplates", "context_templates", "mean_over_context_types"]
