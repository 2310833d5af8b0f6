"""`worldfacts`: the committed table + selection load into >= 200 valid CounterFact-shaped
requests, deterministically; bad rows are rejected by row and field; the embedded model
still knows what the selection says it knows."""

from __future__ import annotations

import copy
import random

import pytest

from editdecay.core.errors import DataError
from editdecay.core.request import fill
from editdecay.data import load_edit_data
from editdecay.data import worldfacts as wf
from editdecay.measure.metrics import aggregate, evaluate_requests, score_continuations


@pytest.fixture(scope="module")
def ds():
    return wf.load_worldfacts(strict=True)


@pytest.fixture(scope="module")
def selection():
    return wf.read_selection()


def _entries(selection, role):
    return [dict(e, relation=rid) for rid, b in selection["relations"].items() for e in b[role]]


def test_at_least_200_valid_requests(ds):
    assert len(ds.requests) >= 200
    assert ds.rejected == ()
    assert ds.n_records == len(ds.requests)
    assert len({r.case_id for r in ds.requests}) == len(ds.requests)
    assert {r.relation_id for r in ds.requests} == {r.id for r in wf.RELATIONS}
    assert all(r.metric_style == "counterfact" and r.source == "worldfacts" for r in ds.requests)
    assert load_edit_data("worldfacts").requests == ds.requests


def test_two_loads_are_identical(ds):
    again = wf.load_worldfacts()
    assert again.requests == ds.requests
    assert [r.to_dict() for r in again.requests] == [r.to_dict() for r in ds.requests]


def test_requests_match_table_and_relation(ds):
    rows = wf.read_table()["countries"]
    for r in ds.requests:
        rel = wf.RELATION_BY_ID[r.relation_id]
        row = rows[int(dict(r.extra)["table_row"])]
        assert (r.subject, r.target_true) == (row[rel.subject_field], row[rel.object_field])
        assert r.prompt == rel.prompt and r.prompt.count("{}") == 1
        assert r.case_id == f"wf-{r.relation_id}-{wf.slug(r.subject)}"


def test_target_new_is_another_known_object(ds, selection):
    known = {}
    for e in _entries(selection, "edit") + _entries(selection, "neighbor"):
        known.setdefault(e["relation"], set()).add(e["object"])
    for r in ds.requests:
        assert r.target_new != r.target_true
        assert r.target_new in known[r.relation_id]
    # the choice is spread over the known objects, not one fixed rival
    capitals = [r.target_new for r in ds.requests if r.relation_id == "capital"]
    assert len(set(capitals)) > len(capitals) // 3


def test_subject_in_prompts_and_paraphrases_end_before_object(ds):
    for r in ds.requests:
        assert r.subject in r.rewrite_prompt
        assert 2 <= len(r.paraphrase_prompts) <= 3
        assert len(r.generation_prompts) >= 2
        for p in r.paraphrase_prompts + r.generation_prompts:
            assert r.subject in p or r.subject[0].upper() + r.subject[1:] in p
            assert p[0].isupper(), p  # a sentence, also when the subject opens it ("The Netherlands is")
        for p in r.paraphrase_prompts:
            assert p != r.rewrite_prompt
            assert p[-1].isalpha(), p  # ends on a word: the object comes next


def test_neighbourhood_is_other_unedited_subjects(ds, selection):
    edited = {(e["relation"], e["subject"]) for e in _entries(selection, "edit")}
    neighbors = {(e["relation"], e["case_id"]): e for e in _entries(selection, "neighbor")}
    assert not edited & {(rel, e["subject"]) for (rel, _), e in neighbors.items()}
    shared = 0
    for r in ds.requests:
        ids = dict(r.extra)["neighbor_case_ids"].split(",")
        assert 2 <= len(r.neighborhood_prompts) == len(r.neighborhood_answers) == len(ids) <= 3
        for cid, prompt, answer in zip(ids, r.neighborhood_prompts, r.neighborhood_answers):
            n = neighbors[(r.relation_id, cid)]
            assert n["subject"] != r.subject
            assert prompt == fill(r.prompt, n["subject"]) and answer == n["object"]
            assert answer != r.target_new
            shared += answer == r.target_true
    # CounterFact's choice: where neighbours share the true object (continents, currencies), they come first
    assert shared > len(ds.requests) // 3


