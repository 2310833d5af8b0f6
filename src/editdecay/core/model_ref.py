"""Which model to load, as one typed record (no torch import: the grid planner reads it).

Every step that loads a model (the CLI commands, grid stages, the report's activation shift)
takes a `ModelRef` instead of the same five keyword arguments. Its fields are what the loaded
weights depend on; where the model is put (device) and where converted files are cached are
run-time settings passed to `load`, never part of the reference (so they never enter a grid
stage id).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from editdecay.core.config import Config
from editdecay.core.embedded import EMBEDDED_NAME

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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

    def __init__(self, **fields) -> None:
        dtype = fields.get("dtype")
        if isinstance(dtype, str):
            fields["dtype"] = DTYPE_ALIASES.get(dtype, dtype)
        super().__init__(**fields)

    @property
    def embedded(self) -> bool:
        return self.name == EMBEDDED_NAME

    def load(self, *, device="cpu", cache=None):
        """Load the model and its tokenizer (`core.models.load_model`): a `LoadedModel`.

        `device`: "cpu", "cuda", "cuda:1", "auto" (accelerate device map) or an explicit map.
        Raises ConfigError naming the path or id when it cannot be loaded."""
        from editdecay.core.models import load_model

        return load_model(self.name, dtype=self.dtype, device=device, cache=cache,
                          trust_remote_code=self.trust_remote_code, revision=self.revision,
                          allow_pickle=self.allow_pickle)


__all__ = ["DTYPE_NAMES", "EMBEDDED_NAME", "ModelRef"]
