"""`chatterbot`: human-written question/answer pairs for fine-tuning, with a held-out split, offline.

Source: the English part of the PyPI package `chatterbot-corpus` (licence BSD-3-Clause; the package
classifies itself "OSI Approved :: BSD License", the upstream repository gunthercox/chatterbot-corpus
ships the BSD-3-Clause text). It is user-contributed YAML, one file per topic (trivia, history, science,
literature, computers, coding, emotion, ...):

    categories: [trivia]
    conversations:
    - - Who was the 37th President of the United States?
      - Richard Nixon

Why this source: the study fine-tunes on instruction text written by people (Commonsense170K, docs/PROTOCOL.md);
the embedded generated task shares nothing with language about the world. This package installs from
the package index like every other dependency, so a fresh clone has it with no download at run time.

Records. Every consecutive pair of turns (turn j, turn j+1) of a conversation becomes one instruction
record {instruction: turn j, input: "", output: turn j+1}. Exact duplicate (instruction, output) pairs are
kept once (the package repeats some lines many times; duplicates would also leak between the splits).
Turns that YAML reads as numbers (an unquoted ``- 1963``) are kept as their text.

Held-out split (`records()` -> (train, test)). Records are grouped by their normalised prompt (casefolded,
whitespace collapsed, trailing ``?.!`` dropped), so a prompt with several answers ("Tell me a joke", 30
answers) is wholly in one split: the splits share no prompt. Groups are shuffled with a seeded
`random.Random` and taken into the held-out split while they fit, until it has exactly `n_test` records.

Bad data. A file that is not YAML, or has no `conversations` list, is a `DataError` naming the file. A
conversation that is not a list of at least two texts is a bad record: with `strict=True` a `DataError`
names the file, conversation index and turn (first 5 shown); by default it is skipped, logged, and listed
under `skipped` in the identity (the package's own trivia.yml has one such conversation: a single string
"question - 'answer'" instead of a two-turn list).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from editdecay.core.config import Config, check_choice
from editdecay.core.errors import ConfigError, DataError
from editdecay.data.prompts import InstructionRecord
from editdecay.data.source import FINETUNE, HELD_OUT, DataSource, DataSpec, Source

log = logging.getLogger(__name__)

NAME = "chatterbot"
LICENCE = "BSD-3-Clause"
PACKAGE = "chatterbot-corpus"
SPLIT_VERSION = 1
CHOICE_VERSION = 1          # bump when `choice_records` changes what it builds (it is in the identity)
FORMATS = ("reply", "choice")
LANGUAGE = "english"


def package_root() -> Path:
    """The English YAML directory of the installed `chatterbot-corpus` package."""
    try:
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ModuleNotFoundError:
        raise ConfigError("data 'chatterbot' needs the chatterbot-corpus package: pip install chatterbot-corpus "
                          "(a dependency of editdecay; reinstall with pip install -e .)") from None
    return Path(DATA_DIRECTORY) / LANGUAGE


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def yaml_files(root: Path) -> list[Path]:
    """The corpus files of `root` (*.yml, *.yaml), sorted by name; ConfigError when there are none."""
    if not root.is_dir():
        raise ConfigError(f"data 'chatterbot:{root}': {root} is not a directory; give a directory of "
                          f"chatterbot-corpus YAML files, or plain 'chatterbot' for the installed package")
    files = sorted(p for p in root.iterdir() if p.suffix in (".yml", ".yaml") and p.is_file())
    if not files:
        raise ConfigError(f"data 'chatterbot:{root}': no .yml/.yaml files in {root}")
    return files


def files_digest(root: Path) -> str:
    """Content hash of a corpus directory (file names and bytes), 16 hex digits: part of the grid's stage ids."""
    h = hashlib.sha256()
    for p in yaml_files(root):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class _Parsed:
    records: tuple[InstructionRecord, ...]      # deduplicated, in file / conversation / turn order
    n_conversations: int
    n_pairs: int                                 # before deduplication
    skipped: tuple[str, ...]                     # "file: conversation i: why"
    digest: str


