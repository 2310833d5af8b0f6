"""Fine-tuning an (edited) model and watching its edits decay (ALGORITHMS.md E7).

- `recipe`     the typed recipe and presets (what trains, how)
- `trainable`  recipe + model -> plan; LoRA/DoRA wrapping through peft, freezing for full fine-tuning
- `data`       instruction / text sources, prompt templates, tokenisation with prompt masking
- `task`       the embedded generated task and its exact-match scoring
- `callback`   edit metrics and task accuracy every k steps (the decay curve)
- `forward`    body + unembedding of the scored positions only
- `train`      the training loop
- `decay`      Edit Flip Ratio and relative decrease
- `run`        one experiment end to end, writing result.json
"""

from .callback import DecayCallback
from .data import InstructionRecord, Source, TrainingSet, load_source, tokenize
from .decay import edit_flip_ratio, relative_decrease
from .recipe import PRESETS, Recipe, preset
from .run import FinetuneRun, run_finetune
from .task import EmbeddedTask, exact_match
from .train import DivergedError, TrainOutcome, train
from .trainable import TrainingPlan, merge, prepare_model, resolve_plan, trainable_parameter_names

__all__ = [
    "DecayCallback", "DivergedError", "EmbeddedTask", "FinetuneRun", "InstructionRecord", "PRESETS", "Recipe",
    "Source", "TrainOutcome", "TrainingPlan", "TrainingSet", "edit_flip_ratio", "exact_match", "load_source",
    "merge", "prepare_model", "preset", "relative_decrease", "resolve_plan", "run_finetune", "tokenize", "train",
    "trainable_parameter_names",
]
