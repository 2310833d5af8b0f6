"""The fine-tuning recipe: one typed, validated record of every training choice.

A recipe says *what* trains (method, layers, target modules) and *how*
(optimiser, schedule, length, precision). It is checked on construction, before
any model or data is loaded, so a conflicting setting fails in milliseconds;
checks that need the model (layer indices beyond its depth, `edited` without
edited layers, module types peft cannot wrap) run in `trainable.resolve_plan`,
still before the first training step.

Target modules default to `all-linear`: every linear map of attention and MLP.
The study's own code (docs/PROTOCOL.md) used peft's default targets for GPT-2/GPT-J,
i.e. attention only, so the edited MLP weight was never trained and "edited
layers only" never touched the edited module. Here the targets are always an
explicit, recorded choice, and `attention` reproduces the study's setting.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Union

from pydantic import BeforeValidator, Field, model_validator

from editdecay.core.config import Config, check_choice, choice_reason, did_you_mean
from editdecay.core.errors import ConfigError
from editdecay.core.layers import layer_choice
from editdecay.data.prompts import TEMPLATES

METHODS = ("full", "lora", "dora")
LAYER_CHOICES = ("all", "edited", "non-edited")
TARGET_CHOICES = ("attention", "mlp", "all-linear", "all")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")
TRAIN_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "adamw8bit")     # finetune.precision.OPTIMIZERS (kept here: this module imports no torch)
ATTENTION_KERNELS = ("auto", "eager", "sdpa")   # finetune.attention (transformers' attn_implementation names)


def target_choice(value) -> Union[str, tuple[str, ...]]:
    """One of TARGET_CHOICES, or block-relative module names: a sequence, or text with commas or dots
    ("mlp.down_proj,mlp.up_proj", as the command line and grid files write them). ValueError(reason) otherwise."""
    if isinstance(value, str) and value in TARGET_CHOICES:
        return value
    if isinstance(value, str) and ("," in value or "." in value):
        value = value.split(",")
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t.strip() for t in value):
        return tuple(t.strip() for t in value)
    if isinstance(value, str):
        raise ValueError(choice_reason(value, TARGET_CHOICES, extra="or block-relative module names such as "
                                                                     "mlp.down_proj"))
    raise ValueError(f"is not valid: give one of {', '.join(TARGET_CHOICES)} or a non-empty list of "
                     f"block-relative module names such as [mlp.down_proj]")


# Field types: the layer and target choices as every entry point writes them (core.layers for layer lists).
LayerSpec = Annotated[Union[str, tuple[int, ...]], BeforeValidator(lambda v: layer_choice(v, LAYER_CHOICES))]
TargetSpec = Annotated[Union[str, tuple[str, ...]], BeforeValidator(target_choice)]


def _field(text: str, default, **kw):
    return Field(default, description=text, **kw)


class Recipe(Config):
    """A fine-tuning recipe. Every field carries a help text (`Recipe.help()`); invalid or conflicting values
    raise ConfigError naming the field (core.config)."""

    config_name: ClassVar[str] = "recipe"

    method: str = _field("full: train the selected parameters themselves; lora: low-rank adapters (peft); "
                           "dora: weight-decomposed low-rank adapters (peft, use_dora=True).", "lora")
    layers: LayerSpec = _field("Which transformer blocks train: all | edited (the layers of the patch under test) | "
                              "non-edited | layer indices (4-8, 4,5,6 or a list).", "all")
    targets: TargetSpec = _field("Which modules of those blocks train, resolved through editdecay.core.arch: attention | "
                                "mlp | all-linear (default; includes the edited MLP output projection) | all "
                                "(method=full only: every parameter of the blocks, and with layers=all also "
                                "embeddings, final norm and unembedding, as the study's full fine-tuning) | a "
                                "list of block-relative module names such as mlp.down_proj,mlp.up_proj.", "all-linear")
    lora_r: int = _field("LoRA/DoRA rank r.", 32)
    lora_alpha: float = _field("LoRA/DoRA scaling numerator: the update is scaled by alpha / r.", 64.0)
    lora_dropout: float = _field("Dropout on the adapter input during training, in [0, 1).", 0.05)
    learning_rate: float = _field("Peak learning rate of AdamW.", 2e-4)
    lr_scheduler: str = _field(f"Learning-rate schedule (transformers.get_scheduler): one of {', '.join(SCHEDULERS)}.",
                              "linear")
    warmup_steps: int | None = _field("Linear warm-up in optimiser steps; give this or warmup_ratio, not both.", None)
    warmup_ratio: float | None = _field("Warm-up as a fraction of the total optimiser steps, in [0, 1).", None)
    epochs: float | None = _field("Passes over the training examples; give this or max_steps, not both.", None)
    max_steps: int | None = _field("Optimiser steps to run; give this or epochs, not both.", None)
    batch_size: int = _field("Examples per micro-batch.", 16)
    grad_accum: int = _field("Micro-batches per optimiser step (effective batch = batch_size * grad_accum).", 1)
    cutoff_len: int = _field("Maximum tokens per example (prompt + response + end token); longer examples are cut "
                            "at the end.", 256)
    template: str = _field(f"Prompt template for instruction records: {' | '.join(TEMPLATES)} "
                          "(alpaca = the Commonsense170K / LLM-Adapters wording).", "alpaca")
    train_on_prompt: bool = _field("Also train on prompt tokens. Default False: the loss covers the response only "
                                  "(prompt labels are -100). The LLM-Adapters reference code defaults to True.", False)
    dtype: str = _field("Compute dtype of forward and backward passes (autocast): float32 | bfloat16. Weights and "
                       "optimiser state keep the dtype the model was loaded in.", "float32")
    weight_decay: float = _field("AdamW decoupled weight decay.", 0.0)
    max_grad_norm: float | None = _field("Clip the global gradient norm to this value; None disables clipping.", 1.0)
    optimizer: str = _field("adamw: torch AdamW, state in the trained weights' dtype (float32 with master weights) | "
                           "adamw8bit: torchao's block-wise 8-bit AdamW (2 bytes of state per parameter; with "
                           "bfloat16 weights it rounds updates stochastically). See finetune/precision.py.", "adamw",
                           # left out of the JSON at its default, so recipes without it keep their stage ids
                           exclude_if=lambda v: v == "adamw")
    master_weights: bool | None = _field("Keep float32 master copies of the trained weights for the optimiser when the "
                                        "model's weights are bfloat16/float16 (updates of ~lr 5e-6 are below a "
                                        "bfloat16 weight's spacing and would be rounded away). None: on for "
                                        "low-precision weights with optimizer adamw.", None,
                                        exclude_if=lambda v: v is None)
    group_by_length: bool = _field("Draw micro-batches of similar length (transformers' length-grouped sampler), so "
                                   "less of each batch is padding; the order of examples differs from the plain "
                                   "shuffle.", False, exclude_if=lambda v: not v)
    gradient_checkpointing: bool = _field("Recompute activations in the backward pass (less memory, ~30% slower).",
                                         False)
    attention_kernel: str = _field("Attention kernel of the training passes (transformers' attn_implementation): "
                                   "auto (eager on the CPU while its attention matrices stay small, the model's "
                                   "own elsewhere; finetune/attention.py) | eager | sdpa. Evaluations between "
                                   "steps keep the model's own kernel.", "auto",
                                   # left out of the JSON at its default, so recipes without it keep their stage ids
                                   exclude_if=lambda v: v == "auto")
    seed: int = _field("Seed of adapter initialisation, dropout and data order.", 0)

    @model_validator(mode="after")
    def _validate(self) -> "Recipe":
        _choice("method", self.method, METHODS)
        if self.targets == "all" and self.method != "full":
            raise ConfigError(f"targets='all' (every parameter, norms included) needs method='full'; "
                              f"method={self.method!r} wraps linear modules only: use targets='all-linear'")
        if self.method in ("lora", "dora"):
            _check(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
            _check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
            _check(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        _check(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", self.learning_rate,
               "a finite number > 0")
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} are both set; "
                              f"give one of them")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        if self.warmup_ratio is not None:
            _check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        if self.lr_scheduler == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ConfigError("lr_scheduler='constant' ignores warm-up, but a warm-up is set; "
                              "use lr_scheduler='constant_with_warmup' or drop warmup_steps/warmup_ratio")
        if (self.epochs is None) == (self.max_steps is None):
            raise ConfigError(f"give exactly one of epochs (got {self.epochs}) and max_steps (got {self.max_steps})")
        if self.epochs is not None:
            _check(self.epochs > 0, "epochs", self.epochs, "a number > 0")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "an integer >= 1")
        _check(self.cutoff_len >= 2, "cutoff_len", self.cutoff_len, "an integer >= 2")
        _choice("template", self.template, TEMPLATES)
        if self.dtype in ("float16", "fp16"):
            raise ConfigError("dtype='float16' needs loss scaling, which this trainer does not do; "
                              "use dtype='bfloat16' or 'float32'")
        _choice("dtype", self.dtype, TRAIN_DTYPES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "a number > 0 or None")
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        return self

    # -- convenience -----------------------------------------------------------------------------

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (validated again). Unknown names are an error. Choosing one length
        (epochs / max_steps) or warm-up (warmup_steps / warmup_ratio) setting drops the other."""
        for one, other in (("epochs", "max_steps"), ("warmup_steps", "warmup_ratio")):
            for a, b in ((one, other), (other, one)):
                if changes.get(a) is not None and b not in changes:
                    changes[b] = None
        return super().replace(**changes)