def _parse(root: str, strict: bool) -> _Parsed:
    """Records of the files under `root`."""
    from editdecay.core.files import MAX_DATA_BYTES, read_yaml

    files = yaml_files(Path(root))
    records: dict[tuple[str, str], InstructionRecord] = {}
    problems: list[str] = []
    n_conv = n_pairs = 0
    for path in files:
        doc = read_yaml(path, "chatterbot corpus file", limit=MAX_DATA_BYTES, error=DataError)
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            raise DataError(f"{path}: expected a mapping with a `conversations` list (chatterbot-corpus format), "
                            f"got {type(doc).__name__ if not isinstance(doc, dict) else 'no conversations list'}")
        for i, conv in enumerate(convs):
            turns, why = _turns(conv)
            if why:
                problems.append(f"{path.name}: conversation {i}: {why}")
                continue
            n_conv += 1
            for a, b in zip(turns, turns[1:]):
                n_pairs += 1
                records.setdefault((a, b), InstructionRecord(a, "", b))
    if problems and strict:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"data 'chatterbot' ({root}): {len(problems)} unusable conversation(s){more}:\n  "
                        + "\n  ".join(problems[:5]))
    if problems:
        log.warning("chatterbot corpus %s: skipped %d unusable conversation(s): %s", root, len(problems),
                    "; ".join(problems[:5]))
    out = tuple(records.values())
    if not out:
        raise DataError(f"data 'chatterbot' ({root}): no usable question/answer pair in {len(files)} file(s)")
    records_digest = hashlib.sha256(json.dumps([asdict(r) for r in out]).encode()).hexdigest()[:16]
    return _Parsed(out, n_conv, n_pairs, tuple(problems), records_digest)


def _turns(conv) -> tuple[list[str], str | None]:
    """The texts of one conversation, or why it is unusable (a list of >= 2 non-empty texts is required)."""
    if not isinstance(conv, list):
        return [], f"expected a list of turns, got {type(conv).__name__} {str(conv)[:60]!r}"
    if len(conv) < 2:
        return [], f"has {len(conv)} turn(s); a question/answer pair needs at least 2"
    out = []
    for j, t in enumerate(conv):
        if isinstance(t, bool) or not isinstance(t, (str, int, float)):
            return [], f"turn {j} is {type(t).__name__}, expected text"
        text = str(t).strip()
        if not text:
            return [], f"turn {j} is empty"
        out.append(text)
    return out, None


def prompt_key(text: str) -> str:
    """The grouping key of a prompt for the split: casefolded, whitespace collapsed, trailing ?.! dropped."""
    return re.sub(r"\s+", " ", text.casefold()).strip().rstrip("?.! ").strip()


