"""The embedded downstream task: a generated instruction dataset with a held-out split.

Why generated: the study's fine-tuning data (Commonsense170K) and downstream
suites are large downloads and need hours of GPU time to move a model. To see
fine-tuning change a model *measurably* on one CPU thread in minutes, this
project authors its own small task family. Every record is produced from a
seeded `random.Random`, so the same `EmbeddedTask` always yields the same
records, and the held-out split shares no (instruction, input) pair with the
training split.

Families (short answers, deterministic rules, each checkable by exact match):
- larger:    "Which number is larger?"          "37 and 52"          -> "52"
- next:      "What number comes next?"          "48"                 -> "49"
- parity:    "Is the number even or odd?"       "37"                 -> "odd"
- last_word: "Repeat the last word."            "apple river stone"  -> "stone"
- count:     "How many words are there?"        "apple river stone"  -> "3"
An instruction-tuned 135M model knows most of these skills but not the terse
answer format, and is unreliable on some of them; ~100-200 LoRA steps teach both.

Scoring (exact match) lives in `editdecay.measure.task`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from typing import ClassVar

from pydantic import Field, field_validator

from editdecay.core.config import Config, check_choice
from editdecay.data.prompts import InstructionRecord
from editdecay.data.source import FINETUNE, HELD_OUT, DataSource, DataSpec, Source

NAME = "embedded"
TASK_VERSION = 1
FAMILIES = ("larger", "next", "parity", "last_word", "count")

# Common, single-token-ish English nouns; authored here (no external word list).
WORDS = (
    "apple", "river", "stone", "house", "cloud", "table", "horse", "bread", "chair", "light",
    "water", "music", "paper", "plant", "glass", "money", "train", "beach", "dream", "field",
    "green", "heart", "night", "ocean", "party", "queen", "radio", "sugar", "tiger", "voice",
    "world", "youth", "earth", "fruit", "grass", "metal", "north", "south", "phone", "sheep",
    "smile", "storm", "sword", "truck", "wheel", "woman", "child", "clock", "coast", "dance",
    "door", "fish", "gold", "hill", "king", "lake", "moon", "road", "ship", "snow",
    "star", "tree", "wind", "wolf", "bird", "book", "cake", "card", "farm", "fire",
)


class EmbeddedTask(Config):
    """Configuration of the generated task; `records()` gives (train, held-out) splits.
    Raises ConfigError naming the field (core.config)."""

    config_name: ClassVar[str] = "embedded task"

    n_train: int = Field(2000, ge=1, description="training records")
    n_test: int = Field(200, ge=1, description="held-out records (scored by exact match)")
    seed: int = Field(0, description="seed of the record generator")
    families: tuple[str, ...] = Field(FAMILIES, description=f"task families, any of {', '.join(FAMILIES)}")

    @field_validator("families")
    @classmethod
    def _families(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"give at least one family of {', '.join(FAMILIES)}")
        for f in v:
            check_choice("family", f, FAMILIES)
        return v

    @property
    def name(self) -> str:
        return NAME

    def records(self) -> tuple[tuple[InstructionRecord, ...], tuple[InstructionRecord, ...]]:
        """Disjoint (train, test) splits, families interleaved round-robin so every prefix is balanced."""
        rng = random.Random(f"editdecay-embedded-task-v{TASK_VERSION}-{self.seed}")
        k = len(self.families)
        test_counts = [self.n_test // k + (i < self.n_test % k) for i in range(k)]
        train_quota = -(-self.n_train // k)
        per_family = {f: _unique(f, rng, n + train_quota) for f, n in zip(self.families, test_counts)}
        # Held-out items are taken first from each family's seeded pool, so no input is in both splits.
        test, train_pools = [], {}
        for (fam, pool), n in zip(per_family.items(), test_counts):
            test.append(pool[:n])
            train_pools[fam] = pool[n:]
        train = _round_robin(list(train_pools.values()), self.n_train)
        return tuple(train), tuple(_round_robin(test, self.n_test))

    def identity(self) -> dict:
        train, test = self.records()
        digest = hashlib.sha256(json.dumps([asdict(r) for r in train + test]).encode()).hexdigest()[:16]
        return {"name": NAME, "version": TASK_VERSION, **self.to_dict(),
                "records_sha256": digest}


def _round_robin(pools: list[list[InstructionRecord]], n: int) -> list[InstructionRecord]:
    out, i = [], 0
    iters = [iter(p) for p in pools]
    while len(out) < n and iters:
        it = iters[i % len(iters)]
        try:
            out.append(next(it))
            i += 1
        except StopIteration:
            iters.remove(it)
    return out


def _unique(family: str, rng: random.Random, n: int) -> list[InstructionRecord]:
    """Up to `n` records of one family with distinct inputs, in a seeded random order."""
    seen: dict[str, InstructionRecord] = {}
    tries = 0
    while len(seen) < n and tries < 20 * n:
        tries += 1
        r = _make(family, rng)
        seen.setdefault(r.input, r)
    return list(seen.values())


def _make(family: str, rng: random.Random) -> InstructionRecord:
    if family == "larger":
        a, b = rng.sample(range(10, 100), 2)
        return InstructionRecord("Which number is larger?", f"{a} and {b}", str(max(a, b)))
    if family == "next":
        a = rng.randrange(10, 999)
        return InstructionRecord("What number comes next?", str(a), str(a + 1))
    if family == "parity":
        a = rng.randrange(10, 1000)
        return InstructionRecord("Is the number even or odd?", str(a), "even" if a % 2 == 0 else "odd")
    words = rng.sample(WORDS, rng.randint(3, 5))
    if family == "last_word":
        return InstructionRecord("Repeat the last word.", " ".join(words), words[-1])
    if family == "count":
        return InstructionRecord("How many words are there?", " ".join(words), str(len(words)))
    raise ValueError(family)


class TaskSettings(Config):
    """The generated task's settings as a grid's `shared.embedded_task` block and `editdecay finetune`'s
    --embedded-task-* options give them (fine-tuning data `embedded` and downstream `embedded`)."""

    config_name = "embedded_task"

    n_train: int = Field(2000, ge=1, description="training records of the embedded task")
    n_test: int = Field(100, ge=1, description="held-out records of the embedded task (scored by exact match)")
    seed: int = Field(0, ge=0, description="seed of the embedded task's record generator")


class EmbeddedTaskSource(DataSource):
    """`embedded`: the generated task above, as fine-tuning data (its training split) and as the held-out task
    scored while fine-tuning (its test split). Its settings are the `EmbeddedTask` fields (grid:
    `shared.embedded_task`)."""

    prefix = NAME
    roles = (FINETUNE, HELD_OUT)
    description = "the generated instruction task (five rule-based families), with a held-out split"
    licence = "Apache-2.0 (generated by this repository's code)"
    settings_key = "embedded_task"
    settings = TaskSettings
    option_aliases = {"n_train": ("--task-train",), "n_test": ("--task-test",)}
    task_names = {NAME: "accuracy"}          # one- or two-token answers: exact match

    def task(self, spec: DataSpec, settings=None) -> EmbeddedTask:
        return EmbeddedTask(**(settings or {}))

    def training_data(self, spec: DataSpec, task) -> Source:
        task = task if isinstance(task, EmbeddedTask) else self.task(spec)
        train, _ = task.records()
        return Source(spec.text, NAME, records=train, identity={"spec": spec.text, **task.identity()})