# -- presets -----------------------------------------------------------------------------------------

def _study(method: str) -> Recipe:
    """docs/PROTOCOL.md fine-tuning settings. LoRA/DoRA: r=32, alpha=64, dropout 0.05, lr 2e-4, 3 epochs, batch 16,
    cutoff 256, 100 warm-up steps. Full: lr 5e-6, 3 epochs, cutoff 1024, warm-up ratio 0.1, bf16, and every
    parameter trains (targets='all'), as the study's full fine-tuning did."""
    if method == "full":
        return Recipe(method="full", targets="all", learning_rate=5e-6, epochs=3.0, batch_size=16,
                      cutoff_len=1024, warmup_ratio=0.1, dtype="bfloat16", template="alpaca")
    return Recipe(method=method, lora_r=32, lora_alpha=64.0, lora_dropout=0.05, learning_rate=2e-4, epochs=3.0,
                  batch_size=16, cutoff_len=256, warmup_steps=100, template="alpaca")


def _embedded(method: str) -> Recipe:
    """Small settings for the embedded SmolLM2-135M and the embedded task on one CPU thread: a few minutes.
    Higher learning rates than the study because the run is ~120 steps instead of thousands."""
    common = dict(max_steps=120, batch_size=8, cutoff_len=64, warmup_steps=10, template="compact", seed=0)
    if method == "full":
        return Recipe(method="full", learning_rate=5e-5, **common)
    return Recipe(method=method, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, learning_rate=1e-3, **common)


PRESETS = {"study": _study, "embedded": _embedded}


def preset(name: str, method: str = "lora", **overrides) -> Recipe:
    """A named preset for `method`, with field overrides applied (and validated)."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is unknown{did_you_mean(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    _choice("method", method, METHODS)
    base = PRESETS[name](method)
    return base.replace(**overrides) if overrides else base


# -- helpers -----------------------------------------------------------------------------------------

def _choice(name: str, value, options, extra: str = "") -> None:
    check_choice(name, value, options, extra=extra)


def _check(ok: bool, name: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not valid; it must be {valid}")