@dataclass(frozen=True)
class ChatterbotCorpus:
    """The chatterbot question/answer records and their held-out split (see module docstring).

    `root`: a directory of chatterbot-format YAML files (None: the installed package's English files).
    `n_test`: held-out records (exactly; at least one record must stay for training).
    `strict`: a bad conversation fails instead of being skipped.
    """

    n_test: int = 150
    seed: int = 0
    root: str | None = None
    strict: bool = False
    format: str = "reply"
    n_choices: int = 3
    max_reply_words: int = 30
    # What this corpus object has parsed and built, keyed by what it depends on (the files' content hash, the
    # split): records(), identity() and the fine-tuning source each ask for the same split.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.n_test < 1:
            raise ConfigError(f"chatterbot: n_test={self.n_test}; must be >= 1")
        check_choice("chatterbot: format", self.format, FORMATS)
        if self.n_choices < 2:
            raise ConfigError(f"chatterbot: n_choices={self.n_choices}; a choice needs >= 2 candidate replies")
        if self.max_reply_words < 1:
            raise ConfigError(f"chatterbot: max_reply_words={self.max_reply_words}; must be >= 1")

    @property
    def name(self) -> str:
        """The task's name in results and reports: `chatterbot` (reply) or `chatterbot-choice`."""
        return NAME if self.format == "reply" else f"{NAME}-{self.format}"

    @property
    def directory(self) -> Path:
        return Path(self.root).expanduser().resolve() if self.root else package_root()

    def parsed(self) -> _Parsed:
        """The corpus' records (read again when a file changed: the key is the files' content hash)."""
        key = ("parsed", str(self.directory), self.strict, files_digest(self.directory))
        if key not in self._memo:
            self._memo[key] = _parse(str(self.directory), self.strict)
        return self._memo[key]

    def records(self) -> tuple[tuple[InstructionRecord, ...], tuple[InstructionRecord, ...]]:
        """Disjoint (train, test) splits: no normalised prompt is in both; test has exactly `n_test` records
        (format `reply`), or the choice records built from each split (format `choice`, see `choice_records`)."""
        key = ("records", self.parsed().digest)
        if key not in self._memo:
            train, test = self._reply_split()
            if self.format == "choice":
                train = choice_records(train, self.n_choices, self.max_reply_words, f"{self.seed}-train")
                test = choice_records(test, self.n_choices, self.max_reply_words, f"{self.seed}-test")
            self._memo[key] = (train, test)
        return self._memo[key]

    def _reply_split(self) -> tuple[tuple[InstructionRecord, ...], tuple[InstructionRecord, ...]]:
        records = self.parsed().records
        if self.n_test >= len(records):
            raise ConfigError(f"chatterbot: n_test={self.n_test} leaves nothing to train on ({len(records)} "
                              f"records); use n_test <= {len(records) - 1}")
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(prompt_key(r.instruction), []).append(i)
        keys = sorted(groups)
        random.Random(f"editdecay-chatterbot-split-v{SPLIT_VERSION}-{self.seed}").shuffle(keys)
        test_idx: list[int] = []
        for k in keys:
            if len(test_idx) + len(groups[k]) <= self.n_test:
                test_idx += groups[k]
            if len(test_idx) == self.n_test:
                break
        if len(test_idx) != self.n_test:
            raise ConfigError(f"chatterbot: cannot hold out exactly n_test={self.n_test} records in whole prompt "
                              f"groups (got {len(test_idx)}); choose another n_test")
        held = set(test_idx)
        train = tuple(r for i, r in enumerate(records) if i not in held)
        test = tuple(records[i] for i in sorted(held))
        return train, test

    def identity(self) -> dict:
        """Name, licence, package version, counts, content hashes: recorded in results and stage configs."""
        p = self.parsed()
        train, test = self.records()
        split = hashlib.sha256(json.dumps([[asdict(r) for r in train], [asdict(r) for r in test]])
                               .encode()).hexdigest()[:16]
        return {"name": self.name, "version": SPLIT_VERSION, "format": self.format,
                **({"n_choices": self.n_choices, "max_reply_words": self.max_reply_words, "choice_version":
                    CHOICE_VERSION} if self.format == "choice" else {}),
                "licence": LICENCE if self.root is None else None,
                "package": PACKAGE if self.root is None else None,
                "package_version": package_version() if self.root is None else None,
                "language": LANGUAGE if self.root is None else None, "root": self.root,
                "files_sha256": files_digest(self.directory), "n_conversations": p.n_conversations,
                "n_pairs": p.n_pairs, "n_duplicates": p.n_pairs - len(p.records), "n_records_total": len(p.records),
                "n_train": len(train), "n_test": len(test), "seed": self.seed, "strict": self.strict,
                "skipped": list(p.skipped), "records_sha256": p.digest, "split_sha256": split}


def choice_records(pairs: tuple[InstructionRecord, ...], n_choices: int, max_reply_words: int,
                   salt: str) -> tuple[InstructionRecord, ...]:
    """Multiple-choice instruction records built from question/answer pairs of ONE split, Commonsense170K style.

    Commonsense170K (the study's fine-tuning data, LLM-Adapters' `ft-training_set/commonsense_170k.json`) is
    human-written multiple-choice questions (BoolQ, PIQA, SIQA, ...) put into instructions that list the
    candidates and end with "Answer format: answer1/answer2/...", and responses "the correct answer is answerK".
    The same is done here to chatterbot's pairs: the instruction is the message and `n_choices` replies, one of
    them the corpus' reply to it, the others replies to other prompts of the same split (never a reply of the
    same prompt group, which could also be right, and never the same text); the response names the right one.

    Only pairs whose reply has at most `max_reply_words` words (whitespace split) take part, as answers and as
    distractors (long replies, e.g. code listings, would not fit a short cutoff). Distractors and the position
    of the right reply are drawn from `random.Random(salt)`: the same pairs and salt give the same records.
    Raises ConfigError when the split has fewer than `n_choices` prompt groups with a short reply.
    """
    short = [r for r in pairs if len(r.output.split()) <= max_reply_words]
    keys = [prompt_key(r.instruction) for r in short]
    by_key: dict[str, set[str]] = {}
    for k, r in zip(keys, short):
        by_key.setdefault(k, set()).add(r.output)
    everything = {r.output for r in short}
    if len(by_key) < n_choices:
        raise ConfigError(f"chatterbot format 'choice': only {len(by_key)} prompt group(s) with a reply of <= "
                          f"{max_reply_words} words in a split; n_choices={n_choices} needs at least {n_choices}")
    rng = random.Random(f"editdecay-chatterbot-choice-v{CHOICE_VERSION}-{salt}")
    labels = [f"answer{k + 1}" for k in range(n_choices)]
    out = []
    for key, r in zip(keys, short):
        # Replies that only other prompts have (a text that is also a reply of this prompt could be right).
        pool = sorted(everything - by_key[key])
        if len(pool) < n_choices - 1:
            raise ConfigError(f"chatterbot format 'choice': fewer than {n_choices - 1} distinct replies to other "
                              f"prompts for {r.instruction!r}; use a smaller n_choices")
        distractors = rng.sample(pool, n_choices - 1)
        right = rng.randrange(n_choices)
        candidates = distractors[:right] + [r.output] + distractors[right:]
        listed = " ".join(f"{label.capitalize()}: {c}" for label, c in zip(labels, candidates))
        instruction = (f"Please choose the reply that answers the message: {r.instruction}\n\n{listed}\n\n"
                       f"Answer format: {'/'.join(labels)}")
        out.append(InstructionRecord(instruction, "", f"the correct answer is {labels[right]}"))
    return tuple(out)


