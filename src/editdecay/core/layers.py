"""Layer lists as users write them, parsed in one place (torch-free: the grid planner uses it).

One spelling rule for the command line, grid files, recipes, editor configs and patch files:
``"4-8"``, ``"4,5,6"``, ``"4-6,9"``, ``[4, 5, 6]`` or a single ``7``; the result is a sorted
tuple of distinct layer indices >= 0. A layer named twice ("4-8,6") is an error, not merged
silently: it is almost always a typo in a range.

`Layers` and `LayerChoice` are the pydantic field types built on it, so a record that has a
layer field needs no validator of its own and its errors read like every other field's
(core.config.explain): ``recipe.layers='4-x' is not a layer list: ...``.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Union

from pydantic import BeforeValidator

from editdecay.core.config import choice_reason
from editdecay.core.errors import ConfigError

LAYER_HINT = "give layer indices >= 0 or ranges, e.g. [4, 5, 6], '4-8' or '4-6,9'"


def _indices(value: Any) -> list[int]:
    """The layer indices `value` names, in the order written; ValueError(reason) when it names none."""
    if isinstance(value, bool):
        raise ValueError(f"is not a layer list: {LAYER_HINT}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.split(","):
            part = part.strip()
            a, dash, b = part[1:].partition("-") if part else ("", "", "")
            try:
                if dash:
                    lo, hi = int(part[0] + a), int(b)
                else:
                    out.append(int(part))
                    continue
            except ValueError:
                raise ValueError(f"is not a layer list: {LAYER_HINT}") from None
            if hi < lo:
                raise ValueError(f"has the range {part!r}, which runs backwards: write it low-high, {hi}-{lo}")
            out.extend(range(lo, hi + 1))
        return out
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return list(value)
    raise ValueError(f"is not a layer list: {LAYER_HINT}")


def layers_of(value: Any) -> tuple[int, ...]:
    """Text, an integer or a sequence of integers -> sorted distinct layer indices.

    Raises ValueError whose message is the reason only ("is not a layer list: ..."), for pydantic
    validators (the error formatter adds the field and the value); `parse_layers` names them itself."""
    out = _indices(value)
    if not out:
        raise ValueError(f"is empty: {LAYER_HINT}")
    if any(i < 0 for i in out):
        raise ValueError(f"has a negative index: {LAYER_HINT}")
    twice = sorted({i for i in out if out.count(i) > 1})
    if twice:
        raise ValueError(f"names layer {twice[0]} twice")
    return tuple(sorted(out))


def layer_choice(value: Any, choices: Iterable[str]) -> Union[str, tuple[int, ...]]:
    """One of `choices` (e.g. all | edited | non-edited), or explicit layers (`layers_of`).

    A word that is not a choice gets the choices and a suggestion; ValueError(reason) as `layers_of`."""
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return value
    if isinstance(value, str) and not value.strip()[:1].isdigit():
        raise ValueError(choice_reason(value, choices, extra="or layer indices such as 4-8"))
    return layers_of(value)


def parse_layers(value: Any, *, field: str = "layers") -> tuple[int, ...]:
    """`layers_of` for callers outside a pydantic record: ConfigError naming `field`, the value and the rule."""
    try:
        return layers_of(value)
    except ValueError as e:
        raise ConfigError(f"{field}={value!r} {e}") from None


# Field types: a record declares `layers: Layers` and gets this parser and its error wording.
Layers = Annotated[tuple[int, ...], BeforeValidator(layers_of)]

__all__ = ["LAYER_HINT", "Layers", "layer_choice", "layers_of", "parse_layers"]
