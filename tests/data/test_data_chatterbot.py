"""The `chatterbot` fine-tuning source: records, held-out split, identity, bad files; token-level task scores."""

from __future__ import annotations

import math

import pytest
from support.models import Oracle
from support.models import tok as load_tok

from editdecay.core.errors import ConfigError, DataError
from editdecay.data.chatterbot import LICENCE, ChatterbotCorpus, prompt_key
from editdecay.data import load_source
from editdecay.data.instructions import InstructionRecord
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


@pytest.mark.parametrize("text, match", [("conversations: [[a, b]\n",
                                          "bad.yml': not valid YAML: expected ',' or ']'.* line 2, column 1"),
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


# -- the multiple-choice format (Commonsense170K style) -------------------------------------------------------

def _parse_choice(record):
    """(message, candidate replies, index of the named answer) of a choice record."""
    head, listed, fmt = record.instruction.split("\n\n")
    message = head.split(": ", 1)[1]
    n = len(fmt.split(": ", 1)[1].split("/"))
    cands = []
    rest = listed
    for k in range(n, 0, -1):
        rest, _, cand = rest.rpartition(f"Answer{k}: ")
        cands.insert(0, cand.strip())
    assert record.output.startswith("the correct answer is answer")
    return message, cands, int(record.output.rsplit("answer", 1)[1]) - 1


def test_choice_records_name_the_corpus_reply_among_replies_to_other_prompts(tmp_path):
    root = str(corpus_dir(tmp_path))
    reply_train, reply_test = ChatterbotCorpus(n_test=2, root=root).records()
    corpus = ChatterbotCorpus(n_test=2, root=root, format="choice", n_choices=2)
    train, test = corpus.records()
    assert len(train) == len(reply_train) and len(test) == len(reply_test)    # every reply is short here
    for split, pairs in ((train, reply_train), (test, reply_test)):
        answers = {}
        for r in pairs:
            answers.setdefault(prompt_key(r.instruction), set()).add(r.output)
        split_replies = {r.output for r in pairs}
        for rec, pair in zip(split, pairs):
            message, cands, right = _parse_choice(rec)
            assert message == pair.instruction and cands[right] == pair.output
            assert len(cands) == len(set(cands)) == 2
            for k, c in enumerate(cands):
                if k != right:     # a distractor: a reply of the same split, never one of this prompt's replies
                    assert c in split_replies and c not in answers[prompt_key(message)]
    assert corpus.name == "chatterbot-choice" and corpus.identity()["name"] == "chatterbot-choice"
    assert corpus.identity()["n_choices"] == 2 and ChatterbotCorpus(n_test=2, root=root).identity()["format"] == "reply"
    assert corpus.records() == ChatterbotCorpus(n_test=2, root=root, format="choice", n_choices=2).records()
    with pytest.raises(ConfigError, match="n_choices=3 needs at least 3"):    # the 2 held-out records: 1 prompt
        ChatterbotCorpus(n_test=2, root=root, format="choice", n_choices=3).records()


def test_choice_positions_are_spread_and_long_replies_are_left_out(tmp_path):
    lines = "".join(f"- - Question number {i}?\n  - Answer number {i} {'word ' * (i % 4) * 20}\n" for i in range(60))
    root = str(corpus_dir(tmp_path, **{"many.yml": f"categories: [x]\nconversations:\n{lines}"}))
    corpus = ChatterbotCorpus(n_test=12, root=root, format="choice", n_choices=2, max_reply_words=30)
    train, test = corpus.records()
    picked = [_parse_choice(r) for r in train + test]
    assert all(len(c.split()) <= 30 for _, cands, _ in picked for c in cands)
    assert len(train) + len(test) == 8 + 30         # the 30 replies of 43-63 words take no part
    positions = [right for _, _, right in picked]
    assert 0.25 < sum(positions) / len(positions) < 0.75     # the right reply is not always first or last
    with pytest.raises(ConfigError, match="n_choices=9"):
        ChatterbotCorpus(n_test=12, root=root, format="choice", n_choices=9).records()
    with pytest.raises(ConfigError, match="format='choise'.*choice"):
        ChatterbotCorpus(format="choise")
