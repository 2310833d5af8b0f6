"""Edit requests, a statistics corpus, editor configs and a synthetic patch for the tiny models of
`support.models`."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from editdecay.core.request import EditRequest
from editdecay.edit.patch import EditPatch

# Four counterfactual rewrites whose subjects and targets are single common words or names.
REQUESTS = [
    EditRequest("capital", "The capital of {} is", "France", "Rome", "Paris"),
    EditRequest("sport", "{} plays the sport of", "Lionel Messi", "basketball", "football"),
    EditRequest("currency", "The official currency of {} is the", "Japan", "euro", "yen"),
    EditRequest("birth", "{} was born in", "Marie Curie", "Tokyo", "Warsaw"),
]
WORDS = ("the of and a in to is was for on that by with as from at his her it an were are which this be or "
         "has had its also first new one two time city year people world state river music team").split()


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """Blank-line separated documents of ~40 words (well under the tiny GPT-2's 128 positions)."""
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(n_docs)))
    return path


CAPITALS = [("Rome", "Italy", "France"), ("Berlin", "Germany", "Spain"), ("Lima", "Peru", "Chile"),
            ("Oslo", "Norway", "Sweden")]   # (subject, target_true, target_new)


def capital_requests() -> tuple[EditRequest, ...]:
    """Four "{} is the capital of" rewrites with one paraphrase and one neighbour each."""
    return tuple(EditRequest(
        case_id=str(i), prompt="{} is the capital of", subject=s, target_new=new, target_true=true,
        paraphrase_prompts=(f"The city of {s} is the capital of",),
        neighborhood_prompts=("Paris is the capital of",), neighborhood_answers=("France",),
    ) for i, (s, true, new) in enumerate(CAPITALS))


def synthetic_patch(model) -> EditPatch:
    """Large random deltas on the MLP output of layers 1 and 2 of a tiny Llama, so the edit visibly changes
    predictions; the requests are `capital_requests()`. Recorded as a MEMIT patch (patch files name a registered
    editor)."""
    gen = torch.Generator().manual_seed(5)
    deltas = {f"model.layers.{l}.mlp.down_proj": torch.randn(model.model.layers[l].mlp.down_proj.weight.shape,
                                                                 generator=gen) for l in (1, 2)}
    return EditPatch(deltas=deltas, layers=(1, 2), editor="memit", config={}, requests=capital_requests())


def small_edit_config(editor: str, **fields):
    """A config of a registered editor for the tiny models: the given fields, plus a small E4 lambda where the
    editor's config has one (at the study's lambda the tiny models' edits would be negligible)."""
    from editdecay.edit.registry import editor_class

    config_class = editor_class(editor).config_class
    if "mom2_update_weight" in config_class.model_fields:
        fields.setdefault("mom2_update_weight", 100.0)
    return config_class(**fields)
