"""Which downstream tasks to score, as short strings: the grammar, its validation and the data digests.

A task spec is one of
    everyday          editdecay's own multiple-choice task (downstream/tasks/everyday_mc.*), runs offline
    boolq piqa siqa hellaswag winogrande arc-e arc-c obqa
                      the study's eight tasks (PROTOCOL.md, "downstream score"), by their lm-eval tasks;
                      lm-eval's own names (social_iqa, arc_easy, arc_challenge, openbookqa) are accepted too
    lm-eval:NAME      any task, group or tag lm-eval knows by NAME (data from the Hugging Face hub)
    local:PATH        every task defined by the lm-eval YAML files in directory PATH (or one YAML file)
    ppl:PATH          perplexity on a local text corpus: .txt (documents separated by blank lines) or
                      .jsonl / .json (records with a "text" field, or a JSON list of strings)

This module is pure: it imports neither torch nor lm-eval and touches no file
except in `task_digest`, so a grid file or a command line with a typo fails in
milliseconds, before any model is loaded. Whether a named lm-eval task exists
and whether its data can be read is checked by `harness.load_tasks`, which
also runs before any model work.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from editdecay.core.errors import ConfigError

EVERYDAY = "everyday"
# The study's eight tasks: our short name -> lm-eval task name.
STUDY_TASKS = {
    "boolq": "boolq", "piqa": "piqa", "siqa": "social_iqa", "hellaswag": "hellaswag",
    "winogrande": "winogrande", "arc-e": "arc_easy", "arc-c": "arc_challenge", "obqa": "openbookqa",
}
_ALIASES = {v: k for k, v in STUDY_TASKS.items() if v != k} | {"arc_e": "arc-e", "arc_c": "arc-c"}
PREFIXES = ("lm-eval", "local", "ppl")
VALID_TEXT = (f"{EVERYDAY}, {', '.join(STUDY_TASKS)}, lm-eval:NAME, local:DIR (lm-eval task YAMLs), "
              f"ppl:FILE (.txt/.jsonl/.json text corpus)")
PPL_SUFFIXES = (".txt", ".jsonl", ".json")


def parse_task(text: str, base_dir: Path | None = None) -> str:
    """One spec in its canonical form: study aliases mapped to the short name, `local:`/`ppl:` paths made
    absolute (relative to `base_dir`, default the working directory). Raises ConfigError naming the value."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"downstream task {text!r} is not a task spec; use one of {VALID_TEXT}")
    raw = text.strip()
    kind, sep, rest = raw.partition(":")
    if sep and kind.lower() in PREFIXES:
        kind, rest = kind.lower(), rest.strip()
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
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (another lm-eval task: lm-eval:{raw})"
    raise ConfigError(f"downstream task {raw!r} is not known; use one of {VALID_TEXT}{hint}")


def parse_tasks(tasks: str | Sequence[str], base_dir: Path | None = None) -> tuple[str, ...]:
    """A comma-separated string or a list of specs, each canonical (`parse_task`); a task listed twice fails."""
    items = [t for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    out = [parse_task(t, base_dir) for t in items]
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ConfigError(f"downstream task {dup[0]!r} is listed twice")
    if not out:
        raise ConfigError(f"no downstream task given; use one or more of {VALID_TEXT}")
    return tuple(out)


def lm_eval_name(spec: str) -> str | None:
    """The lm-eval task name behind a named spec (study task or lm-eval:NAME), else None."""
    if spec in STUDY_TASKS:
        return STUDY_TASKS[spec]
    return spec.split(":", 1)[1] if spec.startswith("lm-eval:") else None


@dataclass(frozen=True)
class DownstreamSpec:
    """What to score and how much of it. `limit` caps the documents per task (the first N, so every
    model of a grid is scored on the same ones); `num_fewshot` None keeps each task's default (0 for
    the study's tasks and ours)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, tuple):
            object.__setattr__(self, "tasks", tuple(self.tasks))
        canonical = parse_tasks(self.tasks)
        if canonical != self.tasks:
            object.__setattr__(self, "tasks", canonical)
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"downstream limit={self.limit!r} is not valid; use an integer >= 1 (documents "
                              f"per task) or None (all)")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise ConfigError(f"downstream num_fewshot={self.num_fewshot!r} is not valid; use an integer >= 0 or "
                              f"None (the task's default)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"downstream batch_size={self.batch_size!r} is not valid; use an integer >= 1")

    @classmethod
    def parse(cls, tasks: str | Sequence[str], *, base_dir: Path | None = None, **settings) -> "DownstreamSpec":
        return cls(parse_tasks(tasks, base_dir), **settings)

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}


def task_digest(spec: str) -> str | None:
    """Content hash of the data behind a spec, so that a changed corpus or task directory names new grid
    stages instead of mixing old and new scores. Named lm-eval tasks are identified by name (their version
    is recorded with every result); a path that does not exist (yet) hashes to "missing"."""
    if spec == EVERYDAY:
        from editdecay.measure.downstream.everyday import TASK_DIR

        return _hash_files(TASK_DIR)
    kind, _, rest = spec.partition(":")
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


__all__ = ["DownstreamSpec", "EVERYDAY", "STUDY_TASKS", "VALID_TEXT", "lm_eval_name", "parse_task", "parse_tasks",
           "task_digest"]
