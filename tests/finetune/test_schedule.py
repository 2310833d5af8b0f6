"""`eval_every` as a period or a list of steps (finetune/schedule.py), through the grid file and the stage spec."""

from __future__ import annotations

import pytest

from editdecay.core.errors import ConfigError
from editdecay.finetune import schedule
from editdecay.grid.spec import EvaluationSettings


def test_period_measures_first_multiples_and_last():
    assert schedule.steps(4, 10) == [0, 4, 8, 10]
    assert schedule.steps(0, 10) == [0, 10]


def test_list_measures_exactly_those_steps_plus_first_and_last():
    every = schedule.check([2, 4, 8, 16, 32])
    assert every == (2, 4, 8, 16, 32)
    # steps past the end of the run are never reached; the last step is always measured
    assert schedule.steps(every, 20) == [0, 2, 4, 8, 16, 20]
    assert not schedule.due(every, 3, 20)


def test_command_line_text_is_parsed():
    assert schedule.check("0,2,4") == (0, 2, 4)
    assert schedule.check("12") == 12


@pytest.mark.parametrize("bad, words", [
    ([4, 2], "lists step 2 after step 4"),
    ([2, 2], "lists step 2 after step 2"),
    ([], "empty list"),
    ([1, -3], "has step -3"),
    (-1, "not valid"),
    ("2,x", "not valid"),
    (True, "not valid"),
])
def test_bad_schedules_name_the_field_and_value(bad, words):
    with pytest.raises(ConfigError) as e:
        schedule.check(bad)
    assert "eval_every=" in str(e.value) and words in str(e.value)


def test_grid_evaluation_block_accepts_a_list_and_names_the_field_when_wrong():
    assert EvaluationSettings(eval_every=[0, 2, 4]).eval_every == (0, 2, 4)
    assert EvaluationSettings(eval_every=12).eval_every == 12
    with pytest.raises(ConfigError) as e:
        EvaluationSettings(eval_every=[8, 4])
    assert "eval_every" in str(e.value) and "after step 8" in str(e.value)


def test_a_period_keeps_the_stage_id_of_earlier_grids():
    """An integer schedule serialises as before (stage ids hash the spec), a list as a JSON list."""
    from editdecay.grid.specs import FinetuneSpec

    assert FinetuneSpec.model_fields["eval_every"].is_required()
    ev = EvaluationSettings(eval_every=12).to_dict()["eval_every"]
    assert ev == 12 and isinstance(ev, int)
    assert EvaluationSettings(eval_every=[2, 4]).to_dict()["eval_every"] in ([2, 4], (2, 4))


def test_decay_callback_follows_a_list_schedule_and_refuses_a_bad_one():
    from editdecay.finetune.callback import DecayCallback

    cb = DecayCallback(every=[2, 4, 8])
    assert [s for s in range(11) if cb.due(s, 10)] == [0, 2, 4, 8, 10]
    with pytest.raises(ConfigError, match="eval_every=-2"):
        DecayCallback(every=-2)
