"""When the decay curve measures (docs/METHODS.md E7, decay curve): `eval_every` as a period or a list of steps.

`eval_every` is either

- an integer k >= 0: measure at step 0, every k optimiser steps and at the last step (0: first and last only);
- a list of optimiser steps, strictly increasing, each >= 0: measure at exactly those steps that the run
  reaches, plus step 0 and the last step. Dense early checkpoints where the change is fast
  (0, 2, 4, 8, 16, 32, ...) and sparse ones later are written this way.

Command lines write the list as comma-separated text ("0,2,4,8,16"). Pure Python: grid files are validated
with this type without importing torch.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BeforeValidator

from editdecay.core.errors import ConfigError

VALID = "an integer >= 0 (every k steps; 0: first and last only) or a strictly increasing list of steps >= 0"


def _parse(value) -> Union[int, tuple[int, ...]]:
    """The validated schedule; ValueError(reason) otherwise (pydantic adds the field's name)."""
    if isinstance(value, str):
        text = value.strip()
        parts = [p.strip() for p in text.strip("[]").split(",")] if text else []
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"is not valid; use {VALID}") from None
        value = numbers[0] if len(numbers) == 1 and "," not in text and "[" not in text else numbers
    if isinstance(value, bool):
        raise ValueError(f"is not valid; use {VALID}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"is not valid; use {VALID}")
        return value
    if isinstance(value, (list, tuple)):
        steps = list(value)
        if not steps:
            raise ValueError(f"is an empty list; use {VALID}")
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"has step {bad[0]!r}; use {VALID}")
        for a, b in zip(steps, steps[1:]):
            if b <= a:
                raise ValueError(f"lists step {b} after step {a}; use {VALID}")
        return tuple(steps)
    raise ValueError(f"is not valid ({type(value).__name__}); use {VALID}")


# The field type of every `eval_every` (grid `shared.evaluation`, stage specs, `editdecay finetune`).
EvalEvery = Annotated[Union[int, tuple[int, ...]], BeforeValidator(_parse)]


def check(every) -> Union[int, tuple[int, ...]]:
    """`every` validated outside a record; ConfigError naming `eval_every` and the value otherwise."""
    try:
        return _parse(every)
    except ValueError as e:
        raise ConfigError(f"eval_every={every!r} {e}") from None


def due(every: Union[int, tuple[int, ...]], step: int, last_step: int) -> bool:
    """Is the curve measured after optimiser step `step` of a run of `last_step` steps (step 0: before training)?"""
    if step == 0 or step == last_step:
        return True
    if isinstance(every, int):
        return every > 0 and step % every == 0
    return step in every


def steps(every: Union[int, tuple[int, ...]], last_step: int) -> list[int]:
    """Every step `due` in a run of `last_step` optimiser steps, in order."""
    return [s for s in range(last_step + 1) if due(every, s, last_step)]


__all__ = ["EvalEvery", "VALID", "check", "due", "steps"]
