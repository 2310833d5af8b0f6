"""Fine-tuning data: loading, validation, prompt masking, cutoff checks, the embedded task and its scoring."""

from __future__ import annotations

import json

import pytest
from support.models import Oracle
from support.models import tok as load_tok

from editdecay.core.errors import ConfigError, DataError
from editdecay.data import load_source
from editdecay.data.embedded_task import FAMILIES, EmbeddedTask
from editdecay.data.instructions import (
    IGNORE_INDEX,
    InstructionRecord,
    min_prompt_tokens,
    render_prompt,
    tokenize,
)
from editdecay.measure.task import exact_match

RECORDS = [
    {"instruction": "Please answer the following question.", "input": "Is the sky blue?",
     "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Pick the right option: {a} or {b}?", "input": "", "output": "option1"},
]


def write_json(tmp_path, rows, name="data.json"):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        p.write_text(json.dumps(rows))
    return p


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_instruction_files_load_in_the_commonsense_shape(tmp_path, name):
    src = load_source(f"instructions:{write_json(tmp_path, RECORDS, name)}")
    assert src.kind == "instructions" and src.n == 2
    assert src.records[1] == InstructionRecord("Pick the right option: {a} or {b}?", "", "option1")
    assert len(src.identity["sha256"]) == 64 and src.identity["n_records"] == 2


def test_braces_in_instructions_are_kept_verbatim():
    text = render_prompt(InstructionRecord("Fill {x} in {}", "", "y"), "compact")
    assert "Fill {x} in {}" in text and "### Input" not in text


