"""Typed stage specs: what each grid stage computes, one frozen record per stage kind.

The planner (plan.py) builds them, the executor (stages.py) reads them; a stage's id hashes its kind, its
spec (as JSON, `spec_version` included) and the ids of the stages it reads, so two cells that need the
same computation name the same stage. A spec holds everything the stage's output depends on and nothing
about how it runs (device, threads, batch sizes of scoring, cache location: `Plan.runtime`).

    kind      record         computes                                                    model it makes or reads
    stats     StatsSpec      E1 statistics of the edited layers, into the editdecay cache   M0
    targets   TargetsSpec    E3 target values of the cell's requests (beside E1)           M0
    patch     PatchSpec      E2-E5: the edit of the cell's requests, as an EditPatch        M_e (saved as a patch)
    evaluate  EvaluateSpec   E6 outcomes of the cell's requests                             M0, or M_f
    finetune  FinetuneSpec   fine-tuning with a decay curve (E7)                            M_f, or M_ef (patch first)
    cell      CellSpec       the cell's result (core/schema.py CellResult) from the above   -

`SPEC_VERSION` is part of every spec: a change of what a spec means bumps it, so stages of an older
editdecay (plan format 1: untyped configs, spec version 1 implied) never match a stage of this one and a grid
started with older code is computed anew in the same directory, not mixed (README, "Resuming a grid").
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from editdecay.core.config import Config
from editdecay.core.errors import ConfigError
from editdecay.core.model_ref import ModelRef
from editdecay.data.sources import EditSelection
from editdecay.edit.config import TargetValuesConfig
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.schedule import EvalEvery

SPEC_VERSION = 2


class StaleSpecError(ConfigError):
    """A stage spec written by another version of editdecay (the grid must be planned and run again)."""


class DataRef(Config):
    """One data set a stage reads: the spec (local paths absolute), its content hash when planned, and the
    source's settings (the grid's `shared.<settings_key>`, e.g. the embedded task's sizes; None: it has none)."""

    config_name: ClassVar[str] = "data"

    spec: str
    digest: str | None = None
    settings: dict[str, Any] | None = None

    def check(self) -> None:
        """DataError if the data changed since it was planned."""
        from editdecay.data.sources import check_digest

        check_digest(self.spec, self.digest)

    def task(self):
        """The held-out task this spec names, with its settings (data/sources.py `held_out_task`)."""
        from editdecay.data.sources import held_out_task

        return held_out_task(self.spec, self.settings)

    def has_held_out(self) -> bool:
        from editdecay.data.source import HELD_OUT
        from editdecay.data.sources import source_of

        return HELD_OUT in source_of(self.spec).roles


class EditorRef(Config):
    """An editor and its settings. `config`: the full config, validated when the plan was made (the model's family
    was known); otherwise None and `fields` are applied over the editor's preset once the model is loaded."""

    config_name: ClassVar[str] = "editor"

    name: str
    config: dict[str, Any] | None = None
    fields: dict[str, Any] = Field(default_factory=dict)

    def resolve(self, family: str | None, model_name: str | None):
        """The editor's config for a loaded model (`lm.identity.family`, `lm.identity.name`)."""
        from editdecay.edit.registry import make_config, resolve_config

        if self.config is not None:
            return make_config(self.name, **self.config)
        return resolve_config(self.name, family, model_name, self.fields)

    @property
    def layers(self) -> tuple[int, ...] | None:
        """The edited layers when known without the model (None: the preset decides once it is loaded)."""
        layers = (self.config or self.fields).get("layers")
        return tuple(layers) if layers is not None else None


class StatisticsRef(Config):
    """What one E1 statistics run depends on besides the model (edit/stats.py `second_moments`)."""

    config_name: ClassVar[str] = "statistics"

    layers: tuple[int, ...]
    corpus: str
    tokens: int
    dtype: str
    # Adaptive E1 (edit/stats_adaptive.py): `tokens` is then the cap and the patch stage computes the statistics
    # on its edit keys. Unset, it is left out of the JSON, so the stage ids of grids without it do not change.
    tolerance: float | None = Field(None, exclude_if=lambda v: v is None)

    @classmethod
    def of(cls, cfg) -> "StatisticsRef":
        return cls(layers=cfg.layers, corpus=cfg.stats_corpus, tokens=cfg.stats_tokens, dtype=cfg.stats_dtype,
                   tolerance=cfg.stats_tolerance)


