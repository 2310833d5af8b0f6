"""What an editor is: one class per editing method, built in one way from (config, statistics, cache).

An editor class declares everything the rest of editdecay needs to know about its method, so that no code
branches on an editor's name (edit/registry.py lists the classes, one line each):

- `name`, its `config_class` (a `EditorConfig` subclass: one help text per field, validated on construction);
- `presets`: config fields per model family (core/arch.py FAMILIES), from the study, and `embedded_preset`
  for the embedded model;
- `family`: how it edits, which says what it needs and what its patch is. `LOCATE_THEN_EDIT` (MEMIT,
  AlphaEdit): E1 key statistics of the edited layers (`needs_statistics`), E2 keys and E3 targets shared by
  every method of the family (edit/run.py), one linear solve per layer (E4, E5), a patch of weight deltas;
  E3 reads no E1 statistics, so its values can be computed apart (`separate_targets`: a grid's targets stage,
  shared by every such editor with the same E3 settings; a subclass that changes E3 sets it False).
  The other families override `start` with their own run and say with `needs_statistics` whether the E1
  statistics stage runs: `FINE_TUNING` (FT-M: gradient steps on the edited weights, a weight-delta patch),
  `MEMORY` (GRACE: a codebook beside one layer, a patch of module state; `module_edit` names the
  core.module_edit.ModuleEdit class that rebuilds it from a patch), `META_LEARNING` (MEND: a trained
  hypernetwork turns the edit's gradient into a weight-delta patch; `training_class` and `train` make the
  network, `editdecay train-editor` runs them).

`Editor(cfg, statistics, cache)` is the one constructor: `statistics` is the `LayerStats` of the edited
layers (None for an editor that needs none), `cache` the cache it may keep derived tensors in (AlphaEdit's
null-space projectors). `start(lm)` returns a run (`EditorRun`) that edits `lm.model` in place batch by batch
(`edit_batch`), hands back the total patch (`patch`), undoes itself (`restore`) and says what results record
about it (`provenance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol

import torch

from editdecay.edit.config import EditorConfig, LocateThenEditConfig  # noqa: F401 (annotations)

if TYPE_CHECKING:
    from pathlib import Path

    from editdecay.core.cache import Cache
    from editdecay.core.config import Config
    from editdecay.core.module_edit import ModuleEdit
    from editdecay.core.request import EditRequest
    from editdecay.core.results import Timer
    from editdecay.edit.patch import EditPatch
    from editdecay.edit.stats import LayerStats
    from editdecay.edit.stats_adaptive import EditProbe

LOCATE_THEN_EDIT = "locate-then-edit"
FINE_TUNING = "fine-tuning"
MEMORY = "memory-based"
META_LEARNING = "meta-learning"
FAMILIES = (LOCATE_THEN_EDIT, FINE_TUNING, MEMORY, META_LEARNING)


class EditorRun(Protocol):
    """What `Editor.start` returns and edit/api.py, the workflow and the grid read."""

    timer: "Timer"                  # seconds per phase
    warnings: list[str]             # judgement calls, kept in the patch
    requests: list["EditRequest"]   # edited so far
    stats_provenance: dict | None   # where E1 statistics came from (None without)

    def edit_batch(self, requests: list["EditRequest"]) -> None: ...
    def patch(self, extra: dict | None = None) -> "EditPatch": ...
    def provenance(self) -> dict: ...
    def restore(self) -> None: ...


class Editor:
    """Base class of every editor (see module docstring)."""

    name: ClassVar[str]
    family: ClassVar[str]
    config_class: ClassVar[type[EditorConfig]]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}     # model family -> config fields
    embedded_preset: ClassVar[Mapping[str, Any]] = {}           # the embedded model's config fields
    needs_statistics: ClassVar[bool] = True                     # E1 statistics of the edited layers
    separate_targets: ClassVar[bool] = False                    # E3 target values computable apart from the edit
                                                                # (edit/target_values.py; a grid's targets stage)
    module_edit: ClassVar["type[ModuleEdit] | None"] = None      # rebuilds the module states of its patches
    training_class: ClassVar["type[Config] | None"] = None      # settings of `train`; None: needs no training
    trained_field: ClassVar[str | None] = None                  # config field that names `train`'s output directory

    def __init__(self, cfg: EditorConfig, statistics: "LayerStats | None" = None, cache: "Cache | None" = None):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{self.name}: cfg is a {type(cfg).__name__}, expected {self.config_class.__name__}")
        if self.needs_statistics and statistics is None:
            raise TypeError(f"{self.name}: needs the E1 statistics of layers {list(cfg.layers)}")
        self.cfg = cfg
        self.statistics = statistics

    def start(self, lm, *, progress: bool = True) -> EditorRun:
        """A run that edits `lm.model` in place (see module docstring)."""
        raise NotImplementedError(f"{type(self).__name__}.start")

    @classmethod
    def train(cls, lm, cfg: EditorConfig, settings: "Config", requests: list["EditRequest"], out: "Path", *,
              progress: bool = True) -> dict:
        """Train what the editor needs (MEND's hypernetwork) for `cfg`'s structure (layers, modules) on `requests`
        into the directory `out`; returns its record (a dict with "training": {"seconds", "n_requests", ...}).
        Only for an editor with a `training_class`; `cfg.<trained_field>` then names `out` when editing."""
        raise NotImplementedError(f"editor {cls.name} needs no training")

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
    separate_targets = True

    def start(self, lm, *, progress: bool = True) -> EditorRun:
        from editdecay.edit.run import EditingRun

        return EditingRun(lm, self, progress=progress)

    def layer_delta(self, layer: int, K: torch.Tensor, R: torch.Tensor, *, device=None) -> torch.Tensor:
        """The update of one layer's W_out, (d, d_k), from keys K (d_k, n) and residuals R (d, n) (E4/E5)."""
        raise NotImplementedError(f"{type(self).__name__}.layer_delta")

    def after_batch(self, keys_after: dict[int, torch.Tensor], devices: dict | None = None) -> None:
        """Called with each layer's keys (d_k, n) recomputed on the edited model after a batch; default: nothing."""


def solve_dtype(cfg: "LocateThenEditConfig") -> torch.dtype:
    """The dtype of the linear solves (edit/solve.py precision rule)."""
    return torch.float64 if cfg.solve_dtype == "float64" else torch.float32


__all__ = ["Editor", "EditorRun", "FAMILIES", "FINE_TUNING", "LOCATE_THEN_EDIT", "LocateThenEdit", "MEMORY",
           "META_LEARNING", "solve_dtype"]
