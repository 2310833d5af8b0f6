"""Which downstream tasks to score, as short strings: the grammar, its validation and the data digests.

A task spec is one of
    everyday          editdecay's own multiple-choice task (downstream/tasks/everyday_mc.*), runs offline
    boolq piqa siqa hellaswag winogrande arc-e arc-c obqa
                      the study's eight tasks (docs/PROTOCOL.md, "downstream score"), by their lm-eval tasks;
                      lm-eval's own names (social_iqa, arc_easy, arc_challenge, openbookqa) are accepted too
    lm-eval:NAME      any task, group or tag lm-eval knows by NAME (data from the Hugging Face hub)
    local:PATH        every task defined by the lm-eval YAML files in directory PATH (or one YAML file)
    ppl:PATH          perplexity on a local text corpus: .txt (documents separated by blank lines) or
                      .jsonl / .json (records with a "text" field, or a JSON list of strings)
    commonsense:DIR[:task,...]
                      the study's own protocol: LLM-Adapters-format DIR/<task>/test.json scored by
                      generation and answer-word extraction (commonsense.py), offline; tasks boolq, piqa,
                      social_i_qa, hellaswag, winogrande, ARC-Challenge, ARC-Easy, openbookqa (default: all
                      eight). In a comma-separated string the task names after a commonsense spec belong to
                      it ('commonsense:d:boolq,piqa' is one spec); '+' separates them too.

This module is pure: it imports neither torch nor lm-eval and touches no file
except in `task_digest`, so a grid file or a command line with a typo fails in
milliseconds, before any model is loaded. Whether a named lm-eval task exists
and whether its data can be read is checked by `harness.load_tasks`, which
also runs before any model work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Literal, Sequence

from pydantic import Field, field_validator

from editdecay.core.config import Config, did_you_mean
from editdecay.core.errors import ConfigError
from editdecay.data.source import split_spec

EVERYDAY = "everyday"
# The study's eight tasks: our short name -> lm-eval task name.
STUDY_TASKS = {
    "boolq": "boolq", "piqa": "piqa", "siqa": "social_iqa", "hellaswag": "hellaswag",
    "winogrande": "winogrande", "arc-e": "arc_easy", "arc-c": "arc_challenge", "obqa": "openbookqa",
}
_ALIASES = {v: k for k, v in STUDY_TASKS.items() if v != k} | {"arc_e": "arc-e", "arc_c": "arc-c"}
COMMONSENSE = "commonsense"
PREFIXES = ("lm-eval", "local", "ppl", COMMONSENSE)
VALID_TEXT = (f"{EVERYDAY}, {', '.join(STUDY_TASKS)}, lm-eval:NAME, local:DIR (lm-eval task YAMLs), "
              f"ppl:FILE (.txt/.jsonl/.json text corpus), commonsense:DIR[:task,...] (the study's generation "
              f"protocol on LLM-Adapters test files)")
PPL_SUFFIXES = (".txt", ".jsonl", ".json")


def parse_task(text: str, base_dir: Path | None = None) -> str:
    """One spec in its canonical form: study aliases mapped to the short name, `local:`/`ppl:` paths made
    absolute (relative to `base_dir`, default the working directory). Raises ConfigError naming the value."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"downstream task {text!r} is not a task spec; use one of {VALID_TEXT}")
    raw = text.strip()
    kind, rest = split_spec(raw)
    if ":" in raw and kind.lower() in PREFIXES:
        kind, rest = kind.lower(), rest.strip()
        if kind == COMMONSENSE:
            from editdecay.measure.downstream.commonsense import canonical_spec

            return canonical_spec(rest, base_dir)
        if not rest:
            raise ConfigError(f"downstream task {raw!r}: give a {'name' if kind == 'lm-eval' else 'path'} after "
                              f"'{kind}:', e.g. {kind}:{'hellaswag' if kind == 'lm-eval' else 'path/to/data'}")
        if kind == "lm-eval":
            short = _ALIASES.get(rest, rest if rest in STUDY_TASKS.values() else None)
            return short if short in STUDY_TASKS else f"lm-eval:{rest}"
        path = Path(rest).expanduser()
        path = path if path.is_absolute() else (Path(base_dir) if base_dir else Path.cwd()) / path
        if kind == "ppl" and path.suffix.lower() not in PPL_SUFFIXES:
            raise ConfigError(f"downstream task {raw!r}: a perplexity corpus must be a {', '.join(PPL_SUFFIXES)} "
                              f"file, got {path.suffix or 'no suffix'!r}")
        return f"{kind}:{path.resolve()}"
    name = raw.lower()
    name = _ALIASES.get(name, name)
    if name == EVERYDAY or name in STUDY_TASKS:
        return name
    options = [EVERYDAY, *STUDY_TASKS, *_ALIASES]
    hint = did_you_mean(name, options) or f" (another lm-eval task: lm-eval:{raw})"
    raise ConfigError(f"downstream task {raw!r} is not known; use one of {VALID_TEXT}{hint}")


