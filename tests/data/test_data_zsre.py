"""zsRE loader on the real public sample (tests/fixtures/zsre_sample.json, 301 records) and on
hand-made broken records: every record kept or rejected by index and field, both target conventions."""

from __future__ import annotations

import copy
import json

import pytest
from support import ZSRE_SAMPLE
from support.models import tiny_model

from editdecay.core.errors import ConfigError, DataError
from editdecay.data import load_edit_data
from editdecay.data.zsre import load_zsre, locate_subject
from editdecay.measure.metrics import evaluate_requests, score_continuations

SAMPLE = ZSRE_SAMPLE
N = 301
EMPTY_ALT = (54, 103)                 # documented in tests/fixtures/README.md
ALT_EQUALS_ANSWER = (73, 164, 217)    # alt == answers[0]: not a counterfactual


@pytest.fixture(scope="module")
def raw() -> list[dict]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def answers_ds():
    return load_zsre(SAMPLE)


@pytest.fixture(scope="module")
def alt_ds():
    return load_zsre(SAMPLE, target="alt")


def _index(req) -> int:
    return int(req.case_id.removeprefix("zsre-"))


def _by_index(ds) -> dict:
    return {_index(r): r for r in ds.requests}


def _accounted(ds) -> None:
    """Nothing silently dropped: kept and rejected indices partition the file."""
    kept = {_index(r) for r in ds.requests}
    rejected = {r.index for r in ds.rejected}
    assert not kept & rejected
    assert kept | rejected == set(range(ds.n_records))


def test_answers_mode_keeps_all_301(answers_ds, raw):
    ds = answers_ds
    assert (ds.n_records, len(ds.requests), len(ds.rejected)) == (N, N, 0)
    assert ds.options == {"zsre_target": "answers"}
    assert ds.name == f"zsre:{SAMPLE}"
    _accounted(ds)
    for req in ds.requests:
        rec = raw[_index(req)]
        assert req.metric_style == "zsre" and req.source == "zsre"
        assert req.prompt.count("{}") == 1
        assert req.rewrite_prompt == rec["src"]          # prompt kept character for character
        assert req.target_new == rec["answers"][0].strip()
        assert req.paraphrase_prompts == (rec["rephrase"],)
        assert req.neighborhood_prompts == (rec["loc"],)
        assert req.neighborhood_answers == (rec["loc_ans"],)


def test_answers_mode_true_target_is_pred_unless_pred_is_the_answer(answers_ds, raw):
    reqs = _by_index(answers_ds)
    same = [i for i, r in enumerate(raw) if r["pred"].strip() == r["answers"][0].strip()]
    assert len(same) == 89        # in MEMIT's convention these are edited too, so they are kept
    for i, rec in enumerate(raw):
        expected = None if i in same else rec["pred"].strip()
        assert reqs[i].target_true == expected, i
        assert dict(reqs[i].extra)["pred"] == rec["pred"].strip()


def test_alt_mode_rejects_empty_alt_and_non_counterfactual_alt(alt_ds, raw):
    ds = alt_ds
    assert (ds.n_records, len(ds.requests), len(ds.rejected)) == (N, N - 5, 5)
    assert ds.options == {"zsre_target": "alt"}
    _accounted(ds)
    by_index = {r.index: r for r in ds.rejected}
    assert sorted(by_index) == sorted(EMPTY_ALT + ALT_EQUALS_ANSWER)
    assert all(r.field == "alt" for r in ds.rejected)
    assert all("empty" in by_index[i].reason for i in EMPTY_ALT)
    assert all("equals the true answer" in by_index[i].reason for i in ALT_EQUALS_ANSWER)
    for req in ds.requests:
        rec = raw[_index(req)]
        assert req.target_new == rec["alt"].strip()
        assert req.target_true == rec["answers"][0].strip()
        assert req.rewrite_prompt == rec["src"]


def test_empty_alt_records_are_fine_in_answers_mode(answers_ds, raw):
    reqs = _by_index(answers_ds)
    for i in EMPTY_ALT:
        assert raw[i]["alt"] == ""
        assert reqs[i].target_new == raw[i]["answers"][0]


def test_strict_alt_mode_names_every_rejected_record():
    with pytest.raises(DataError) as e:
        load_zsre(SAMPLE, target="alt", strict=True)
    msg = str(e.value)
    for i in EMPTY_ALT + ALT_EQUALS_ANSWER:
        assert f"record {i}: field 'alt'" in msg
    assert "5 record(s) rejected" in msg
    assert len(load_zsre(SAMPLE, strict=True).requests) == N   # answers mode has nothing to reject


