"""editdecay's own multiple-choice task ("everyday"): authored here, shipped with the package, runs offline.

Why it exists: the study's eight downstream tasks are downloads from the Hugging
Face hub, which a laptop without network (and every test) cannot reach. This task
gives every run a general-ability score that works anywhere, through the same
lm-eval machinery as the study's tasks (multiple choice, acc and acc_norm).

The items (tasks/everyday_mc.jsonl, 110 questions, four options each) are
everyday knowledge and commonsense: tools, animals, the body, food, weather,
jobs, opposites, simple social situations. None asks for a capital city or any
other fact the study's edits rewrite. The answer slot rotates (item i has its
answer at position i mod 4), so chance is exactly 25% and a slot preference
gains nothing. Prompt: "Question: {question}\\nAnswer:", options scored as
" {choice}" continuations (tasks/everyday_mc.yaml).

lm-eval resolves `data_files` against the working directory, not the YAML file,
so `lm_eval_config()` returns the YAML's content with the data file made an
absolute path inside the installed package; nothing is written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from editdecay.core.errors import DataError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
YAML_FILE = TASK_DIR / "everyday_mc.yaml"
DATA_FILE = TASK_DIR / "everyday_mc.jsonl"
TASK_NAME = "editdecay_everyday"


def records(path: Path = DATA_FILE) -> list[dict]:
    """The items, validated: {id, question, choices (>= 2 distinct strings), label (index of the answer)}."""
    out, ids = [], set()
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            r = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        choices, label = r.get("choices"), r.get("label")
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise DataError(f"{where}: 'question' must be a non-empty string, got {r.get('question')!r}")
        if (not isinstance(choices, list) or len(choices) < 2 or len(set(choices)) != len(choices)
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of at least two distinct strings, got {choices!r}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(f"{where}: 'label'={label!r} must index 'choices' (0..{len(choices) - 1})")
        if r.get("id") in ids:
            raise DataError(f"{where}: id {r.get('id')!r} is used twice")
        ids.add(r.get("id"))
        out.append(r)
    if not out:
        raise DataError(f"{path}: no items")
    return out


def lm_eval_config() -> dict:
    """The lm-eval task config (a dict, as `TaskManager.load` takes it) with the data file made absolute."""
    import yaml

    records()                                   # a broken data file fails here, with its line number
    config = yaml.safe_load(YAML_FILE.read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": {"test": str(DATA_FILE)}}
    return config


__all__ = ["DATA_FILE", "TASK_DIR", "TASK_NAME", "YAML_FILE", "lm_eval_config", "records"]