def test_selection_records_rule_model_and_split(selection):
    assert selection["rule"] == wf.RULE
    assert len(selection["model"]["fingerprint"]) == 16
    for rid, block in selection["relations"].items():
        rel = wf.RELATION_BY_ID[rid]
        assert block["prompt"] == rel.prompt
        assert block["known"] == len(block["edit"]) + len(block["neighbor"]) <= block["greedy"] <= block["askable"]
        assert len(block["neighbor"]) >= wf.MIN_NEIGHBORS
        assert all(e["margin"] >= wf.MIN_MARGIN for e in block["edit"] + block["neighbor"])
        facts = [wf.Fact(rid, e["row"], e["subject"], e["object"]) for e in block["edit"] + block["neighbor"]]
        split = wf.split_known(facts, selection["seed"])  # the committed split is the seeded one
        assert [f.case_id for f in split["edit"]] == [e["case_id"] for e in block["edit"]]


def _row_of(ds, case_id):
    return int(dict(next(r for r in ds.requests if r.case_id == case_id).extra)["table_row"])


@pytest.mark.parametrize("breakage, reason", [
    (lambda row: row.update(capital=""), "non-empty string"),
    (lambda row: row.update(capital=42), "non-empty string"),
    (lambda row: row.update(capital=None), "null"),
    (lambda row: row.pop("capital"), "missing"),
    (lambda row: row.update(capital="Lyon"), "the table says 'Lyon'"),
])
def test_broken_row_is_rejected_with_index_and_field(ds, selection, breakage, reason):
    """France's capital is read by two selected facts: capital (object) and capital_of (subject 'Paris')."""
    table = wf.read_table()
    i = _row_of(ds, "wf-capital-france")
    breakage(table["countries"][i])
    broken = wf.load_worldfacts(table=table)
    readers = [e for role in wf.ROLES for e in _entries(selection, role)
               if e["row"] == i and e["relation"] in ("capital", "capital_of")]
    assert len(readers) == 2
    assert [(r.index, r.field) for r in broken.rejected] == [(i, "capital")] * 2
    assert all(reason in r.reason for r in broken.rejected)
    assert {e["case_id"] for e in readers} == {r.reason.split()[2].rstrip(":") for r in broken.rejected}
    lost = {r.case_id for r in ds.requests} - {r.case_id for r in broken.requests}
    assert lost == {e["case_id"] for e in readers if e in _entries(selection, "edit")}
    assert len(broken.requests) == len(ds.requests) - len(lost) and broken.n_records == ds.n_records
    with pytest.raises(DataError, match=f"record {i}: field 'capital'"):
        wf.load_worldfacts(table=table, strict=True)


def test_broken_subject_rejects_every_fact_of_the_row(ds, selection):
    """Every selected fact that reads the row's `country` (as subject, or as object of
    `capital_of`) is rejected, neighbourhood-only facts included; nothing is dropped silently."""
    table = wf.read_table()
    i = _row_of(ds, "wf-capital-france")
    table["countries"][i]["country"] = " France"
    broken = wf.load_worldfacts(table=table)
    assert {(r.index, r.field) for r in broken.rejected} == {(i, "country")}
    on_row = [e for role in wf.ROLES for e in _entries(selection, role) if e["row"] == i]
    assert len(broken.rejected) == len(on_row) >= 3
    assert {r.case_id for r in ds.requests} - {r.case_id for r in broken.requests} == \
        {e["case_id"] for e in _entries(selection, "edit") if e["row"] == i}


