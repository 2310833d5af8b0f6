"""The `chatterbot` fine-tuning source: records, held-out split, identity, bad files; token-level task scores."""

from __future__ import annotations

import math

import pytest
from test_finetune_data import Oracle
from test_finetune_tiny import tok as load_tok

from editdecay.core.errors import ConfigError, DataError
from editdecay.data.chatterbot import LICENCE, ChatterbotCorpus, prompt_key
from editdecay.data.instructions import InstructionRecord, load_source
from editdecay.measure.task import exact_match

TRIVIA = """categories:
- trivia
conversations:
- - Who was the 37th President of the United States?
  - Richard Nixon
- - What year was President John F. Kennedy assassinated?
  - 1963
- - Who was the 37th President of the United States?
  - Richard Nixon
- - Tell me a joke
  - A joke.
- - tell me a joke.
  - Another joke.
"""
CHAT = """categories: [chat]
conversations:
- - Hello
  - Hi
  - How are you?
  - I am fine.
- - What is AI
  - Artificial intelligence.
"""


def corpus_dir(tmp_path, **extra):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    (d / "trivia.yml").write_text(TRIVIA)
    (d / "chat.yml").write_text(CHAT)
    for name, text in extra.items():
        (d / name).write_text(text)
    return d


def test_conversations_become_deduplicated_instruction_records(tmp_path):
    train, test = ChatterbotCorpus(n_test=2, root=str(corpus_dir(tmp_path))).records()
    records = set(train + test)
    # chat.yml: 3 consecutive pairs + 1; trivia.yml: 5 pairs with one exact duplicate; 1963 (a YAML int) as text.
    assert len(records) == len(train) + len(test) == 8
    assert InstructionRecord("How are you?", "", "I am fine.") in records
    assert InstructionRecord("Hi", "", "How are you?") in records
    assert InstructionRecord("What year was President John F. Kennedy assassinated?", "", "1963") in records


def test_split_is_disjoint_by_prompt_exact_in_size_and_seeded(tmp_path):
    root = str(corpus_dir(tmp_path))
    for seed in range(6):
        train, test = ChatterbotCorpus(n_test=3, seed=seed, root=root).records()
        assert len(test) == 3 and len(train) == 5
        assert not {prompt_key(r.instruction) for r in train} & {prompt_key(r.instruction) for r in test}
        # "Tell me a joke" and "tell me a joke." are one prompt group: both on the same side
        jokes = [r for r in train + test if prompt_key(r.instruction) == "tell me a joke"]
        assert len(jokes) == 2 and (set(jokes) <= set(train) or set(jokes) <= set(test))
    assert ChatterbotCorpus(n_test=3, seed=1, root=root).records() == ChatterbotCorpus(n_test=3, seed=1,
                                                                                        root=root).records()
    splits = {ChatterbotCorpus(n_test=3, seed=s, root=root).records()[1] for s in range(6)}
    assert len(splits) > 1
    with pytest.raises(ConfigError, match="n_test=8 leaves nothing to train on"):
        ChatterbotCorpus(n_test=8, root=root).records()


def test_source_identity_names_licence_counts_and_content(tmp_path):
    root = corpus_dir(tmp_path)
    src = load_source(f"chatterbot:{root}", task=ChatterbotCorpus(n_test=2, root=str(root)))
    ident = src.identity
    assert src.kind == "chatterbot" and src.n == 6 and ident["n_records"] == 6
    assert (ident["n_train"], ident["n_test"], ident["n_pairs"], ident["n_duplicates"]) == (6, 2, 9, 1)
    assert ident["licence"] is None      # a user directory: licence unknown; the package's is recorded
    before = ident["files_sha256"]
    (root / "chat.yml").write_text(CHAT.replace("I am fine.", "I am well."))
    again = load_source(f"chatterbot:{root}", task=ChatterbotCorpus(n_test=2, root=str(root))).identity
    assert again["files_sha256"] != before and again["records_sha256"] != ident["records_sha256"]


def test_the_package_corpus_is_bsd3_and_has_its_known_size():
    src = load_source("chatterbot")
    ident = src.identity
    assert ident["licence"] == LICENCE == "BSD-3-Clause" and ident["package"] == "chatterbot-corpus"
    assert ident["n_train"] + ident["n_test"] == ident["n_records_total"] > 1000 and ident["n_test"] == 150
    assert src.n == ident["n_train"]
    # The package's trivia.yml has one conversation written as a plain string: skipped and named.
    assert any(s.startswith("trivia.yml: conversation") for s in ident["skipped"])


def test_a_bad_conversation_is_named_by_file_and_index(tmp_path):
    bad = "conversations:\n- - one\n  - two\n- just a string\n- - ok\n  - - nested\n"
    root = corpus_dir(tmp_path, **{"bad.yml": bad})
    with pytest.raises(DataError, match=r"(?s)2 unusable conversation\(s\).*bad\.yml: conversation 1: expected a "
                                        r"list.*bad\.yml: conversation 2: turn 1 is list"):
        ChatterbotCorpus(n_test=2, root=str(root), strict=True).records()
    skipped = ChatterbotCorpus(n_test=2, root=str(root)).identity()["skipped"]
    assert [s.split(":")[0] + ":" + s.split(":")[1] for s in skipped] == ["bad.yml: conversation 1",
                                                                          "bad.yml: conversation 2"]


@pytest.mark.parametrize("text, match", [("conversations: [[a, b]\n", "bad.yml: not a valid YAML file"),
                                         ("categories: [x]\n", "bad.yml: expected a mapping with a `conversations`")])
def test_an_unreadable_file_is_named(tmp_path, text, match):
    root = corpus_dir(tmp_path, **{"bad.yml": text})
    with pytest.raises(DataError, match=match):
        load_source(f"chatterbot:{root}")


def test_a_directory_without_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no .yml/.yaml files"):
        load_source(f"chatterbot:{tmp_path}")


def test_token_accuracy_and_nll_count_every_reference_token():
    tok = load_tok()
    test = [InstructionRecord("Say it", "", "Oh, no.  It has plenty of RAM."), InstructionRecord("Name", "", "RAM")]
    perfect = exact_match(Oracle(len(tok), set()), tok, test, batch_size=1)
    assert (perfect.accuracy, perfect.token_accuracy) == (1.0, 1.0)
    # one-hot logits: log p(hit) = 1 - log(e + V - 1)
    assert perfect.nll == pytest.approx(math.log(math.e + len(tok) - 1) - 1, rel=1e-5)
    ram = tok.encode("RAM", add_special_tokens=False)
    assert len(ram) == 1
    blind = exact_match(Oracle(len(tok), {ram[0]}), tok, test, batch_size=2)
    refs = [tok.encode(r.output, add_special_tokens=False) + [tok.eos_token_id] for r in test]
    n_tokens, n_ram = sum(map(len, refs)), sum(t.count(ram[0]) for t in refs)
    assert blind.accuracy == 1 - sum(ram[0] in t for t in refs) / 2 < 1
    assert blind.token_accuracy == pytest.approx(1 - n_ram / n_tokens)
    # a missed token has log p = 0 - log(e + V - 1)
    expect = (n_tokens * (math.log(math.e + len(tok) - 1) - 1) + n_ram) / n_tokens
    assert blind.nll == pytest.approx(expect, rel=1e-5)
