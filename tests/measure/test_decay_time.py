"""Decay over time on a hand-built per-request curve file: failure checkpoints, censoring (at the last
checkpoint, and earlier for a request that stops being recorded), the Kaplan-Meier curve computed by hand,
margin slopes, and known control facts."""

from __future__ import annotations

import json

import pytest

from editdecay.core.errors import DataError
from editdecay.measure.decay_time import margin_slope, read_request_curve, survival_curve


def s(ok, m):
    return {"success": ok, "margin": m}


# 5 edits, checkpoints at steps 0, 10, 20, 30 (8 examples per step):
#   a: succeeds throughout                       -> censored at 30
#   b: fails at 10 (and stays failed)            -> failed at 10
#   c: fails at 20, recovers at 30               -> failed at 20 (the first failure counts)
#   d: never succeeded                           -> not at risk
#   e: recorded up to 20 only, still succeeding  -> censored at 20
CURVE = [
    {"step": 0, "examples_seen": 0, "requests": {"a": s(1, 3.0), "b": s(1, 1.0), "c": s(1, 2.0), "d": s(0, -1.0),
                                                 "e": s(1, 2.0)},
     "control": {"k1": {"known": True, "margin": -2.0}, "k2": {"known": False, "margin": 0.5}}},
    {"step": 10, "examples_seen": 80, "requests": {"a": s(1, 2.8), "b": s(0, -0.5), "c": s(1, 1.0), "d": s(0, -1.0),
                                                   "e": s(1, 1.9)},
     "control": {"k1": {"known": True, "margin": -1.5}, "k2": {"known": False, "margin": 0.5}}},
    {"step": 20, "examples_seen": 160, "requests": {"a": s(1, 2.6), "b": s(0, -1.0), "c": s(0, -0.2),
                                                    "d": s(0, -1.0), "e": s(1, 1.8)},
     "control": {"k1": {"known": False, "margin": 0.1}, "k2": {"known": False, "margin": 0.5}}},
    {"step": 30, "examples_seen": 240, "requests": {"a": s(1, 2.4), "b": s(0, -1.0), "c": s(1, 0.1),
                                                    "d": s(0, -1.0)},
     "control": {"k1": {"known": False, "margin": 0.2}, "k2": {"known": False, "margin": 0.5}}},
]


@pytest.fixture
def curve_file(tmp_path):
    p = tmp_path / "request_curve.jsonl"
    lines = [json.dumps(c) for c in CURVE]
    p.write_text("\n".join([lines[2], lines[0], lines[3], lines[1]]) + "\n")     # any order: sorted by step
    return p


def test_failure_times_censoring_and_kaplan_meier_by_hand(curve_file):
    curve = read_request_curve(curve_file)
    assert [c.step for c in curve] == [0, 10, 20, 30]
    sc = survival_curve(curve)
    f = sc["fates"]
    assert set(f) == {"a", "b", "c", "e"} and sc["n_at_risk"] == 4 and sc["n_failed"] == 2
    assert (f["a"]["failed"], f["a"]["step"]) == (False, 30)
    assert (f["b"]["failed"], f["b"]["step"], f["b"]["examples_seen"]) == (True, 10, 80)
    assert (f["c"]["failed"], f["c"]["step"]) == (True, 20)
    assert (f["e"]["failed"], f["e"]["step"]) == (False, 20)
    # KM: t=10: 4 at risk, 1 fails -> 3/4; t=20: 3 at risk (a, c, e), c fails -> 3/4 * 2/3 = 1/2 (e censored
    # there, after the failure); t=30: 1 at risk (a), none fails -> 1/2.
    rows = {r["t"]: r for r in sc["by_step"]}
    assert [rows[t]["survival"] for t in (0, 10, 20, 30)] == pytest.approx([1.0, 0.75, 0.5, 0.5])
    assert (rows[20]["at_risk"], rows[20]["failed"], rows[20]["censored"]) == (3, 1, 1)
    assert (rows[30]["at_risk"], rows[30]["censored"]) == (1, 1)
    assert sc["median_step"] == 20 and rows[30]["examples_seen"] == 240
    # Margin slopes per 1,000 examples: a falls 0.2 per 80 examples -> -2.5.
    assert f["a"]["slope"] == pytest.approx(-2.5)
    assert f["b"]["slope"] == pytest.approx(margin_slope([(0, 1.0), (80, -0.5), (160, -1.0), (240, -1.0)]))


def test_known_control_facts_get_the_same_curve(curve_file):
    sc = survival_curve(read_request_curve(curve_file), group="control")
    assert set(sc["fates"]) == {"k1"} and sc["fates"]["k1"]["step"] == 20 and sc["fates"]["k1"]["failed"]
    assert [r["survival"] for r in sc["by_step"]] == [1.0, 1.0, 0.0, 0.0]


def test_margin_slope_by_hand_and_degenerate_cases():
    assert margin_slope([(0, 0.0), (1000, 1.0), (2000, 2.0)]) == pytest.approx(1.0)
    assert margin_slope([(0, 1.0), (100, None)]) is None and margin_slope([(5, 1.0), (5, 2.0)]) is None


def test_a_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(CURVE[0]) + "\n{\"step\": 3}\n")
    with pytest.raises(DataError, match=r"c.jsonl: line 2 is not a checkpoint"):
        read_request_curve(p)
