"""A tiny grid that runs in seconds: a tiny Llama directory, a text corpus, and the grid file over them.

The grid (`grid_dict`): MEMIT at layers 1-2 with 0 and 4 zsRE edits (tests/fixtures/zsre_sample.json),
LoRA on all and on the edited layers for 3 steps of the embedded task, statistics from 512 corpus tokens:
4 cells, 13 stages.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from support import ZSRE_SAMPLE

GRID_WORDS = ("the of and a in to is was for on that by with as at from his her it an were are which this be or "
              "has had not but first new one their also its after two who they more been other time").split()


def make_corpus(path: Path) -> None:
    """40 blank-line separated documents of 80 common words (the statistics corpus)."""
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(GRID_WORDS) for _ in range(80)) for _ in range(40)))


def make_world(root: Path) -> dict:
    """The files the tiny grid needs under `root`: {"root", "model" (a saved tiny Llama), "corpus", "cache"}."""
    from support.models import save_tiny_model

    w = {"root": root, "model": root / "tiny", "corpus": root / "corpus.txt", "cache": root / "cache"}
    save_tiny_model(w["model"])
    make_corpus(w["corpus"])
    return w


def grid_dict(world: dict, **changes) -> dict:
    """The tiny grid over `world` ({"model": dir, "corpus": file, "cache": dir}); `changes` replace top keys."""
    edit = {"layers": [1, 2], "v_num_grad_steps": 20, "clamp_norm_factor": 4.0, "n_context_templates": 1,
            "context_length": 5}
    d = {
        "name": "tiny",
        "models": [{"name": str(world["model"]), "label": "tiny"}],
        "editors": [{"name": "memit", "overrides": {**edit, "mom2_update_weight": 10.0}}],
        "edit_data": [f"zsre:{ZSRE_SAMPLE}"],
        "n_edits": [0, 4],
        "recipes": [{"method": "lora", "layers": ["all", "edited"], "preset": "embedded",
                     "overrides": {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "lora_r": 4,
                                   "lora_alpha": 8.0}}],
        "finetune_data": ["embedded"],
        "shared": {"statistics": {"corpus": str(world["corpus"]), "tokens": 512, "batch_size": 8},
                   "evaluation": {"eval_every": 2}, "embedded_task": {"n_train": 40, "n_test": 10},
                   "device": "cpu", "threads": 1, "cache_dir": str(world["cache"])},
    }
    d.update(changes)
    return d


def write_grid(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def computed_counts(store) -> dict[str, int]:
    """How many times each stage of a GridStore was computed (its "computed" events)."""
    out: dict[str, int] = {}
    for e in store.events():
        if e["event"] == "computed":
            out[e["stage"]] = out.get(e["stage"], 0) + 1
    return out