def test_empty_dataset_fails_before_any_model(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_source(f"instructions:{write_json(tmp_path, [])}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="empty"):
        load_source(f"text:{empty}")


def test_bad_records_are_reported_with_index_and_field(tmp_path):
    rows = RECORDS + [{"instruction": "x", "input": "", "output": ""}, {"instruction": 3, "output": "y"}]
    with pytest.raises(DataError, match=r"(?s)2 of 4 records are unusable.*record 2: field 'output'.*record 3: field "
                                        r"'instruction'"):
        load_source(f"instructions:{write_json(tmp_path, rows)}")


def test_unknown_source_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown source 'csv'"):
        load_source("csv:x")
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(f"instructions:{tmp_path / 'nope.json'}")


def test_prompt_tokens_are_masked_and_the_response_and_end_token_are_trained(tmp_path):
    tok = load_tok()
    src = load_source(f"instructions:{write_json(tmp_path, RECORDS)}")
    ts = tokenize(src, tok, cutoff_len=256, template="alpaca")
    for rec, ex in zip(src.records, ts.examples):
        prompt = tok.encode(render_prompt(rec, "alpaca"), add_special_tokens=True)
        response = tok.encode(rec.output, add_special_tokens=False) + [tok.eos_token_id]
        assert list(ex.input_ids) == prompt + response
        assert list(ex.labels) == [IGNORE_INDEX] * len(prompt) + response
    assert ts.identity["n_loss_tokens"] == sum(len(tok.encode(r["output"], add_special_tokens=False)) + 1
                                               for r in RECORDS)
    everything = tokenize(src, tok, cutoff_len=256, template="alpaca", train_on_prompt=True)
    assert all(e.labels == e.input_ids for e in everything.examples)


def test_cutoff_shorter_than_the_template_is_a_config_error(tmp_path):
    tok = load_tok()
    src = load_source(f"instructions:{write_json(tmp_path, RECORDS)}")
    shortest = min_prompt_tokens(tok, "alpaca")
    assert shortest > 20
    with pytest.raises(ConfigError, match=f"cutoff_len={shortest} is shorter than the prompt template 'alpaca'"):
        tokenize(src, tok, cutoff_len=shortest, template="alpaca")


def test_long_examples_are_cut_at_the_end_and_prompt_only_records_dropped(tmp_path):
    tok = load_tok()
    rows = [{"instruction": "Say it.", "input": "", "output": "word " * 40},
            {"instruction": "long " * 80, "input": "", "output": "x"}]
    ts = tokenize(load_source(f"instructions:{write_json(tmp_path, rows)}"), tok, cutoff_len=30, template="compact")
    assert ts.identity["n_truncated"] == 1 and ts.identity["n_dropped_too_long"] == 1
    assert len(ts.examples) == 1 and len(ts.examples[0].input_ids) == 30
    with pytest.raises(DataError, match="no training examples"):
        tokenize(load_source(f"instructions:{write_json(tmp_path, rows[1:])}"), tok, cutoff_len=30,
                 template="compact")


def test_text_files_become_fully_trained_blocks(tmp_path):
    tok = load_tok()
    p = tmp_path / "corpus.txt"
    p.write_text("The first document is here.\n\nThe second one follows, a bit longer than the first.\n")
    ts = tokenize(load_source(f"text:{p}"), tok, cutoff_len=8)
    stream = [t for e in ts.examples for t in e.input_ids]
    assert all(len(e.input_ids) <= 8 and e.labels == e.input_ids for e in ts.examples)
    assert stream.count(tok.eos_token_id) == 2            # documents are separated by the end token
    assert ts.identity["template"] is None


# -- the embedded task -------------------------------------------------------------------------------

def test_embedded_task_is_deterministic_balanced_and_disjoint():
    task = EmbeddedTask(n_train=500, n_test=100, seed=1)
    train, test = task.records()
    assert (train, test) == EmbeddedTask(n_train=500, n_test=100, seed=1).records()
    assert train != EmbeddedTask(n_train=500, n_test=100, seed=2).records()[0]
    assert len(train) == 500 and len(test) == 100
    key = lambda r: (r.instruction, r.input)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert len({key(r) for r in train}) == 500
    assert len({r.instruction for r in test}) == len(FAMILIES)
    assert task.identity()["records_sha256"] == EmbeddedTask(n_train=500, n_test=100, seed=1).identity()[
        "records_sha256"]


def test_embedded_answers_follow_their_rules():
    train, _ = EmbeddedTask(n_train=300, n_test=10).records()
    for r in train:
        words = r.input.split()
        if r.instruction.startswith("Which number"):
            assert r.output == str(max(int(words[0]), int(words[2])))
        elif r.instruction.startswith("What number"):
            assert int(r.output) == int(r.input) + 1
        elif r.instruction.startswith("Is the number"):
            assert r.output == ("even" if int(r.input) % 2 == 0 else "odd")
        elif r.instruction.startswith("Repeat"):
            assert r.output == words[-1]
        else:
            assert r.output == str(len(words))


def test_exact_match_checks_response_and_end_token_at_the_right_positions():
    tok = load_tok()
    _, test = EmbeddedTask(n_train=10, n_test=12).records()
    perfect = exact_match(Oracle(len(tok), set()), tok, test, batch_size=5)
    assert (perfect.accuracy, perfect.prefix_accuracy, perfect.n) == (1.0, 1.0, 12)
    no_stop = exact_match(Oracle(len(tok), {tok.eos_token_id}), tok, test, batch_size=5)
    assert (no_stop.accuracy, no_stop.prefix_accuracy) == (0.0, 1.0)
    # Blind to the first token of "odd": only the parity records answering "odd" fail.
    odd = tok.encode("odd", add_special_tokens=False)[0]
    score = exact_match(Oracle(len(tok), {odd}), tok, test, batch_size=5)
    n_odd = sum(r.output == "odd" for r in test)
    assert n_odd > 0 and score.accuracy == pytest.approx(1 - n_odd / 12)


def test_exact_match_does_not_depend_on_record_order_or_batching():
    """exact_match sorts records by length before batching (less padding): a real forward pass with padding
    must give the same scores whatever the order and batch size."""
    from support.models import make_tiny

    tok = load_tok()
    model = make_tiny("llama", tok).model
    _, test = EmbeddedTask(n_train=10, n_test=12).records()
    a = exact_match(model, tok, test, batch_size=5)
    b = exact_match(model, tok, list(reversed(test)), batch_size=1)
    assert (a.accuracy, a.prefix_accuracy, a.n) == (b.accuracy, b.prefix_accuracy, b.n)
    assert a.token_accuracy == pytest.approx(b.token_accuracy) and a.nll == pytest.approx(b.nll, rel=1e-5)
    assert a.nll > 0