def test_selection_from_other_code_is_an_error(selection):
    for key, value, match in (("rule", "known-v0", "rule"), ("format", "x", "format"), ("seed", "0", "seed")):
        bad = copy.deepcopy(selection)
        bad[key] = value
        with pytest.raises(DataError, match=match):
            wf.load_worldfacts(selection=bad)
    bad = copy.deepcopy(selection)
    bad["relations"]["capital"]["prompt"] = "The capital of {} is"
    with pytest.raises(DataError, match="rerun scripts/select_worldfacts.py"):
        wf.load_worldfacts(selection=bad)


def test_askable_facts_skip_nulls_and_copyable_objects():
    table = wf.read_table()
    capital = wf.RELATION_BY_ID["capital"]
    facts, bad = wf.askable_facts(table, capital)
    assert bad == []
    subjects = {f.subject for f in facts}
    assert "France" in subjects
    assert "Mexico" not in subjects and "Bolivia" not in subjects  # copyable; null
    assert wf.copyable("Tunisia", "Tunis") and wf.copyable("São Tomé and Príncipe", "Sao Tome")
    assert not wf.copyable("France", "Paris")
    assert wf.slug("the Netherlands") == "netherlands" and wf.slug("Washington, D.C.") == "washington-d-c"


@pytest.mark.slow
def test_embedded_model_still_knows_a_sample(embedded, selection):
    """Rule known-v1 re-judged on 30 sampled selected facts (and 10 facts it rejected)."""
    assert embedded.identity.fingerprint == selection["model"]["fingerprint"]
    table = wf.read_table()
    rng = random.Random(0)
    chosen = rng.sample(_entries(selection, "edit") + _entries(selection, "neighbor"), 30)
    known_ids = {e["case_id"] for e in _entries(selection, "edit") + _entries(selection, "neighbor")}
    for rel in wf.RELATIONS:
        facts = [wf.Fact(rel.id, e["row"], e["subject"], e["object"]) for e in chosen if e["relation"] == rel.id]
        unknown = [f for f in wf.askable_facts(table, rel)[0] if f.case_id not in known_ids]
        facts += rng.sample(unknown, 2)
        verdicts = wf.judge(embedded.model, embedded.tokenizer, facts, wf.candidate_objects(table, rel))
        assert [v.known for v in verdicts] == [f.case_id in known_ids for f in facts], rel.id


@pytest.mark.slow
def test_judge_pruning_is_exact(embedded):
    """judge() scores only rivals that could win; a brute-force ranking must agree with it."""
    table = wf.read_table()
    rel = wf.RELATION_BY_ID["capital"]
    facts = [f for f in wf.askable_facts(table, rel)[0]
             if f.subject in ("France", "Japan", "Italy", "Norway", "Chad", "Peru")]
    cands = sorted({f.object for f in facts} | {"Reykjavik", "Kuala Lumpur", "Buenos Aires", "Addis Ababa"})
    verdicts = wf.judge(embedded.model, embedded.tokenizer, facts, cands)
    pairs = [(rel.ask(f.subject), c) for f in facts for c in cands]
    scores = dict(zip(pairs, score_continuations(embedded.model, embedded.tokenizer, pairs)))
    assert sum(v.known for v in verdicts) >= 2
    for f, v in zip(facts, verdicts):
        true = scores[(rel.ask(f.subject), f.object)]
        assert v.greedy == true.all_correct
        rival_nll = min(scores[(rel.ask(f.subject), c)].nll for c in cands if c != f.object)
        assert v.known == (true.all_correct and rival_nll - true.nll >= wf.MIN_MARGIN), f.subject
        if v.greedy:
            assert v.margin <= rival_nll - true.nll + 1e-4


@pytest.mark.slow
def test_before_edit_the_model_prefers_the_truth(embedded, ds):
    """By construction of rule (b): efficacy 0 and neighbourhood 1 before any edit (sample of 12)."""
    reqs = random.Random(1).sample(list(ds.requests), 12)
    agg = aggregate(evaluate_requests(embedded.model, embedded.tokenizer, reqs))
    assert agg["efficacy"] == 0.0 and agg["efficacy_acc"] == 0.0
    assert agg["neighborhood"] == 1.0
    assert agg["margin"] < 0
