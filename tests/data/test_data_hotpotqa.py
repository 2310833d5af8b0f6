"""`hotpotqa:PATH` on real records of HotpotQA's dev set (tests/fixtures/hotpotqa_dev_sample.json): the
question with its supporting paragraphs (whole, in context order) becomes the instruction and input, the
answer the output; unusable records are skipped and named; a fine-tuning run trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editdecay.core.errors import ConfigError, DataError
from editdecay.data import sources
from editdecay.finetune import load_source

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "hotpotqa_dev_sample.json"


def test_real_records_become_question_supporting_paragraphs_and_answer():
    raw = json.loads(SAMPLE.read_text())
    src = load_source(f"hotpotqa:{SAMPLE}")
    assert src.n == len(raw) == 6 and src.identity["n_skipped"] == 0 and src.identity["licence"] == "CC-BY-SA-4.0"
    first = src.records[0]
    assert first.instruction == "Were Scott Derrickson and Ed Wood of the same nationality?" and first.output == "yes"
    # Supporting titles: Scott Derrickson, Ed Wood; in context order Scott Derrickson (2nd) comes before Ed Wood
    # (5th); the distractor 'Ed Wood (film)' (1st) is left out though its title starts the same.
    paras = first.input.split("\n\n")
    assert [p.split(":")[0] for p in paras] == ["Scott Derrickson", "Ed Wood"]
    assert paras[0] == ("Scott Derrickson: Scott Derrickson (born July 16, 1966) is an American director, "
                        "screenwriter and producer. He lives in Los Angeles, California. He is best known for "
                        "directing horror films such as \"Sinister\", \"The Exorcism of Emily Rose\", and \"Deliver "
                        "Us From Evil\", as well as the 2016 Marvel Cinematic Universe installment, \"Doctor "
                        "Strange.\"")
    for rec, row in zip(src.records, raw):
        titles = {t for t, _ in row["supporting_facts"]}
        assert len(rec.input.split("\n\n")) == len(titles) and rec.output == row["answer"]


def test_unusable_records_are_skipped_and_named(tmp_path, caplog):
    raw = json.loads(SAMPLE.read_text())[:2]
    bad_title = {**raw[1], "_id": "x2", "supporting_facts": [["Nowhere", 0]]}
    rows = [raw[0], {**raw[0], "_id": "x1", "answer": ""}, bad_title, {"_id": "x3", "question": "q?", "answer": "a",
                                                                       "context": [["T", "not a list"]],
                                                                       "supporting_facts": [["T", 0]]}, 7]
    f = tmp_path / "h.json"
    f.write_text(json.dumps(rows))
    src = load_source(f"hotpotqa:{f}")
    assert src.n == 1 and src.identity["n_read"] == 5 and src.identity["n_skipped"] == 4
    skipped = src.identity["skipped"]
    assert [(s["index"], s["id"]) for s in skipped] == [(1, "x1"), (2, "x2"), (3, "x3"), (4, None)]
    assert "'answer'" in skipped[0]["reason"] and "'Nowhere'" in skipped[1]["reason"]
    assert "context[0]" in skipped[2]["reason"] and "int" in skipped[3]["reason"]
    assert "4 of 5 HotpotQA records cannot be used" in caplog.text
    f.write_text(json.dumps(rows[1:]))
    with pytest.raises(DataError, match="no usable HotpotQA record"):
        load_source(f"hotpotqa:{f}")
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(f"hotpotqa:{tmp_path}/none.json")


def test_registered_for_fine_tuning_only_with_its_licence():
    src = sources.source_of("hotpotqa:x.json")
    assert src.roles == ("finetune",) and src.licence == "CC-BY-SA-4.0" and src.local_path
