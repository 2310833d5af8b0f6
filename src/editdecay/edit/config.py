"""Typed editor configurations (core.config.Config): one help text per field; conflicts rejected at construction
with a ConfigError naming the field."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from editdecay.core.config import Config, check_choice


class EditorConfig(Config):
    """Settings shared by MEMIT and AlphaEdit: the edited layers, E2 keys and E3 target values."""

    config_name: ClassVar[str] = "editor config"

    layers: tuple[int, ...] = Field(description="edited layers l_1 < ... < l_m; targets live at l_m (E3/E4)")
    v_lr: float = Field(0.5, gt=0, description="Adam learning rate of the E3 target optimisation")
    v_num_grad_steps: int = Field(25, ge=1, description="maximum E3 optimisation steps per request")
    kl_factor: float = Field(0.0625, ge=0, description="weight of the essence-drift KL term (E3)")
    v_weight_decay: float = Field(0.5, ge=0, description="weight of ||delta|| / ||h||^2 in the E3 loss")
    clamp_norm_factor: float = Field(0.75, gt=0, description="||delta|| is clamped to this times ||h|| (E3)")
    early_stop_loss: float = Field(0.05, ge=0, description="a request stops optimising once its loss is below this")
    n_context_templates: int = Field(5, ge=0, description="sampled context prefixes besides the bare prompt (E2)")
    context_length: int = Field(10, ge=1, description="tokens sampled per context prefix (E2)")
    seed: int = Field(0, description="seed of the context prefixes")
    target_batch_size: int | None = Field(None, ge=1, description="requests optimised together in E3; None: as "
                                             "many as the device's free memory holds (128 on the CPU)")
    stats_corpus: str = Field("generated", description="E1 corpus: generated | PATH (.txt/.jsonl/.parquet) | hf:NAME[:CONFIG]")
    stats_tokens: int = Field(100_000, ge=1, description="tokens of the E1 corpus used for the key statistics")
    stats_dtype: str = Field("float32", description="dtype in which E1 statistics are accumulated")
    stats_tolerance: float | None = Field(
        None, gt=0, lt=1, exclude_if=lambda v: v is None,
        description="adaptive E1 (edit/stats_adaptive.py): doubling token counts until the relative change of "
                    "the solve applied to the edit keys is below this (0.5: measured on the embedded model, docs/scale.md); "
                    "stats_tokens is then the cap. None: exactly stats_tokens tokens (the original procedure)")
    solve_dtype: str = Field("float64", description="dtype of the linear solves (E4/E5); never an explicit inverse")

    @field_validator("layers")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("layers: give at least one layer index")
        if any(l < 0 for l in v):
            raise ValueError(f"layers: negative layer index in {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"layers: duplicate index in {list(v)}")
        return tuple(sorted(v))

    @field_validator("stats_dtype", "solve_dtype")
    @classmethod
    def _float_dtype(cls, v: str) -> str:
        if v not in ("float32", "float64"):
            raise ValueError(f"{v!r} is not allowed: statistics and solves run in float32 or float64")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.stats_dtype == "float64" and self.solve_dtype == "float32":
            raise ValueError("solve_dtype float32 with stats_dtype float64 throws away the statistics' precision; "
                             "use solve_dtype float64 or stats_dtype float32")
        if self.n_context_templates == 0 and self.context_length != 10:
            raise ValueError("context_length is set but n_context_templates is 0 (no prefixes are sampled)")
        return self


class MemitConfig(EditorConfig):
    """MEMIT (E4): Delta = R K^T (lambda C + K K^T)^-1, spread over the edited layers."""

    config_name: ClassVar[str] = "memit config"

    mom2_update_weight: float = Field(15000.0, gt=0, description="lambda: weight of the preserved key statistics C")


class AlphaEditConfig(EditorConfig):
    """AlphaEdit (E5): the MEMIT update projected onto the null space of the preserved keys."""

    config_name: ClassVar[str] = "alphaedit config"

    nullspace_threshold: float = Field(2e-2, gt=0, description="eigenvalues of C below this span the null space P")
    L2: float = Field(10.0, gt=0, description="ridge term of the projected solve")


# The editors by name, with their config classes. Pure (no torch), so a grid file is validated without
# importing the editors; `edit.editor_class` maps the same names to the solvers.
CONFIGS: dict[str, type[EditorConfig]] = {"memit": MemitConfig, "alphaedit": AlphaEditConfig}
EDITOR_NAMES = tuple(CONFIGS)


def make_config(name: str, **fields) -> EditorConfig:
    """Build a validated config; an unknown editor or invalid field raises ConfigError naming it (core.config)."""
    return CONFIGS[check_choice("editor", name.lower(), CONFIGS)](**fields)
