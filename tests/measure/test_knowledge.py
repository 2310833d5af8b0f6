"""The knowledge control: control facts never overlap the edited requests (nor their subjects) on real zsRE
records and the worldfacts set, whatever the edit selection; `knows` uses the request's own comparison; the
knowledge flip ratio and the per-cell Fisher test on hand-counted cases."""

from __future__ import annotations

import pytest
from support import ZSRE_SAMPLE

from editdecay.core.errors import ConfigError
from editdecay.data.sources import EditSelection, load_edit_data
from editdecay.measure.knowledge import compare_flips, control_requests, knowledge_flip, knows
from editdecay.measure.metrics import RequestOutcome


@pytest.mark.parametrize("data", [f"zsre:{ZSRE_SAMPLE}", "worldfacts"])
@pytest.mark.parametrize("n, seed", [(10, None), (50, None), (40, 7)])
def test_control_facts_never_overlap_the_edited_requests_or_their_subjects(data, n, seed):
    sel = EditSelection(data=data, n=n, seed=seed)
    edited = sel.load().requests
    control = sel.control(25)
    assert len(control) == 25 and len({r.case_id for r in control}) == 25
    assert not {r.case_id for r in control} & {r.case_id for r in edited}
    assert not {r.subject for r in control} & {r.subject for r in edited}
    assert sel.control(25) == control                               # deterministic
    if seed is None:                                                 # the first free records in file order
        every = load_edit_data(data).requests
        edited_subjects = {r.subject for r in edited}
        free = [r for r in every[n:] if r.subject not in edited_subjects]
        assert control == tuple(free[:25])


def test_too_few_free_records_is_an_error_naming_the_count():
    every = load_edit_data(f"zsre:{ZSRE_SAMPLE}").requests[:12]
    with pytest.raises(ConfigError, match=r"n_control=10: the edit data holds only \d+ usable records"):
        control_requests(every, [r.case_id for r in every[:5]], 10)
    with pytest.raises(ConfigError, match="n_control=0"):
        control_requests(every, [], 0)


def outcome(cid, efficacy, margin=None):
    return RequestOutcome(case_id=cid, style="counterfact" if margin is not None else "zsre", efficacy=efficacy,
                          paraphrase=None, neighborhood=None, efficacy_acc=efficacy, paraphrase_acc=None,
                          neighborhood_acc=None, margin=margin)


def test_knows_prefers_the_true_object_or_produces_the_true_answer():
    assert knows(outcome("a", 0.0, margin=-0.3)) and not knows(outcome("b", 1.0, margin=0.2))
    assert not knows(outcome("c", 0.0, margin=0.0))                 # a tie is not knowledge
    assert knows(outcome("d", 0.5)) and not knows(outcome("e", 0.4))   # zsRE answers: token accuracy


def test_knowledge_flip_ratio_counts_known_facts_that_are_lost():
    before = [outcome("a", 0, -1.0), outcome("b", 0, -0.5), outcome("c", 1, 0.4), outcome("d", 0, -2.0)]
    after = [outcome("d", 0, -1.0), outcome("c", 0, -0.1), outcome("b", 1, 0.3), outcome("a", 1, 0.01)]
    k = knowledge_flip(before, after)
    assert (k.n_known, k.n_flipped, k.n, k.flipped) == (3, 2, 4, ("a", "b")) and k.value == pytest.approx(2 / 3)
    assert knowledge_flip([outcome("c", 1, 0.4)], [outcome("c", 1, 0.4)]).value is None
    with pytest.raises(ValueError, match="'a'"):
        knowledge_flip(before, after[:1])