def parse_tasks(tasks: str | Sequence[str], base_dir: Path | None = None) -> tuple[str, ...]:
    """A comma-separated string or a list of specs, each canonical (`parse_task`); a task listed twice fails."""
    items = _split_list(tasks) if isinstance(tasks, str) else list(tasks)
    out = [parse_task(t, base_dir) for t in items]
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ConfigError(f"downstream task {dup[0]!r} is listed twice")
    if not out:
        raise ConfigError(f"no downstream task given; use one or more of {VALID_TEXT}")
    return tuple(out)


def _split_list(text: str) -> list[str]:
    """A comma-separated list of specs; the commonsense task names after a `commonsense:DIR:task` spec (one that
    lists tasks) belong to it: 'commonsense:d:boolq,piqa' is one spec, 'commonsense:d,piqa' two (all eight
    commonsense tasks, and lm-eval's piqa)."""
    from editdecay.measure.downstream.commonsense import canonical_task

    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if out and split_spec(out[-1])[0].strip().lower() == COMMONSENSE and ":" not in item \
                and canonical_task(item) is not None and _has_task_list(out[-1]):
            out[-1] = f"{out[-1]},{item}"
            continue
        out.append(item)
    return out


def _has_task_list(spec: str) -> bool:
    from editdecay.measure.downstream.commonsense import _split_dir

    return bool(_split_dir(split_spec(spec)[1].strip())[1])


def is_generation(spec: str) -> bool:
    """A spec scored by generation (the study's commonsense protocol), not by lm-eval."""
    return split_spec(spec)[0] == COMMONSENSE


def lm_eval_name(spec: str) -> str | None:
    """The lm-eval task name behind a named spec (study task or lm-eval:NAME), else None."""
    if spec in STUDY_TASKS:
        return STUDY_TASKS[spec]
    kind, rest = split_spec(spec)
    return rest if kind == "lm-eval" else None


class DownstreamSpec(Config):
    """What to score and how much of it. Raises ConfigError naming the field (core.config)."""

    config_name: ClassVar[str] = "downstream"

    tasks: tuple[str, ...] = Field(description=f"task specs, each canonical (parse_task): {VALID_TEXT}")
    limit: int | None = Field(None, ge=1, description="documents per task: the first N, so every model of a grid "
                                                      "is scored on the same ones; None: all")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; None keeps each task's default "
                                                            "(0 for the study's tasks and ours)")
    batch_size: int = Field(32, ge=1, description="documents per forward pass (commonsense: prompts per generate "
                                                  "call)")
    num_beams: int = Field(4, ge=1, description="commonsense tasks: beams of the beam search (the study: 4)")
    max_new_tokens: int = Field(32, ge=1, description="commonsense tasks: tokens generated per response (the "
                                                      "study: 32)")
    prompt: Literal["study", "llm-adapters"] = Field(
        "study", description="commonsense tasks: the prompt of the study's code (memit_cyj; GPT-2/GPT-J get its "
                            "'Question/Answer' prompt) or of LLM-Adapters' commonsense_evaluate.py")

    def __init__(self, tasks: Sequence[str] = (), **settings) -> None:
        super().__init__(tasks=tasks, **settings)

    @field_validator("tasks", mode="before")
    @classmethod
    def _canonical(cls, v):
        return parse_tasks(v)

    @field_validator("limit", "num_fewshot", "num_beams", "max_new_tokens", mode="before")
    @classmethod
    def _no_bool(cls, v):
        if isinstance(v, bool):
            raise ValueError("is not a count; give an integer")
        return v

    @classmethod
    def parse(cls, tasks: str | Sequence[str], *, base_dir: Path | None = None, **settings) -> "DownstreamSpec":
        return cls(parse_tasks(tasks, base_dir), **settings)


def task_digest(spec: str) -> str | None:
    """Content hash of the data behind a spec, so that a changed corpus or task directory names new grid
    stages instead of mixing old and new scores. Named lm-eval tasks are identified by name (their version
    is recorded with every result); a path that does not exist (yet) hashes to "missing"."""
    if spec == EVERYDAY:
        from editdecay.measure.downstream.everyday import TASK_DIR

        return _hash_files(TASK_DIR)
    if is_generation(spec):
        from editdecay.measure.downstream.commonsense import digest

        return digest(spec)
    kind, rest = split_spec(spec)
    if kind not in ("local", "ppl"):
        return None
    path = Path(rest)
    if path.is_file():
        from editdecay.core.cache import sha256_file

        return sha256_file(path)[:16]
    return _hash_files(path) if path.is_dir() else "missing"


def _hash_files(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


__all__ = ["COMMONSENSE", "DownstreamSpec", "EVERYDAY", "STUDY_TASKS", "VALID_TEXT", "is_generation", "lm_eval_name",
           "parse_task", "parse_tasks", "task_digest"]
