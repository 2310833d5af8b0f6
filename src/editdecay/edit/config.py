"""Editor settings (core.config.Config): one help text per field; conflicts rejected at construction with a
ConfigError naming the field.

`EditorConfig` holds what every editor has (the edited layers, a seed); `LocateThenEditConfig` adds the E1
statistics, E2 keys and E3 targets that the locate-then-edit family (MEMIT, AlphaEdit) shares. Each editor's
own config class derives from one of them in the editor's own module (edit/registry.py lists them)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from editdecay.core.config import Config
from editdecay.core.layers import Layers


class EditorConfig(Config):
    """What every editor has: the edited layers and the seed of its random draws."""

    config_name: ClassVar[str] = "editor config"

    layers: Layers = Field(description="edited layers l_1 < ... < l_m, e.g. 4-8 or 4,5,6 (locate-then-edit: targets "
                                       "live at l_m, E3/E4)")
    seed: int = Field(0, description="seed of the editor's random draws (E2 context prefixes, initial values)")


class LocateThenEditConfig(EditorConfig):
    """Settings of the locate-then-edit family: E1 statistics, E2 keys and E3 target values."""

    config_name: ClassVar[str] = "locate-then-edit config"

    v_lr: float = Field(0.5, gt=0, description="Adam learning rate of the E3 target optimisation")
    v_num_grad_steps: int = Field(25, ge=1, description="maximum E3 optimisation steps per request")
    kl_factor: float = Field(0.0625, ge=0, description="weight of the essence-drift KL term (E3)")
    v_weight_decay: float = Field(0.5, ge=0, description="weight of ||delta|| / ||h||^2 in the E3 loss")
    clamp_norm_factor: float = Field(0.75, gt=0, description="||delta|| is clamped to this times ||h|| (E3)")
    early_stop_loss: float = Field(0.05, ge=0, description="a request stops optimising once its loss is below this")
    n_context_templates: int = Field(5, ge=0, description="sampled context prefixes besides the bare prompt (E2)")
    context_length: int = Field(10, ge=1, description="tokens sampled per context prefix (E2)")
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

    @field_validator("stats_dtype", "solve_dtype")
    @classmethod
    def _float_dtype(cls, v: str) -> str:
        if v not in ("float32", "float64"):
            raise ValueError("is not valid: statistics and solves run in float32 or float64")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.stats_dtype == "float64" and self.solve_dtype == "float32":
            raise ValueError("solve_dtype float32 with stats_dtype float64 throws away the statistics' precision; "
                             "use solve_dtype float64 or stats_dtype float32")
        if self.n_context_templates == 0 and self.context_length != 10:
            raise ValueError("context_length is set but n_context_templates is 0 (no prefixes are sampled)")
        return self


class TargetValuesConfig(Config):
    """Everything E3's values depend on besides the model and the requests (edit/target_values.py): the E3 settings of
    a `LocateThenEditConfig` (same names) and the E2 context templates' settings."""

    config_name: ClassVar[str] = "target values"

    layer: int = Field(ge=0, description="l*: the last edited layer, where delta is added")
    v_lr: float = Field(gt=0, description="Adam learning rate of the E3 target optimisation")
    v_num_grad_steps: int = Field(ge=1, description="maximum E3 optimisation steps per request")
    kl_factor: float = Field(ge=0, description="weight of the essence-drift KL term (E3)")
    v_weight_decay: float = Field(ge=0, description="weight of ||delta|| / ||h||^2 in the E3 loss")
    clamp_norm_factor: float = Field(gt=0, description="||delta|| is clamped to this times ||h|| (E3)")
    early_stop_loss: float = Field(ge=0, description="a request stops optimising once its loss is below this")
    target_batch_size: int | None = Field(None, ge=1, description="requests optimised together (None: from memory)")
    n_context_templates: int = Field(ge=0, description="sampled context prefixes besides the bare prompt (E2)")
    context_length: int = Field(ge=1, description="tokens sampled per context prefix (E2)")
    seed: int = Field(0, description="seed of the context prefixes' sampling (E2)")

    FIELDS: ClassVar[tuple[str, ...]] = ("v_lr", "v_num_grad_steps", "kl_factor", "v_weight_decay",
                                         "clamp_norm_factor", "early_stop_loss", "target_batch_size",
                                         "n_context_templates", "context_length", "seed")

    @classmethod
    def of(cls, cfg) -> "TargetValuesConfig":
        """The target-value settings of a locate-then-edit editor config (l* = its last layer)."""
        return cls(layer=cfg.layers[-1], **{k: getattr(cfg, k) for k in cls.FIELDS})

    def settings(self):
        """What edit/targets.py `compute_targets` takes (a `TargetSettings`)."""
        from editdecay.edit.targets import TargetSettings

        return TargetSettings(layer=self.layer, v_lr=self.v_lr, v_num_grad_steps=self.v_num_grad_steps,
                              kl_factor=self.kl_factor, v_weight_decay=self.v_weight_decay,
                              clamp_norm_factor=self.clamp_norm_factor, early_stop_loss=self.early_stop_loss,
                              batch_size=self.target_batch_size)

    def templates(self, model, tokenizer):
        """The E2 context templates (`ContextTemplates`) these settings give on `model` (edit/context.py, seeded)."""
        from editdecay.edit.context import context_templates

        return context_templates(model, tokenizer, n=self.n_context_templates, length=self.context_length,
                                 seed=self.seed)