def test_leading_space_targets_are_stripped(answers_ds, alt_ds, raw):
    alt = _by_index(alt_ds)
    spaced_alt = [i for i, r in enumerate(raw) if r["alt"] != r["alt"].strip()]
    assert len(spaced_alt) == 9 and 19 in spaced_alt
    for i in spaced_alt:
        assert alt[i].target_new == raw[i]["alt"].strip() != raw[i]["alt"]
    assert alt[19].target_new == "Clairmont-Mayer"
    spaced_pred = [i for i, r in enumerate(raw) if r["pred"] != r["pred"].strip()]
    assert spaced_pred == [48]
    assert _by_index(answers_ds)[48].target_true == raw[48]["pred"].strip()


def test_multi_answer_records_use_the_first_answer(answers_ds, alt_ds, raw):
    multi = [i for i, r in enumerate(raw) if len(r["answers"]) > 1]
    assert multi == [85, 86, 87, 110, 167, 213, 215]
    ans, alt = _by_index(answers_ds), _by_index(alt_ds)
    assert ans[85].target_new == "Roanoke River" and ans[110].target_new == "Kansas City Chiefs"
    for i in multi:
        assert ans[i].target_new == raw[i]["answers"][0]
        assert alt[i].target_true == raw[i]["answers"][0]
        assert json.loads(dict(ans[i].extra)["answers"]) == raw[i]["answers"]


def test_double_space_questions_keep_their_spacing(answers_ds, raw):
    reqs = _by_index(answers_ds)
    for i in (122, 200, 217):
        assert "  " in raw[i]["src"]
        assert "  " in reqs[i].prompt and reqs[i].rewrite_prompt == raw[i]["src"]
        assert reqs[i].subject == raw[i]["subject"]
    assert reqs[122].prompt == "What kind of  occupation does {} have?"


def test_accented_subjects(answers_ds, raw):
    reqs = _by_index(answers_ds)
    assert reqs[103].subject == "Margit Nünke" and reqs[103].prompt == "What gender is {} of?"
    assert reqs[38].prompt == "What country is {} from?"


@pytest.mark.parametrize("src, subject, start, expected", [
    ("Who is  Julio  Anguita's father?", "Julio Anguita", 8, "Julio  Anguita"),   # whitespace runs differ
    ("Where was the beatles formed?", "The Beatles", 10, "the beatles"),          # case differs
    ("Whom did Alicia Ali marry?", "Ali", 16, "Ali"),                             # whole word, not in "Alicia"
    ("Which studio made La gare inondée (The Flooded Station)?",
     "La gare inondée (The Flooded Station)", 18, "La gare inondée (The Flooded Station)"),
    ("What did Watts Humphrey study?", "Watts Humphreys", None, None),
])
def test_locate_subject(src, subject, start, expected):
    span = locate_subject(src, subject)
    if expected is None:
        assert span is None
    else:
        assert span == (start, start + len(expected)) and src[span[0]:span[1]] == expected


def test_subject_spelt_as_in_src(tmp_path, raw):
    rec = dict(raw[122], src="What kind of occupation does Julio  Anguita have?")
    path = tmp_path / "z.json"
    path.write_text(json.dumps([rec]))
    req = load_zsre(path).requests[0]
    assert req.subject == "Julio  Anguita" and req.rewrite_prompt == rec["src"]


def _broken_records(raw) -> list:
    good = raw[0]
    recs = [copy.deepcopy(good) for _ in range(11)]
    recs[1] = ["not", "a", "record"]
    recs[2]["answers"] = "Illinois Institute of Technology"
    recs[3]["answers"] = []
    recs[4]["answers"] = [7]
    del recs[5]["loc"]
    recs[6]["subject"] = "Somebody Else"
    recs[7]["subject"] = 12
    recs[8]["src"] = "What university did {} Watts Humphrey attend?"
    recs[9]["rephrase"] = "   "
    del recs[10]["pred"]
    return recs


EXPECTED_BROKEN = [(1, "record"), (2, "answers"), (3, "answers"), (4, "answers[0]"), (5, "loc"),
                   (6, "src"), (7, "subject"), (8, "src"), (9, "rephrase"), (10, "pred")]


def test_broken_records_are_rejected_by_field(tmp_path, raw):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(_broken_records(raw)))
    ds = load_zsre(path)
    assert [r.case_id for r in ds.requests] == ["zsre-0"]
    assert [(r.index, r.field) for r in ds.rejected] == EXPECTED_BROKEN
    _accounted(ds)
    with pytest.raises(DataError) as e:
        load_zsre(path, strict=True)
    first = sorted({i for i, _ in EXPECTED_BROKEN})[:5]          # the message lists 5 records' problems
    for i, f in EXPECTED_BROKEN:
        assert (f"record {i}: field {f!r}" in str(e.value)) == (i in first)
    assert "the problems of the first 5 of them" in str(e.value)
    # `pred` is only needed when it is the true target; alt mode keeps record 10
    alt = load_zsre(path, target="alt")
    assert [r.case_id for r in alt.requests] == ["zsre-0", "zsre-10"]


