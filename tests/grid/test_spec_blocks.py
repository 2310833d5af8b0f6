"""Every block of a grid file is a Config: a misspelt key in any of them, at any depth, names its path and the
field meant. The blocks are found by walking GridSpec's field types, so a new block is covered without a new test."""

from __future__ import annotations

import typing

import pytest

from editdecay.core.config import Config
from editdecay.core.errors import ConfigError
from editdecay.grid.spec import GridSpec, grid_from_dict

BASE = {"models": ["smollm2-135m"], "editors": ["memit"], "edit_data": ["worldfacts"], "n_edits": [4],
        "recipes": [{"method": "lora"}]}


# A valid element of each list-valued block, to put the misspelt key into.
ELEMENT = {"models": {"name": "smollm2-135m"}, "editors": {"name": "memit"}, "recipes": {"method": "lora"}}


def _record(annotation):
    """The Config class a field holds (directly, as Optional, or in a list), and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, Config):
        return annotation, False
    if typing.get_origin(annotation) is list:
        inner, _ = _record(typing.get_args(annotation)[0])
        return inner, True
    for arg in typing.get_args(annotation):            # Optional[X] / X | None
        inner, listed = _record(arg)
        if inner is not None:
            return inner, listed
    return None, False


def blocks(cls=GridSpec, path=()):
    """(path, class) of every block: ("shared", "chatterbot") -> ChatterbotSettings, ("recipes", 0) -> RecipeEntry."""
    yield path, cls
    for name, field in cls.model_fields.items():
        inner, listed = _record(field.annotation)
        if inner is not None:
            yield from blocks(inner, path + ((name, 0) if listed else (name,)))


def typo(field: str) -> str:
    return field[:-1] if len(field) > 3 else field + "s"


def nest(path, leaf: dict) -> dict:
    """The base grid with `leaf`'s keys written into the block at `path`."""
    data = {**BASE}
    node = data
    keys = [k for k in path if not isinstance(k, int)]
    for i, key in enumerate(keys):
        listed = key in ELEMENT
        block = dict(ELEMENT[key]) if listed else {}
        node[key] = [block] if listed else block
        node = block
    node.update(leaf)
    return data


CASES = [(path, cls, name) for path, cls in blocks() for name in cls.model_fields]


def test_every_block_is_a_config_and_all_are_found():
    found = {cls.__name__ for _, cls in blocks()}
    assert {"GridSpec", "ModelEntry", "EditorEntry", "RecipeEntry", "SharedSettings", "StatisticsSettings",
            "EvaluationSettings", "TaskSettings", "ChatterbotSettings", "ResourceSettings", "Resources",
            "SlurmSettings", "RaySettings"} <= found


@pytest.mark.parametrize("path, cls, name", CASES, ids=[".".join(map(str, p + (n,))) for p, _, n in CASES])
def test_a_typo_in_every_block_suggests_the_field(path, cls, name):
    wrong = typo(name)
    with pytest.raises(ConfigError) as e:
        grid_from_dict(nest(path, {wrong: None}))
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")
    key = f"{where}.{wrong}" if where else wrong
    assert f"{key}: unknown field (did you mean '{name}'?)" in str(e.value)


def test_chatterbot_n_choice():
    with pytest.raises(ConfigError) as e:
        grid_from_dict({**BASE, "shared": {"chatterbot": {"n_choice": 3}}})
    assert str(e.value) == ("grid: shared.chatterbot.n_choice: unknown field (did you mean 'n_choices'?); valid "
                            "fields: n_test, seed, strict, format, n_choices, max_reply_words")


def test_model_entries_are_model_refs():
    from editdecay.core.model_ref import ModelRef

    spec = grid_from_dict({**BASE, "models": [{"name": "x/y", "dtype": "bf16", "allow_pickle": True, "label": "y"}]})
    entry = spec.models[0]
    assert isinstance(entry, ModelRef)
    assert entry.ref() == ModelRef(name="x/y", dtype="bfloat16", allow_pickle=True)


def test_allow_pickle_reaches_the_stages_without_changing_their_ids():
    """A permission, not a property of the weights: listed in the plan's run-time settings, outside the stage ids."""
    from editdecay.grid.plan import build_plan

    plain = build_plan(grid_from_dict(BASE))
    allowed = build_plan(grid_from_dict({**BASE, "models": [{"name": "smollm2-135m", "allow_pickle": True}]}))
    assert plain.runtime["allow_pickle"] == [] and allowed.runtime["allow_pickle"] == ["smollm2-135m"]
    assert list(plain.stages) == list(allowed.stages)
