"""CounterFact loader on a hand-written fixture in the public schema (3 good records, 6 bad)."""

from __future__ import annotations

import json

import pytest
from support import COUNTERFACT_SMALL
from support.models import tiny_model

from editdecay.core.errors import DataError
from editdecay.data import load_edit_data
from editdecay.data.counterfact import load_counterfact
from editdecay.measure.metrics import evaluate_requests, score_continuations

FIXTURE = COUNTERFACT_SMALL
EXPECTED_REJECTIONS = [
    (2, "requested_rewrite.subject"),
    (2, "neighborhood_prompts"),
    (3, "requested_rewrite.target_new.str"),     # " goalkeeper" vs "Goalkeeper": same answer
    (4, "requested_rewrite.prompt"),             # no "{}"
    (6, "record"),                               # a string, not an object
    (7, "case_id"),                              # duplicate of record 1's case_id 7
    (8, "requested_rewrite.target_true"),        # a bare string instead of {"str": ...}
    (8, "paraphrase_prompts[1]"),                # a number among the prompts
]


@pytest.fixture(scope="module")
def raw() -> list:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ds():
    return load_counterfact(FIXTURE)


def test_good_records_are_mapped(ds, raw):
    assert (ds.n_records, len(ds.requests)) == (9, 3)
    assert [r.case_id for r in ds.requests] == ["0", "7", "5"]     # record 5 has no case_id: its index
    r = ds.requests[0]
    rec = raw[0]
    assert r.prompt == "The mother tongue of {} is" and r.subject == "Danielle Darrieux"
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true, r.relation_id) == ("English", "French", "P103")
    assert r.paraphrase_prompts == tuple(rec["paraphrase_prompts"])
    assert r.neighborhood_prompts == tuple(rec["neighborhood_prompts"])
    assert r.neighborhood_answers == ("French",) * 3          # neighbours keep the true object
    assert r.generation_prompts == tuple(rec["generation_prompts"])
    assert r.metric_style == "counterfact" and r.source == "counterfact"
    assert dict(r.extra) == {"target_new.id": "Q1860", "target_true.id": "Q150", "pararel_idx": "2796"}
    # targets are stripped; optional generation prompts default to none
    assert ds.requests[1].target_new == "Sweden"
    assert ds.requests[1].neighborhood_answers == ("Spain", "Spain")
    last = ds.requests[2]
    assert last.generation_prompts == () and last.paraphrase_prompts == ()


def test_bad_records_are_rejected_by_field(ds):
    assert [(r.index, r.field) for r in ds.rejected] == EXPECTED_REJECTIONS
    kept = {0, 1, 5}
    assert kept | {r.index for r in ds.rejected} == set(range(ds.n_records))
    reasons = {(r.index, r.field): r.reason for r in ds.rejected}
    assert reasons[(2, "requested_rewrite.subject")] == "missing"
    assert "record 1" in reasons[(7, "case_id")]
    assert "equals the true answer" in reasons[(3, "requested_rewrite.target_new.str")]


def test_strict_raises_naming_the_first_rejections():
    with pytest.raises(DataError) as e:
        load_counterfact(FIXTURE, strict=True)
    msg = str(e.value)
    assert str(FIXTURE) in msg and "6 record(s) rejected (8 problems)" in msg   # records, not problems
    first = sorted({i for i, _ in EXPECTED_REJECTIONS})[:5]      # the message lists 5 records' problems
    for i, f in EXPECTED_REJECTIONS:
        assert (f"record {i}: field {f!r}" in msg) == (i in first)


def test_public_entry_points():
    for kind in ("counterfact", "mcf", "multicounterfact"):
        ds = load_edit_data(f"{kind}:{FIXTURE}")
        assert [r.case_id for r in ds.requests] == ["0", "7", "5"]
    with pytest.raises(DataError, match="requested_rewrite.subject"):
        load_edit_data(f"counterfact:{FIXTURE}", strict=True)


def test_jsonl(tmp_path, raw):
    path = tmp_path / "mcf.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in raw) + "\n", encoding="utf-8")
    ds = load_counterfact(path)
    assert ds.requests == load_counterfact(FIXTURE).requests
    assert [(r.index, r.field) for r in ds.rejected] == EXPECTED_REJECTIONS