def test_jsonl_gives_the_same_requests(tmp_path, raw):
    path = tmp_path / "z.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in raw[50:60]]
    lines.insert(3, "{broken json")
    path.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n", encoding="utf-8")
    ds = load_zsre(path, target="alt")
    assert ds.n_records == 11
    assert [(r.index, r.field) for r in ds.rejected] == [(3, "record"), (5, "alt")]   # raw[54]: empty alt
    assert "line 4" in ds.rejected[0].reason
    from_json = load_zsre(SAMPLE, target="alt").requests
    expected = [r for r in from_json if 50 <= _index(r) < 60]
    got = ds.requests
    assert [(r.prompt, r.target_new, r.target_true) for r in got] == [
        (r.prompt, r.target_new, r.target_true) for r in expected]
    # without the .jsonl suffix, JSON Lines is recognised by content
    other = tmp_path / "z.txt"
    other.write_text("\n".join(json.dumps(r) for r in raw[:3]))
    assert len(load_zsre(other).requests) == 3


@pytest.mark.parametrize("content, words", [
    ("subject,src\nA,B\n", "not valid JSON"),
    ('{"subject": "x"}', "expected a JSON list"),
    ("[]", "no usable records out of 0"),
])
def test_unusable_files_name_the_path(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=words) as e:
        load_zsre(path)
    assert str(path) in str(e.value)


def test_missing_file_and_bad_target(tmp_path):
    with pytest.raises(DataError, match="nope.json' does not exist") as e:
        load_zsre(tmp_path / "nope.json")
    assert "nope.json" in str(e.value)
    with pytest.raises(ConfigError, match="'answer'.*'answers'.*'alt'"):
        load_zsre(SAMPLE, target="answer")


def test_public_entry_point_and_seeded_subsets():
    ds = load_edit_data(f"zsre:{SAMPLE}", zsre_target="alt")
    assert len(ds.requests) == N - 5 and ds.options["zsre_target"] == "alt"
    assert sorted(r.index for r in ds.rejected) == [54, 73, 103, 164, 217]
    with pytest.raises(DataError, match="record 54"):
        load_edit_data(f"zsre:{SAMPLE}", zsre_target="alt", strict=True)

    first = load_edit_data(f"zsre:{SAMPLE}", limit=10)
    assert [r.case_id for r in first.requests] == [f"zsre-{i}" for i in range(10)]
    a = load_edit_data(f"zsre:{SAMPLE}", limit=20, seed=3)
    b = load_edit_data(f"zsre:{SAMPLE}", limit=20, seed=3)
    c = load_edit_data(f"zsre:{SAMPLE}", limit=20, seed=4)
    ids = [r.case_id for r in a.requests]
    assert ids == [r.case_id for r in b.requests]
    assert ids != [r.case_id for r in c.requests]
    assert len(set(ids)) == 20 and ids != [f"zsre-{i}" for i in range(20)]
    assert a.options == {"zsre_target": "answers", "limit": 20, "seed": 3}
    assert a.n_records == N


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    """A 2-layer random Llama with the embedded model's real tokenizer (no weights loaded)."""
    return tiny_model("llama", n_layers=2), tokenizer


def test_zsre_requests_score_zsre_style(tiny_lm, answers_ds, alt_ds):
    model, tok = tiny_lm
    ans = _by_index(answers_ds)
    reqs = [ans[0], ans[48], ans[85], ans[103], ans[122], _by_index(alt_ds)[19]]
    assert reqs[4].target_true is None and reqs[0].target_true is not None
    outcomes = evaluate_requests(model, tok, reqs, batch_size=4)
    for req, o in zip(reqs, outcomes):
        assert o.case_id == req.case_id and o.style == "zsre"
        for v in (o.efficacy, o.paraphrase, o.neighborhood, o.efficacy_acc, o.paraphrase_acc, o.neighborhood_acc):
            assert 0.0 <= v <= 1.0
        assert (o.n_paraphrase, o.n_neighborhood) == (1, 1)
        assert (o.margin is None) == (req.target_true is None)
        # E6 zsRE: ES is the token accuracy of the edit target after src, NS of loc_ans after loc
        es, ns = score_continuations(model, tok, [(req.rewrite_prompt, req.target_new),
                                                  (req.neighborhood_prompts[0], req.neighborhood_answers[0])])
        assert o.efficacy == pytest.approx(es.token_accuracy)
        assert o.neighborhood == pytest.approx(ns.token_accuracy)
