"""One set of reading rules for text and JSON files, whichever reader is given the file (data/documents.py)."""

from __future__ import annotations

import json

import pytest

from editdecay.core.errors import DataError
from editdecay.data.documents import BadLine, read_records, split_documents
from editdecay.data import load_source
from editdecay.measure.downstream.perplexity import read_corpus

TEXT = "First doc,\n  second line.\n\n\t \nSecond doc.\n\n\n\nThird doc.\n   \n"
DOCS = ["First doc,\n  second line.", "Second doc.", "Third doc."]


def test_a_whitespace_only_line_separates_documents_for_every_reader(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(TEXT)
    assert split_documents(TEXT) == DOCS
    assert list(load_source(f"text:{path}").texts) == DOCS              # fine-tuning text
    assert read_corpus(path) == [d.strip() for d in DOCS]               # perplexity corpus


def test_jsonl_bad_line_is_a_record_for_edit_data_and_an_error_for_instructions(tmp_path):
    path = tmp_path / "r.jsonl"
    good = {"instruction": "Say hi.", "input": "", "output": "hi"}
    path.write_text(json.dumps(good) + "\n\n{not json\n")
    rows = read_records(path)
    assert rows[0] == good and isinstance(rows[1], BadLine) and rows[1].line == 3
    with pytest.raises(DataError, match=r"line 3 is not valid JSON"):
        load_source(f"instructions:{path}")


def test_a_json_list_file_and_a_bom_read_alike(tmp_path):
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text("\ufeff" + json.dumps([rec, rec]))
    b.write_text("\n".join(json.dumps(r) for r in (rec, rec)) + "\n")
    assert load_source(f"instructions:{a}").records == load_source(f"instructions:{b}").records
    with pytest.raises(DataError, match="missing.json. does not exist"):
        read_records(tmp_path / "missing.json")
