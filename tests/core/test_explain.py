"""core.config.explain: the one place a validation error becomes text (configs, grid files, result files)."""

from __future__ import annotations

from typing import Literal, Optional

import pytest
from pydantic import Field, ValidationError

from editdecay.core.config import Config, check_choice, explain
from editdecay.core.errors import ConfigError


class Inner(Config):
    config_name = "inner"

    count: int = Field(1, ge=1, description="a count")
    mode: Literal["fast", "slow"] = Field("fast", description="a choice")


class Outer(Config):
    config_name = "outer"

    inner: Inner = Field(default_factory=Inner)
    items: list[Inner] = Field(default_factory=list)
    maybe: Optional[Inner] = None
    name: str = Field(description="required")


def problems(data: dict) -> str:
    with pytest.raises(ValidationError) as e:
        Outer.model_validate(data)
    return explain(e.value, Outer)


def test_unknown_keys_get_the_closest_field_of_their_own_block():
    assert problems({"name": "x", "inner": {"cuont": 2}}) == (
        "inner.cuont: unknown field (did you mean 'count'?); valid fields: count, mode")
    assert problems({"name": "x", "items": [{}, {"mdoe": "fast"}]}).startswith(
        "items[1].mdoe: unknown field (did you mean 'mode'?)")
    assert problems({"name": "x", "maybe": {"mode": "fast", "counts": 1}}).startswith(
        "maybe.counts: unknown field (did you mean 'count'?)")


def test_values_choices_and_missing_fields():
    assert problems({"name": "x", "inner": {"count": 0}}) == (
        "inner.count=0 is not valid: input should be greater than or equal to 1")
    assert problems({"name": "x", "inner": {"mode": "fats"}}) == (
        "inner.mode='fats' is not valid (did you mean 'fast'?); use one of fast, slow")
    # a choice error reads like check_choice's, wherever it comes from
    with pytest.raises(ConfigError) as e:
        check_choice("inner.mode", "fats", ("fast", "slow"))
    assert str(e.value) == "inner.mode='fats' is not valid (did you mean 'fast'?); use one of fast, slow"
    assert problems({}) == "name: required field is missing"


def test_several_problems_one_per_line_and_construction_names_the_record():
    text = problems({"inner": {"count": 0, "mode": "x"}})
    assert text.startswith("3 problems:\n  ") and text.count("\n  ") == 3
    with pytest.raises(ConfigError, match=r"^outer\.inner\.count=0 is not valid"):
        Outer(name="x", inner={"count": 0})
    with pytest.raises(ConfigError, match=r"^inner\.count=-1 is not valid"):
        Inner(count=-1)