@pytest.mark.parametrize("mutate, fields", [
    (lambda r: r.pop("requested_rewrite"), "requested_rewrite"),
    (lambda r: r.update(requested_rewrite={}), "requested_rewrite.prompt requested_rewrite.subject "
                                               "requested_rewrite.target_new requested_rewrite.target_true"),
    (lambda r: r["requested_rewrite"].pop("target_new"), "requested_rewrite.target_new"),
    (lambda r: r["requested_rewrite"]["target_true"].update(str=""), "requested_rewrite.target_true.str"),
    (lambda r: r["requested_rewrite"].update(relation_id=103), "requested_rewrite.relation_id"),
    (lambda r: r.pop("paraphrase_prompts"), "paraphrase_prompts"),
    (lambda r: r["neighborhood_prompts"].append(" "), "neighborhood_prompts[3]"),
    (lambda r: r.update(generation_prompts=[None]), "generation_prompts[0]"),
    (lambda r: r.update(case_id=[1]), "case_id"),
    (lambda r: r["requested_rewrite"].update(prompt="{} speaks {}"), "requested_rewrite.prompt"),
])
def test_each_schema_problem_names_its_field(tmp_path, raw, mutate, fields):
    good = json.loads(json.dumps(raw[1]))
    bad = json.loads(json.dumps(raw[0]))
    mutate(bad)
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([good, bad]))
    ds = load_counterfact(path)
    assert [r.case_id for r in ds.requests] == ["7"]
    assert sorted((r.index, r.field) for r in ds.rejected) == [(1, f) for f in sorted(fields.split())]


def test_missing_optional_fields(tmp_path, raw):
    rec = json.loads(json.dumps(raw[0]))
    for k in ("case_id", "pararel_idx", "generation_prompts", "attribute_prompts"):
        rec.pop(k)
    rec["requested_rewrite"].pop("relation_id")
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    r = load_counterfact(path).requests[0]
    assert (r.case_id, r.relation_id, r.generation_prompts) == ("0", None, ())


@pytest.mark.parametrize("content, words", [
    ("not json at all", "not valid JSON"),
    ('{"requested_rewrite": {}}', "expected a JSON list"),
    ("[1, 2, 3]", "no usable records out of 3"),
])
def test_unusable_files_name_the_path(tmp_path, content, words):
    path = tmp_path / "cf.json"
    path.write_text(content)
    with pytest.raises(DataError, match=words) as e:
        load_counterfact(path)
    assert str(path) in str(e.value)


def test_counterfact_requests_score_counterfact_style(ds, tokenizer):
    """The loaded requests drive E6 CounterFact scoring: neighbours compare true vs new."""
    tok = tokenizer
    model = tiny_model("llama", n_layers=2)
    outcomes = evaluate_requests(model, tok, ds.requests, batch_size=4)
    for req, o in zip(ds.requests, outcomes):
        assert o.case_id == req.case_id and o.style == "counterfact"
        assert (o.n_paraphrase, o.n_neighborhood) == (len(req.paraphrase_prompts), len(req.neighborhood_prompts))
        for v in (o.efficacy, o.neighborhood, o.efficacy_acc, o.neighborhood_acc):
            assert 0.0 <= v <= 1.0
        assert (o.paraphrase is None) == (not req.paraphrase_prompts)
        new, true = score_continuations(model, tok, [(req.rewrite_prompt, req.target_new),
                                                     (req.rewrite_prompt, req.target_true)])
        assert o.efficacy == float(new.nll < true.nll)
        assert o.margin == pytest.approx(true.nll - new.nll)
        pairs = [(p, a) for p, a in zip(req.neighborhood_prompts, req.neighborhood_answers)]
        scores = score_continuations(model, tok, pairs + [(p, req.target_new) for p in req.neighborhood_prompts])
        k = len(pairs)
        expected_ns = sum(float(scores[i].nll < scores[k + i].nll) for i in range(k)) / k
        assert o.neighborhood == pytest.approx(expected_ns)