class ChatterbotSettings(Config):
    """The corpus' settings as a grid's `shared.chatterbot` block and `editdecay finetune`'s --chatterbot-*
    options give them (the `ChatterbotCorpus` fields but `root`, which the spec's DIR gives)."""

    config_name = "chatterbot"

    n_test: int = Field(150, ge=1, description="held-out records (whole prompt groups; the rest is training data)")
    seed: int = Field(0, ge=0, description="seed of the held-out split")
    strict: bool = Field(False, description="a malformed conversation fails instead of being skipped")
    format: Literal["reply", "choice"] = Field("reply", description="reply: the corpus' reply is the response "
                                               "(free text); choice: pick the corpus' reply among n_choices, "
                                               "answer 'the correct answer is answerK' (Commonsense170K style)")
    n_choices: int = Field(3, ge=2, description="candidate replies per record (format choice)")
    max_reply_words: int = Field(30, ge=1, description="longest reply taking part, in words (format choice)")


class Chatterbot(DataSource):
    """`chatterbot[:DIR]`: the corpus above as fine-tuning data (its training split) and as the held-out task
    scored while fine-tuning (its test split); DIR: a directory of files in the corpus' YAML format instead of
    the installed package's. Its settings are the `ChatterbotCorpus` fields but `root` (grid:
    `shared.chatterbot`)."""

    prefix = NAME
    roles = (FINETUNE, HELD_OUT)
    description = "human-written question/answer pairs of the chatterbot-corpus package, with a held-out split"
    licence = LICENCE + " (the package's files; a DIR: its own)"
    argument = "DIR"
    argument_required = False
    local_path = True
    settings_key = "chatterbot"
    settings = ChatterbotSettings
    # Free text written by people is almost never reproduced word for word: token accuracy; the multiple-choice
    # format answers "the correct answer is answerK": exact match.
    task_names = {NAME: "token_accuracy", f"{NAME}-choice": "accuracy"}

    def digest(self, spec: DataSpec) -> str:
        """The corpus files (the installed package's English files, or DIR's)."""
        root = self.path(spec) if spec.argument else package_root()
        return files_digest(root) if root.is_dir() else "missing"

    def task(self, spec: DataSpec, settings=None) -> ChatterbotCorpus:
        return ChatterbotCorpus(root=spec.argument or None, **(settings or {}))

    def training_data(self, spec: DataSpec, task) -> Source:
        if not isinstance(task, ChatterbotCorpus):
            task = self.task(spec)
        elif spec.argument and Path(spec.argument).expanduser().resolve() != task.directory:
            raise ConfigError(f"data {spec.text!r}: the directory differs from the corpus given as task "
                              f"({task.directory}); give one directory")
        train, _ = task.records()
        return Source(spec.text, NAME, records=train, identity={"spec": spec.text, **task.identity()})


__all__ = ["Chatterbot", "ChatterbotCorpus", "ChatterbotSettings", "FORMATS", "choice_records", "LICENCE", "NAME",
           "files_digest", "package_root", "prompt_key", "yaml_files"]
