"""Which model to load, as one typed record (no torch import: the grid planner reads it).

Every step that loads a model (the CLI commands, grid stages, the report's activation shift)
takes a `ModelRef` instead of the same five keyword arguments. Its fields are what the loaded
weights depend on; where the model is put (device) and where converted files are cached are
run-time settings passed to `load`, never part of the reference (so they never enter a grid
stage id).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from editdecay.core.config import Config, choice_reason

EMBEDDED_NAME = "smollm2-135m"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Where a model is put: one vocabulary and one default for the command line, grid files, `ModelRef.load` and
# `core.models.load_model`.
# `auto` is the default because it is right on every machine without a flag: the GPU where there is one
# (editing and fine-tuning a 7B model on a CPU is never what was meant), the CPU where there is none.
DEFAULT_DEVICE = "auto"
DEVICE_WORDS = ("auto", "cpu", "cuda", "balanced", "mps")
DEVICE_HELP = ("auto (CUDA when available, else the CPU) | cpu | cuda | cuda:N | balanced (spread the model over "
               "the visible GPUs with accelerate's device map) | mps")


def _device(value: str) -> str:
    if value not in DEVICE_WORDS and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(choice_reason(value, DEVICE_WORDS, extra="or cuda:N"))
    return value


# A field type: `device: Device = DEFAULT_DEVICE` validates the word and reads like every other choice error.
Device = Annotated[str, AfterValidator(_device)]


class ModelRef(Config):
    """A causal LM to load: the embedded default, a local directory or a hub id."""

    config_name = "model"

    name: str = Field(EMBEDDED_NAME, min_length=1, description=(
        f"'{EMBEDDED_NAME}' (embedded, offline), a local Hugging Face model directory, or a hub id"))
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in (float32, bfloat16, float16)")
    trust_remote_code: bool = Field(False, description="run the checkpoint's own Python code (only for models "
                                                        "you trust)")
    allow_pickle: bool = Field(False, description="allow pickled .bin/.pt weights (unpickling can run code)")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v):
        # Also when the record is a nested block (a grid's model entry), which never runs __init__.
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @property
    def embedded(self) -> bool:
        return self.name == EMBEDDED_NAME

    def ref(self) -> "ModelRef":
        """The reference alone (a record deriving from ModelRef, such as a grid's model entry, adds fields)."""
        return ModelRef(**{k: getattr(self, k) for k in ModelRef.model_fields})

    def load(self, *, device=DEFAULT_DEVICE, cache=None):
        """Load the model and its tokenizer (`core.models.load_model`): a `LoadedModel`.

        `device`: one of DEVICE_HELP's words or an explicit accelerate device map {module: device}.
        Raises ConfigError naming the path or id when it cannot be loaded."""
        from editdecay.core.models import load_model

        return load_model(self.name, dtype=self.dtype, device=device, cache=cache,
                          trust_remote_code=self.trust_remote_code, revision=self.revision,
                          allow_pickle=self.allow_pickle)


__all__ = ["DEFAULT_DEVICE", "DEVICE_HELP", "DTYPE_NAMES", "Device", "EMBEDDED_NAME", "ModelRef"]