class DownstreamRef(Config):
    """lm-eval downstream tasks scored before and after fine-tuning: canonical task specs, the documents per
    task and the content hash of each task's local data when planned."""

    config_name: ClassVar[str] = "downstream"

    tasks: tuple[str, ...]
    limit: int | None = None
    digests: dict[str, str | None] = Field(default_factory=dict)
    num_beams: int = 4                    # commonsense:DIR tasks (generation): the study's 4 beams, 32 new tokens
    max_new_tokens: int = 32
    prompt: str = "study"

    def spec(self, batch_size: int):
        """The `DownstreamSpec` to score, after checking that no task's data changed since planning."""
        from editdecay.core.errors import DataError
        from editdecay.measure.downstream import DownstreamSpec, task_digest

        for t in self.tasks:
            planned, now = self.digests.get(t), task_digest(t)
            if planned is not None and now != planned:
                raise DataError(f"downstream task {t!r} changed since this grid was planned (content {planned} -> "
                                f"{now}); run `editdecay grid run` again: it plans anew")
        return DownstreamSpec(self.tasks, limit=self.limit, batch_size=batch_size, num_beams=self.num_beams,
                              max_new_tokens=self.max_new_tokens, prompt=self.prompt)


class StageSpec(Config):
    """Base of the stage specs: `spec_version` is checked on reading and hashed into the stage id."""

    kind: ClassVar[str]
    spec_version: int = SPEC_VERSION

    @field_validator("spec_version")
    @classmethod
    def _current(cls, v: int) -> int:
        if v != SPEC_VERSION:
            raise ValueError(f"stage spec version {v} was written by another editdecay (this one writes "
                             f"{SPEC_VERSION}); run `editdecay grid run` with the grid file again: it plans anew")
        return v

    @property
    def seed(self) -> int:
        """The seed the stage's random number generators start from (`core.seeding.seed_everything`)."""
        return 0

    def to_config(self) -> dict:
        """The JSON form kept in the plan and hashed into the stage id."""
        return self.model_dump(mode="json")


def _resolved_or_editor(spec, resolved: str):
    """A spec that holds either its settings resolved at planning (field `resolved`) or the `editor` whose preset
    resolves them once the model loads: exactly one of the two."""
    if (getattr(spec, resolved) is None) == (spec.editor is None):
        raise ValueError(f"give exactly one of {resolved} (resolved) and editor (resolved when the model loads)")
    return spec


class StatsSpec(StageSpec):
    """E1 statistics of one model: `statistics` when the editor's layers and corpus were known at planning (then
    every editor with those shares the stage), else `editor`, resolved once the model is loaded."""

    kind: ClassVar[str] = "stats"
    config_name: ClassVar[str] = "stats stage"

    model: ModelRef
    statistics: StatisticsRef | None = None
    editor: EditorRef | None = None

    @model_validator(mode="after")
    def _one(self):
        return _resolved_or_editor(self, "statistics")

    def resolve(self, family: str | None, model_name: str | None) -> StatisticsRef:
        if self.statistics is not None:
            return self.statistics
        return StatisticsRef.of(self.editor.resolve(family, model_name))


class TargetsSpec(StageSpec):
    """E3 target values of a cell's requests on the base model (edit/target_values.py): `values` when the editor's
    settings were known at planning (then every editor with the same E3 settings shares the stage), else `editor`,
    resolved once the model is loaded."""

    kind: ClassVar[str] = "targets"
    config_name: ClassVar[str] = "targets stage"

    model: ModelRef
    requests: EditSelection
    values: TargetValuesConfig | None = None
    editor: EditorRef | None = None

    @model_validator(mode="after")
    def _one(self):
        return _resolved_or_editor(self, "values")

    @property
    def seed(self) -> int:
        return self.requests.seed or 0

    def resolve(self, family: str | None, model_name: str | None) -> TargetValuesConfig:
        if self.values is not None:
            return self.values
        return TargetValuesConfig.of(self.editor.resolve(family, model_name))


class PatchSpec(StageSpec):
    """The edit of a cell's requests on the base model (E2-E5), sequential batches of `batch_size`; `targets`: the
    targets stage whose E3 values the (first) batch takes, or None (the edit computes its own)."""

    kind: ClassVar[str] = "patch"
    config_name: ClassVar[str] = "patch stage"

    model: ModelRef
    editor: EditorRef
    requests: EditSelection
    batch_size: int | None = None
    targets: str | None = Field(None, exclude_if=lambda v: v is None)     # unset: ids of such patches unchanged

    @property
    def seed(self) -> int:
        return self.requests.seed or 0


class EvaluateSpec(StageSpec):
    """E6 outcomes of a cell's requests under M0 (`finetune` None) or M_f (the weights of finetune stage `finetune`)."""

    kind: ClassVar[str] = "evaluate"
    config_name: ClassVar[str] = "evaluate stage"

    model: ModelRef
    requests: EditSelection
    finetune: str | None = None
    control: int = 0                          # knowledge-control facts measured beside the requests

    @property
    def seed(self) -> int:
        return self.requests.seed or 0