def test_fisher_test_per_cell():
    r = compare_flips(8, 10, 1, 10)
    assert r["edit_flip_ratio"] == 0.8 and r["knowledge_flip_ratio"] == 0.1 and r["difference"] == pytest.approx(0.7)
    # Hypergeometric tail by hand: 9 flips among 20, 10 edits: P(X >= 8) for X ~ H(20, 9, 10).
    from math import comb
    p = sum(comb(9, x) * comb(11, 10 - x) for x in range(8, 10)) / comb(20, 10)
    assert r["p_greater"] == pytest.approx(p) and r["p_two_sided"] >= r["p_greater"]
    assert compare_flips(1, 10, 8, 10)["p_greater"] > 0.9
    assert compare_flips(3, 5, 0, 0)["p_greater"] is None and compare_flips(3, 5, 0, 0)["knowledge_flip_ratio"] is None


def test_finetune_run_follows_control_facts_and_writes_the_per_request_curve(tmp_path):
    import json

    from support.edits import synthetic_patch
    from support.models import tiny_model, tok

    from editdecay.core.models import wrap
    from editdecay.core.request import EditRequest
    from editdecay.finetune import EmbeddedTask, Recipe, load_source
    from editdecay.finetune.run import EditsUnderTest, Measures, run_finetune
    from editdecay.measure.decay_time import REQUEST_CURVE_FILE, read_request_curve, survival_curve
    from editdecay.measure.knowledge import knows

    control = tuple(EditRequest(case_id=f"k{i}", prompt="{} is located in", subject=s, target_new=new, target_true=t)
                    for i, (s, t, new) in enumerate([("Paris", "France", "Japan"), ("Tokyo", "Japan", "Peru"),
                                                     ("Cairo", "Egypt", "Norway")]))
    task = EmbeddedTask(n_train=16, n_test=4)
    recipe = Recipe(method="lora", layers="all", targets="all-linear", max_steps=4, batch_size=4, lora_r=4,
                    learning_rate=5e-2, template="compact", cutoff_len=64)
    model = tiny_model("llama", scale=4.0)
    patch = synthetic_patch(model)
    r = run_finetune(wrap(model, tok(), name="tiny-llama", source="config"), recipe,
                     load_source("embedded", task=task), tmp_path / "run", save="none",
                     edits=EditsUnderTest(requests=patch.requests, layers=patch.layers, apply=patch.apply,
                                          control=control),
                     measures=Measures(task=task, eval_every=2), progress=False)
    res = json.loads((r.out / "result.json").read_text())
    rows = res["control"]
    assert [x["case_id"] for x in rows] == ["k0", "k1", "k2"] and set(rows[0]["known"]) == {"M0", "M_e", "M_ef"}
    curve = read_request_curve(r.out / REQUEST_CURVE_FILE)
    assert [c.step for c in curve] == [0, 2, 4] and [c.examples_seen for c in curve] == [0, 8, 16]
    assert set(curve[0].requests) == {"0", "1", "2", "3"} and set(curve[-1].control) == {"k0", "k1", "k2"}
    # The result's rows, the curve file and the flip ratios agree.
    for x in rows:
        assert x["known"]["M_e"] == curve[0].control[x["case_id"]]["known"] == knows_of(x["M_e"], knows)
        assert x["known"]["M_ef"] == curve[-1].control[x["case_id"]]["known"]
    kfr = res["decay"]["knowledge_flip_ratio"]
    assert kfr["n_known"] == sum(x["known"]["M_e"] for x in rows) and kfr["n_flipped"] == sum(x["flipped"] for x in rows)
    assert res["decay"]["edits_vs_known"]["n_known"] == kfr["n_known"]
    assert res["decay"]["survival"] == json.loads(json.dumps(survival_curve(curve)))
    assert res["decay"]["survival"]["n_at_risk"] == res["decay"]["edit_flip_ratio"]["n_success_edited"]
    # The edits' own metrics are those of the edits alone (control facts are not averaged in).
    assert res["metrics"]["M_e"]["n"] == 4


def knows_of(outcome: dict, knows) -> bool:
    from editdecay.measure.metrics import RequestOutcome

    return knows(RequestOutcome(**outcome))
