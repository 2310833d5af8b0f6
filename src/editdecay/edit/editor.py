"""What an editor is: one class per editing method, built in one way from (config, statistics, cache).

An editor class declares everything the rest of editdecay needs to know about its method, so that no code
branches on an editor's name (edit/registry.py lists the classes, one line each):

- `name`, its `config_class` (a `EditorConfig` subclass: one help text per field, validated on construction);
- `presets`: config fields per model family (core/arch.py FAMILIES), from the study, and `embedded_preset`
  for the embedded model;
- `family`: how it edits, which says what it needs and what its patch is. `LOCATE_THEN_EDIT` (MEMIT,
  AlphaEdit): E1 key statistics of the edited layers (`needs_statistics`), E2 keys and E3 targets shared by
  every method of the family (edit/run.py), one linear solve per layer (E4, E5), a patch of weight deltas.
  A method of another family (a fine-tuning editor, a codebook wrapping a layer, a trained hypernetwork)
  overrides `start` with its own run and says with `needs_statistics` whether the E1 statistics stage runs.

`Editor(cfg, statistics, cache)` is the one constructor: `statistics` is the `LayerStats` of the edited
layers (None for an editor that needs none), `cache` the cache it may keep derived tensors in (AlphaEdit's
null-space projectors). `start(lm)` returns a run that edits `lm.model` in place batch by batch
(`edit_batch`), hands back the total patch (`patch`), undoes itself (`restore`) and says what results record
about it (`provenance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from editdecay.edit.config import EditorConfig

if TYPE_CHECKING:
    from editdecay.core.cache import Cache
    from editdecay.edit.run import EditingRun
    from editdecay.edit.stats import LayerStats
    from editdecay.edit.stats_adaptive import EditProbe

LOCATE_THEN_EDIT = "locate-then-edit"
FAMILIES = (LOCATE_THEN_EDIT,)


class Editor:
    """Base class of every editor (see module docstring)."""

    name: ClassVar[str]
    family: ClassVar[str]
    config_class: ClassVar[type[EditorConfig]]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}     # model family -> config fields
    embedded_preset: ClassVar[Mapping[str, Any]] = {}           # the embedded model's config fields
    needs_statistics: ClassVar[bool] = True                     # E1 statistics of the edited layers

    def __init__(self, cfg: EditorConfig, statistics: "LayerStats | None" = None, cache: "Cache | None" = None):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{self.name}: cfg is a {type(cfg).__name__}, expected {self.config_class.__name__}")
        if self.needs_statistics and statistics is None:
            raise TypeError(f"{self.name}: needs the E1 statistics of layers {list(cfg.layers)}")
        self.cfg = cfg
        self.statistics = statistics

    def start(self, lm, *, progress: bool = True) -> "EditingRun":
        """A run that edits `lm.model` in place (see module docstring)."""
        raise NotImplementedError(f"{type(self).__name__}.start")

    @classmethod
    def statistics_probe(cls, cfg: EditorConfig, keys: dict[int, torch.Tensor], device) -> "EditProbe":
        """What adaptive E1 statistics (`stats_tolerance`, edit/stats_adaptive.py) watch settle: the editor's solve
        applied to the edit keys {layer: (d_k, n)}. Default: none, so ConfigError naming the field."""
        from editdecay.core.errors import ConfigError

        raise ConfigError(f"stats_tolerance={cfg.stats_tolerance}: editor {cls.name!r} has no measure for adaptive "
                          f"E1 statistics; leave stats_tolerance unset (exactly stats_tokens tokens)")


class LocateThenEdit(Editor):
    """The locate-then-edit family: a subclass gives the per-layer solve (`layer_delta`) and what it keeps between
    sequential batches (`after_batch`); keys, targets and batching are the family's (edit/run.py)."""

    family = LOCATE_THEN_EDIT

    def start(self, lm, *, progress: bool = True) -> "EditingRun":
        from editdecay.edit.run import EditingRun

        return EditingRun(lm, self, progress=progress)

    def layer_delta(self, layer: int, K: torch.Tensor, R: torch.Tensor, *, device=None) -> torch.Tensor:
        """The update of one layer's W_out, (d, d_k), from keys K (d_k, n) and residuals R (d, n) (E4/E5)."""
        raise NotImplementedError(f"{type(self).__name__}.layer_delta")

    def after_batch(self, keys_after: dict[int, torch.Tensor], devices: dict | None = None) -> None:
        """Called with each layer's keys (d_k, n) recomputed on the edited model after a batch; default: nothing."""


def solve_dtype(cfg: EditorConfig) -> torch.dtype:
    """The dtype of the linear solves (edit/solve.py precision rule)."""
    return torch.float64 if cfg.solve_dtype == "float64" else torch.float32


__all__ = ["Editor", "FAMILIES", "LOCATE_THEN_EDIT", "LocateThenEdit", "solve_dtype"]
