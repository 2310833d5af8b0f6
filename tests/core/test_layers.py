"""core.layers: one spelling of layer lists for the command line, grid files, recipes, editor configs and patches."""

from __future__ import annotations

import pytest

from editdecay.core.errors import ConfigError
from editdecay.core.layers import layer_choice, parse_layers


@pytest.mark.parametrize("written, layers", [
    ("4-8", (4, 5, 6, 7, 8)), ("4,5,6", (4, 5, 6)), ("10-12, 3", (3, 10, 11, 12)), (" 7 ", (7,)), (7, (7,)),
    ([6, 4, 5], (4, 5, 6)), ((0,), (0,)), ("0-0", (0,)),
])
def test_spellings(written, layers):
    assert parse_layers(written) == layers


@pytest.mark.parametrize("written, reason", [
    ("4-x", "is not a layer list"), ("", "is not a layer list"), ("8-4", "runs backwards: write it low-high, 4-8"),
    ("-2-5", "negative"), ([-1], "negative"), ([], "is empty"), ("4-8,6", "names layer 6 twice"),
    (True, "is not a layer list"), ([1.5], "is not a layer list"), ({"a": 1}, "is not a layer list"),
])
def test_errors_name_the_field_and_the_value(written, reason):
    with pytest.raises(ConfigError) as e:
        parse_layers(written, field="models[0].edit_layers")
    assert str(e.value).startswith(f"models[0].edit_layers={written!r} ") and reason in str(e.value)


def test_a_choice_word_or_layers():
    assert layer_choice("edited", ("all", "edited")) == "edited"
    assert layer_choice("4-5", ("all", "edited")) == (4, 5)
    with pytest.raises(ValueError, match=r"is not valid \(did you mean 'edited'\?\); use one of all, edited"):
        layer_choice("edted", ("all", "edited"))


def test_every_record_with_layers_parses_them_alike():
    """The recipe, the editor configs, the grid's model entries and the planner read one spelling the same way."""
    from editdecay.edit.registry import make_config
    from editdecay.finetune.recipe import preset
    from editdecay.grid.plan import build_plan
    from editdecay.grid.spec import grid_from_dict

    want = parse_layers("2-3,5")
    assert preset("embedded", "lora", layers="2-3,5").layers == want
    assert make_config("memit", layers="2-3,5").layers == want
    grid = {"models": [{"name": "smollm2-135m", "edit_layers": "2-3,5"}], "editors": ["memit"],
            "edit_data": ["worldfacts"], "n_edits": [4], "recipes": [{"method": "lora", "layers": "2-3,5"}]}
    spec = grid_from_dict(grid)
    assert spec.models[0].edit_layers == want and spec.recipes[0].layers == [want]
    plan = build_plan(spec)
    assert {s.spec.editor.layers for s in plan.stages.values() if s.kind == "patch"} == {want}
    with pytest.raises(ConfigError, match=r"layers=\(3, 3\) names layer 3 twice"):
        make_config("memit", layers=(3, 3))
