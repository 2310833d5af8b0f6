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


def small_edit_config(editor: str, lm=None, **fields):
    """A config of a registered editor for the tiny models: the given fields, plus a small E4 lambda where the
    editor's config has one (at the study's lambda the tiny models' edits would be negligible). An editor that
    keeps one layer (GRACE) gets the last of `layers`. An editor that needs training (`training_class`, MEND)
    gets a network trained for a few steps on `lm` (tiny_training)."""
    from editdecay.core.errors import ConfigError
    from editdecay.edit.registry import editor_class

    cls = editor_class(editor)
    config_class = cls.config_class
    if "mom2_update_weight" in config_class.model_fields:
        fields.setdefault("mom2_update_weight", 100.0)
    fields = {k: v for k, v in fields.items() if k in config_class.model_fields}   # other families' fields
    try:
        cfg = config_class(**fields)
    except ConfigError as e:
        if "layers" not in str(e) or len(fields.get("layers", ())) < 2:
            raise
        cfg = config_class(**{**fields, "layers": tuple(fields["layers"])[-1:]})
    if cls.training_class is not None and getattr(cfg, cls.trained_field) is None:
        if lm is None:
            raise ValueError(f"editor {editor} needs training: pass the tiny model (lm=)")
        cfg = cfg.replace(**{cls.trained_field: str(tiny_training(editor, lm, cfg))})
    return cfg


_TRAINED: dict[tuple, Path] = {}


def tiny_training(editor: str, lm, cfg) -> Path:
    """The directory of `editor`'s learned part (MEND's hypernetwork) trained for 3 steps on REQUESTS x 2 for
    `lm` and `cfg`'s structure; trained once per (editor, model weights, config) in a test process."""
    import atexit
    import shutil
    import tempfile

    from editdecay.edit.registry import editor_class

    cls = editor_class(editor)
    key = (editor, lm.identity.fingerprint, repr(sorted(cfg.model_dump(mode="json").items())))
    if key not in _TRAINED:
        small = dict(steps=3, accumulate=1, rank=4, validation=0, log_every=1, edit_lr=1e-2, lr_lr=1e-3)
        settings = cls.training_class(**{k: v for k, v in small.items() if k in cls.training_class.model_fields})
        out = Path(tempfile.mkdtemp(prefix=f"editdecay-{editor}-"))
        atexit.register(shutil.rmtree, out, True)
        cls.train(lm, cfg, settings, list(REQUESTS) * 2, out, progress=False)
        _TRAINED[key] = out
    return _TRAINED[key]