class FinetuneSpec(StageSpec):
    """Fine-tuning with a decay curve: M_f (the base model; `patch` None) or M_ef (patch stage `patch` applied
    first). `held_out`: the task whose held-out split is scored at every curve point. For M_f of an
    `edited`/`non-edited` recipe, `edited_layers` are the layers those refer to, or, where they are unknown until
    the model loads, `edited_by` is the editor whose preset gives them (M_ef takes them from its patch)."""

    kind: ClassVar[str] = "finetune"
    config_name: ClassVar[str] = "finetune stage"

    model: ModelRef
    recipe: Recipe
    data: DataRef
    held_out: DataRef | None = None
    downstream: DownstreamRef | None = None
    eval_every: EvalEvery
    edited_layers: tuple[int, ...] | None = None
    edited_by: EditorRef | None = None
    patch: str | None = None
    control: int = 0                          # with a patch: knowledge-control facts measured beside its requests

    @model_validator(mode="after")
    def _one_source_of_layers(self):
        if self.edited_layers is not None and self.edited_by is not None:
            raise ValueError("give edited_layers or edited_by, not both")
        return self

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def resolve_edited_layers(self, family: str | None, model_name: str | None) -> tuple[int, ...] | None:
        """The layers an `edited`/`non-edited` recipe of M_f refers to, for the loaded model (None: none)."""
        if self.edited_by is not None:
            return tuple(self.edited_by.resolve(family, model_name).layers)
        return self.edited_layers

    @property
    def made(self) -> Literal["M_f", "M_ef"]:
        return "M_ef" if self.patch is not None else "M_f"


class CellAxes(Config):
    """Where a cell sits in the grid: the value of every axis, and the short labels of its cell id."""

    config_name: ClassVar[str] = "cell axes"

    model: str
    model_label: str
    editor: str | None
    edit_data: str | None
    edit_data_label: str | None
    n_edits: int
    recipe: str
    method: str
    layers: Union[str, tuple[int, ...]]
    targets: Union[str, tuple[str, ...]]
    finetune_data: str
    finetune_data_label: str
    seed: int

    @property
    def label(self) -> str:
        return "/".join([self.model_label, self.editor or "-", self.edit_data_label or "-", f"n{self.n_edits}",
                         self.recipe, self.finetune_data_label, f"s{self.seed}"])


class CellRoles(Config):
    """The stages a cell's numbers come from, by role (a cell without edits has only `finetune_base`)."""

    config_name: ClassVar[str] = "cell roles"

    stats: str | None = None
    targets: str | None = Field(None, exclude_if=lambda v: v is None)     # unset: ids of such cells unchanged
    patch: str | None = None
    eval_base: str | None = None
    finetune_base: str
    eval_finetuned_base: str | None = None
    finetune_edited: str | None = None

    def ids(self) -> dict[str, str]:
        """Role -> stage id, roles the cell has only."""
        return {role: sid for role, sid in self.model_dump().items() if sid is not None}


class CellSpec(StageSpec):
    kind: ClassVar[str] = "cell"
    config_name: ClassVar[str] = "cell stage"

    axes: CellAxes
    roles: CellRoles

    @property
    def seed(self) -> int:
        return self.axes.seed


STAGE_SPECS: dict[str, type[StageSpec]] = {cls.kind: cls for cls in
                                           (StatsSpec, TargetsSpec, PatchSpec, EvaluateSpec, FinetuneSpec, CellSpec)}
STAGE_KINDS = tuple(STAGE_SPECS)


def decode(kind: str, config: dict) -> StageSpec:
    """The typed spec of a stage from its JSON config. StaleSpecError for a config of another editdecay version
    (no `spec_version`, or another one); ConfigError for an unknown kind or a malformed config."""
    if kind not in STAGE_SPECS:
        raise ConfigError(f"stage kind {kind!r} is unknown; kinds: {', '.join(STAGE_KINDS)}")
    version = config.get("spec_version", 1)
    if version != SPEC_VERSION:
        raise StaleSpecError(f"{kind} stage spec version {version} was written by another editdecay (this one "
                             f"reads {SPEC_VERSION}); run `editdecay grid run` with the grid file again: it plans "
                             f"anew and computes the stages of this version")
    return STAGE_SPECS[kind].from_dict(config)


__all__ = ["CellAxes", "CellRoles", "CellSpec", "DataRef", "DownstreamRef", "EditorRef", "EvaluateSpec",
           "FinetuneSpec", "PatchSpec", "SPEC_VERSION", "STAGE_KINDS", "STAGE_SPECS", "StageSpec", "StaleSpecError",
           "StatisticsRef", "StatsSpec", "TargetsSpec", "decode"]
