"""The fine-tuning step: recipe -> trainable parameters -> training loop -> result with the decay curve (E7).

- `recipe`     the typed recipe and presets (what trains, how); pure, no torch
- `trainable`  recipe + model -> plan; LoRA/DoRA wrapping through peft, freezing for full fine-tuning
- `train`      the training loop
- `callback`   edit metrics and task scores every k steps (the decay curve)
- `schedule`   when the curve measures: `eval_every` as a period or a list of steps; pure, no torch
- `run`        one experiment end to end, writing result.json

Names are imported lazily, so reading `editdecay.finetune.recipe` (e.g. to validate a grid file) does not
import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "DecayCallback": "editdecay.finetune.callback",
    "PRESETS": "editdecay.finetune.recipe", "Recipe": "editdecay.finetune.recipe", "preset": "editdecay.finetune.recipe",
    "EditsUnderTest": "editdecay.finetune.run", "FinetuneRun": "editdecay.finetune.run",
    "Measures": "editdecay.finetune.run", "run_finetune": "editdecay.finetune.run",
    "DivergedError": "editdecay.finetune.train", "TrainOutcome": "editdecay.finetune.train",
    "train": "editdecay.finetune.train",
    "TrainingPlan": "editdecay.finetune.trainable", "merge": "editdecay.finetune.trainable",
    "prepare_model": "editdecay.finetune.trainable", "resolve_plan": "editdecay.finetune.trainable",
    "trainable_parameter_names": "editdecay.finetune.trainable",
    # the data and measures a fine-tuning run uses, for convenience
    "InstructionRecord": "editdecay.data.prompts", "Source": "editdecay.data.instructions",
    "TrainingSet": "editdecay.data.instructions", "load_source": "editdecay.data.sources",
    "tokenize": "editdecay.data.instructions", "EmbeddedTask": "editdecay.data.embedded_task",
    "edit_flip_ratio": "editdecay.measure.decay", "relative_decrease": "editdecay.measure.decay",
    "exact_match": "editdecay.measure.task",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editdecay.finetune' has no attribute {name!r}")


__all__ = sorted(_LAZY)
