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

from editdecay.finetune.callback import DecayCallback
from editdecay.data.instructions import InstructionRecord, Source, TrainingSet, load_source, tokenize
from editdecay.measure.decay import edit_flip_ratio, relative_decrease
from editdecay.finetune.recipe import PRESETS, Recipe, preset
from editdecay.finetune.run import FinetuneRun, run_finetune
from editdecay.data.embedded_task import EmbeddedTask
from editdecay.measure.task import exact_match
from editdecay.finetune.train import DivergedError, TrainOutcome, train
from editdecay.finetune.trainable import TrainingPlan, merge, prepare_model, resolve_plan, trainable_parameter_names

__all__ = [
    "DecayCallback", "DivergedError", "EmbeddedTask", "FinetuneRun", "InstructionRecord", "PRESETS", "Recipe",
    "Source", "TrainOutcome", "TrainingPlan", "TrainingSet", "edit_flip_ratio", "exact_match", "load_source",
    "merge", "prepare_model", "preset", "relative_decrease", "resolve_plan", "run_finetune", "tokenize", "train",
    "trainable_parameter_names",
]
