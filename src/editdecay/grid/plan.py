"""Expand a grid into cells and the content-addressed stages they need (no model, no data, no network).

A cell is one point of the product of the grid's axes. It needs (docs/METHODS.md E7):

    role                  stage kind  what it computes                               shared by
    stats                 stats       E1 key statistics of the edited layers         model x layer set
    targets               targets     E3 target values of the requests, beside E1    model x E3 x data x n x seed
    patch                 patch       the edit (E2-E5) as an EditPatch               model x editor x data x n x seed
    eval_base             evaluate    M0 on the cell's requests (E6)                 model x data x n x seed
    finetune_base         finetune    M_f: the base model fine-tuned with the recipe model x recipe x ft data x seed
    eval_finetuned_base   evaluate    M_f on the cell's requests (E6)                M_f x data x n x seed
    finetune_edited       finetune    M_ef with its decay curve (step 0 = M_e)       one cell
    cell                  cell        the cell's result file, from the above         one cell

A cell with n_edits = 0 needs only `finetune_base` and `cell` (M0 and M_f downstream
scores); it has no editor and no edit data, except that a recipe training the
`edited`/`non-edited` layers keeps the editor, since its layers say which those are.
An editor that needs no E1 statistics (edit/editor.py `needs_statistics`) has no `stats` stage. An editor whose
E3 target values can be computed apart from the edit (`separate_targets`: the locate-then-edit family) has a
`targets` stage when its edit is one batch (`shared.evaluation.edit_batch_size` unset or >= n; later sequential
batches take their targets from the partly edited model): it reads no statistics, so it runs beside the `stats`
stage and the patch waits for max(E1, E3), not their sum; editors with the same E3 settings share it.

Each stage is a typed spec (grid/specs.py). A stage's id is a hash of its kind, of its
spec (everything its output depends on, `spec_version` included) and of the ids of the
stages it reads, so two cells that need the same computation name the same stage and
it runs once. Settings that change how, not what, is computed (device, threads, batch
sizes, cache location, resources) are kept apart in `Plan.runtime` and enter no id.

Editor presets resolve here when the model's family is known without loading it
(the embedded model, a local directory's config.json, or `family:` in the grid);
otherwise the stage carries the editor's fields and resolves the preset when it runs
(less sharing across editors, same results).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from editdecay.core.cache import stable_hash
from editdecay.core.config import did_you_mean
from editdecay.core.errors import ConfigError
from editdecay.core.layers import parse_layers
from editdecay.core.model_ref import ModelRef
from editdecay.core.paths import looks_like_path
from editdecay.data import sources as data_sources
from editdecay.data.source import HELD_OUT
from editdecay.data.sources import EditSelection
from editdecay.edit.config import TargetValuesConfig
from editdecay.finetune.recipe import LAYER_CHOICES, Recipe
from editdecay.grid.spec import EditorEntry, GridSpec, ModelEntry, RecipeEntry
from editdecay.grid.specs import (
    CellAxes,
    CellRoles,
    CellSpec,
    DataRef,
    DownstreamRef,
    EditorRef,
    EvaluateSpec,
    FinetuneSpec,
    PatchSpec,
    StageSpec,
    StatisticsRef,
    StatsSpec,
    TargetsSpec,
    decode,
)

PLAN_FORMAT = 2                 # 1: stage configs of editdecay before the typed specs (readable, not runnable)
READABLE_FORMATS = (1, 2)
SELECTIVE = tuple(c for c in LAYER_CHOICES if c != "all")     # layer choices that refer to the edited layers


@dataclass(frozen=True)
class Stage:
    """One unit of work. `config` is its spec as JSON (what the id hashes); `spec` the typed record."""

    id: str
    kind: str
    config: dict
    deps: tuple[str, ...]
    label: str

    @cached_property
    def spec(self) -> StageSpec:
        """The typed spec (grid/specs.py). StaleSpecError for a stage of a plan written by older editdecay."""
        return decode(self.kind, self.config)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "label": self.label, "deps": list(self.deps), "config": self.config}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        return cls(d["id"], d["kind"], d["config"], tuple(d["deps"]), d["label"])


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid. `stages` maps a role (grid/specs.py CellRoles, plus "cell") to a stage id."""

    id: str
    label: str
    axes: dict
    stages: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["id"], d["label"], d["axes"], dict(d["stages"]))


@dataclass(frozen=True)
class Plan:
    """Cells, their stages in dependency order, and the run-time settings that no stage id depends on."""

    name: str
    cells: tuple[Cell, ...]
    stages: dict[str, Stage]              # insertion order is a valid execution order (deps first)
    runtime: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    format: int = PLAN_FORMAT             # of the file it was read from (1: written by older editdecay)

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise ConfigError(self._unknown([cell_id]))

    def check_cells(self, cell_ids) -> None:
        """ConfigError naming every id of `cell_ids` that is not a cell of this plan, each with the closest id."""
        known = {c.id for c in self.cells}
        unknown = [i for i in dict.fromkeys(cell_ids) if i not in known]
        if unknown:
            raise ConfigError(self._unknown(unknown))

    def _unknown(self, cell_ids: list[str]) -> str:
        # a cell id ends in a hash of its settings: `grid plan` lists the ids; a bare hash names its cell
        ids = [c.id for c in self.cells]
        parts = []
        for cell_id in cell_ids:
            by_hash = [i for i in ids if i.rsplit("-", 1)[-1] == cell_id]
            hint = f" (did you mean {by_hash[0]!r}?)" if len(by_hash) == 1 else did_you_mean(cell_id, ids)
            parts.append(f"{cell_id!r}{hint}")
        what = f"cell {parts[0]} is" if len(parts) == 1 else f"cells {', '.join(parts)} are"
        return f"{what} not in grid {self.name!r}; `editdecay grid plan GRID` lists the cell ids"

    def uses(self) -> dict[str, list[str]]:
        """Stage id -> ids of the cells that need it (directly, by one of their roles)."""
        out: dict[str, list[str]] = {sid: [] for sid in self.stages}
        for c in self.cells:
            for sid in dict.fromkeys(c.stages.values()):
                out[sid].append(c.id)
        return out

    def closure(self, stage_ids) -> list[str]:
        """The stages in `stage_ids` and everything they depend on, in execution order."""
        need: set[str] = set()
        todo = list(stage_ids)
        while todo:
            sid = todo.pop()
            if sid not in need:
                need.add(sid)
                todo.extend(self.stages[sid].deps)
        return [sid for sid in self.stages if sid in need]

    def summary(self) -> dict:
        uses = self.uses()
        kinds: dict[str, dict] = {}
        for sid, st in self.stages.items():
            k = kinds.setdefault(st.kind, {"stages": 0, "uses": 0, "shared": 0})
            k["stages"] += 1
            k["uses"] += len(uses[sid])
            k["shared"] += len(uses[sid]) > 1
        total_uses = sum(k["uses"] for k in kinds.values())
        return {"cells": len(self.cells), "stages": len(self.stages), "stage_uses": total_uses,
                "shared_stages": sum(k["shared"] for k in kinds.values()),
                "uses_saved_by_sharing": total_uses - len(self.stages), "by_kind": kinds}

    def to_dict(self) -> dict:
        uses = self.uses()
        return {"format": self.format, "name": self.name, "summary": self.summary(),
                "cells": [c.to_dict() for c in self.cells],
                "stages": [{**s.to_dict(), "cells": uses[s.id]} for s in self.stages.values()],
                "runtime": self.runtime, "grid": self.grid}

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "plan") -> "Plan":
        """A plan as written by `to_dict`. Format 1 (older editdecay) is read for its cells and states (status,
        report); its stages' specs do not decode, so none of them is run by this version.

        A plan file is data anyone may have edited or cut short: its shape is checked (`_PlanFile`) and so are
        its references (every stage a cell or a stage names is in it); ConfigError names `where`, the key path
        and what is wrong."""
        from pydantic import ValidationError

        from editdecay.core.config import explain

        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a plan is a JSON object, not a {type(d).__name__}")
        fmt = d.get("format")
        if fmt not in READABLE_FORMATS:
            raise ConfigError(f"{where}: plan format {fmt!r} is not supported (this editdecay reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}); a plan written by a newer editdecay needs "
                              f"that version, anything else is not a plan written by editdecay")
        try:
            f = _PlanFile.model_validate(d)
        except ValidationError as e:
            raise ConfigError(f"{where} is not a plan written by editdecay: {explain(e, _PlanFile, limit=5)}") from None
        stages = {s.id: Stage(s.id, s.kind, s.config, tuple(s.deps), s.label) for s in f.stages}
        for s in f.stages:
            unknown = [x for x in s.deps if x not in stages]
            if unknown:
                raise ConfigError(f"{where}: stage {s.id} depends on {unknown[0]!r}, which is not a stage of the plan")
        for c in f.cells:
            unknown = [x for x in c.stages.values() if x not in stages]
            if unknown or "cell" not in c.stages:
                what = (f"names stage {unknown[0]!r}, which is not" if unknown else
                        "has no 'cell' stage, which every cell has")
                raise ConfigError(f"{where}: cell {c.id} {what} in the plan")
        cells = tuple(Cell(c.id, c.label, c.axes, dict(c.stages)) for c in f.cells)
        return cls(f.name, cells, stages, f.runtime, f.grid, fmt)


class _StageEntry(BaseModel):
    model_config = ConfigDict(extra="allow")          # `cells` (who uses it) is written for readers, not read back

    id: str
    kind: str
    label: str
    deps: list[str]
    config: dict


class _CellEntry(BaseModel):
    id: str
    label: str
    axes: dict
    stages: dict[str, str]


class _PlanFile(BaseModel):
    """The shape of plan.json (`Plan.to_dict`), checked when a plan is read back."""

    model_config = ConfigDict(extra="allow")          # `summary` is written for readers, not read back

    format: int
    name: str
    cells: list[_CellEntry]
    stages: list[_StageEntry]
    runtime: dict = Field(default_factory=dict)
    grid: dict = Field(default_factory=dict)


# --------------------------------------------------------------------------- what a (model, seed) shares


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def _resolve_path(text: str, base: Path) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _is_local(name: str, base: Path) -> bool:
    return looks_like_path(name) or (base / name).exists()


@dataclass(frozen=True)
class _Model:
    """A model entry resolved without loading it."""

    entry: ModelEntry
    ref: ModelRef        # name (absolute path for local dirs), revision, dtype, trust_remote_code
    label: str
    family: str | None   # None: unknown until the model is loaded
    embedded: bool


def _resolve_model(entry: ModelEntry, base: Path) -> _Model:
    from editdecay.core.embedded import EMBEDDED_NAME

    name, family = entry.name, entry.family
    embedded = name == EMBEDDED_NAME
    if not embedded and _is_local(name, base):
        name = _resolve_path(name, base)
        cfg = Path(name) / "config.json"
        if family is None and cfg.is_file():
            from editdecay.core.arch import arch_for_model_type

            from editdecay.core.files import MAX_RECORD_BYTES, read_json

            config = read_json(cfg, "models: model config", limit=MAX_RECORD_BYTES, expect=dict)
            model_type = config.get("model_type", "?")
            if not isinstance(model_type, str):
                raise ConfigError(f"models: model config {str(cfg)!r}: model_type={model_type!r} is not a name")
            family = arch_for_model_type(model_type).family
    elif embedded:
        family = family or "llama"
    label = entry.label or (EMBEDDED_NAME if embedded else Path(name.rstrip("/")).name.lower())
    ref = ModelRef(name=name, revision=entry.revision, dtype=entry.dtype, trust_remote_code=entry.trust_remote_code)
    return _Model(entry, ref, label, family, embedded)


@dataclass(frozen=True)
class _Editor:
    """An editor entry resolved for one (model, seed): its ref (full config, or fields over a preset that resolves
    when the model loads) and whether it needs E1 statistics."""

    label: str
    ref: EditorRef
    needs_statistics: bool
    separate_targets: bool

    @property
    def layer_key(self) -> str:
        layers = self.ref.layers
        return json.dumps(list(layers) if self.ref.config is not None else [self.ref.name, layers])

    @property
    def layer_label(self) -> str:
        """The `editor` axis of a fine-tune-only cell whose selective recipe refers to this editor's layers."""
        layers = self.ref.layers
        return "L" + "-".join(map(str, layers)) if layers else f"{self.ref.name}-preset-layers"


def _editor(ctx_model: _Model, entry: EditorEntry, seed: int, grid: GridSpec, where: str) -> _Editor:
    """Explicit editor fields for one (model, editor, seed) -- model overrides < editor overrides, the shared
    statistics settings, the model's edit layers and the seed of the context prefixes (E2) -- validated, over the
    editor's preset when the model's family is known."""
    from editdecay.edit.registry import editor_class, make_config, preset_for

    st = grid.shared.statistics
    fields = {**ctx_model.entry.editor_overrides, **entry.overrides}
    if ctx_model.entry.edit_layers is not None and "layers" not in entry.overrides:
        fields["layers"] = list(ctx_model.entry.edit_layers)
    if "layers" in fields:
        fields["layers"] = list(parse_layers(fields["layers"], field=f"editor {entry.label or entry.name}: layers"))
    try:
        own = editor_class(entry.name).config_class.model_fields
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key, value in (("stats_corpus", st.corpus), ("stats_tokens", st.tokens), ("stats_dtype", st.dtype),
                       ("stats_tolerance", st.tolerance)):
        if value is not None and key in own:          # editors without E1 statistics have no such field
            fields[key] = value
    corpus = fields.get("stats_corpus")
    if isinstance(corpus, str) and data_sources.split_spec(corpus)[0] not in ("generated", "hf"):   # a local file
        fields["stats_corpus"] = _resolve_path(corpus, grid.base_dir)
    fields["seed"] = seed
    try:
        cls = editor_class(entry.name)
        if ctx_model.family is None:            # names and values checked now, the preset when the model loads
            make_config(entry.name, **{"layers": (0,), **fields})
            ref = EditorRef(name=cls.name, fields=fields)
        else:
            preset = preset_for(entry.name, ctx_model.family, ctx_model.ref.name if ctx_model.embedded else None)
            ref = EditorRef(name=cls.name, config=make_config(entry.name, **{**preset, **fields}).to_dict())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return _Editor(entry.label or entry.name, ref, cls.needs_statistics, cls.separate_targets)


@dataclass(frozen=True)
class _Recipe:
    label: str
    recipe: Recipe

    @property
    def selective(self) -> bool:
        return self.recipe.layers in SELECTIVE


def _recipes(entry: RecipeEntry, index: int, seed: int, model: _Model) -> list[_Recipe]:
    """The recipes of one grid entry: the product method x layers x targets, each validated."""
    from editdecay.finetune.recipe import preset

    name = entry.preset or ("embedded" if model.embedded else "study")
    out = []
    for method, layers, targets in itertools.product(entry.method, entry.layers, entry.targets or [None]):
        chosen = {"layers": layers, "seed": seed, **({"targets": targets} if targets is not None else {})}
        try:
            recipe = preset(name, method, **chosen, **entry.overrides)
        except ConfigError as e:
            raise ConfigError(f"recipes[{index}] (method={method}, layers={layers}, targets={targets}): {e}") from None
        if model.ref.dtype != "float32" and recipe.method == "full" and recipe.optimizer == "adamw" \
                and recipe.master_weights is None:
            # Training then keeps float32 master weights by default (finetune/precision.py needs_master); writing
            # that into the stage spec gives such stages an id of their own, so a low-precision full fine-tuning
            # stage computed before master weights existed is recomputed rather than reused under the new meaning.
            recipe = recipe.replace(master_weights=True)
        out.append(_Recipe(_recipe_label(entry, method, layers, targets), recipe))
    return out


def _recipe_label(entry: RecipeEntry, method: str, layers, targets) -> str:
    if entry.label:
        return entry.label
    lay = layers if isinstance(layers, str) else "L" + "-".join(map(str, layers))
    if targets is None:
        return f"{method}-{lay}"
    tgt = targets if isinstance(targets, str) else "+".join(targets)
    return f"{method}-{lay}-{tgt}"


@dataclass(frozen=True)
class _GridData:
    """The grid's data, resolved once: specs with absolute paths, digests, labels, the held-out task and the
    lm-eval downstream tasks."""

    edit: tuple[str, ...]
    finetune: tuple[DataRef, ...]
    digests: dict[str, str | None]
    labels: dict[str, str]
    held_out: DataRef | None             # the held-out task named in `downstream` (its bare spec)
    downstream: DownstreamRef | None

    @classmethod
    def of(cls, grid: GridSpec) -> "_GridData":
        from editdecay.measure.downstream.spec import parse_task, task_digest

        base = grid.base_dir
        edit = tuple(data_sources.resolve_paths(d, base) for d in grid.edit_data)
        ft = [data_sources.resolve_paths(d, base) for d in grid.finetune_data]
        digests = {d: data_sources.digest(d) for d in dict.fromkeys((*edit, *ft))}
        held_names = data_sources.names(HELD_OUT)
        held = [t for t in grid.shared.downstream if t in held_names]
        lm_tasks = tuple(parse_task(t, base) for t in grid.shared.downstream if t not in held_names)
        shared = grid.shared
        downstream = (DownstreamRef(tasks=lm_tasks, limit=shared.downstream_limit,
                                    digests={t: task_digest(t) for t in lm_tasks}, num_beams=shared.downstream_num_beams,
                                    max_new_tokens=shared.downstream_max_new_tokens, prompt=shared.downstream_prompt)
                      if lm_tasks else None)
        return cls(edit, tuple(DataRef(spec=d, digest=digests[d], settings=_settings(grid, d)) for d in ft), digests,
                   {**data_sources.labels(edit), **data_sources.labels(ft)},
                   _ref(grid, held[0]) if held else None, downstream)

    def held_out_for(self, ft: DataRef) -> DataRef | None:
        """The held-out task scored while fine-tuning on `ft`: `ft`'s own split when it is the same source (its
        directory, its settings: one task object), else the task named in `downstream`."""
        if self.held_out is None:
            return None
        same = data_sources.source_of(self.held_out.spec) is data_sources.source_of(ft.spec)
        return ft if same else self.held_out


def _settings(grid: GridSpec, spec: str) -> dict | None:
    """The source's settings: the grid's `shared.<settings_key>` section (data/source.py), or None."""
    key = data_sources.source_of(spec).settings_key
    section = getattr(grid.shared, key, None) if key else None
    return section.model_dump() if section is not None else None


def _ref(grid: GridSpec, spec: str) -> DataRef:
    return DataRef(spec=spec, digest=data_sources.digest(spec), settings=_settings(grid, spec))


@dataclass(frozen=True)
class PlanContext:
    """Everything the stages of one (model, seed) share: the grid, its resolved data, the model, the editors and
    recipes resolved for them."""

    grid: GridSpec
    data: _GridData
    model: _Model
    seed: int
    editors: tuple[_Editor, ...]
    recipes: tuple[_Recipe, ...]

    @classmethod
    def of(cls, grid: GridSpec, data: _GridData, index: int, model: _Model, seed: int) -> "PlanContext":
        editors = tuple(_editor(model, e, seed, grid, f"models[{index}] ({model.label}) with editors[{i}] ({e.name})")
                        for i, e in enumerate(grid.editors))
        recipes = tuple(r for i, entry in enumerate(grid.recipes) for r in _recipes(entry, i, seed, model))
        names = [r.label for r in recipes]
        dup = sorted({lab for lab in names if names.count(lab) > 1})
        if dup:
            raise ConfigError(f"recipes: two recipes are both called {dup[0]!r}; give them distinct labels")
        for r in recipes:
            if r.selective and not editors:
                raise ConfigError(f"recipes: {r.label!r} trains the {r.recipe.layers!r} layers, which the editor "
                                  f"defines; add an editor to `editors`")
        return cls(grid, data, model, seed, editors, recipes)

    def requests(self, data: str, n: int) -> EditSelection:
        ev = self.grid.shared.evaluation
        return EditSelection(data=data, n=n, seed=self.seed, zsre_target=ev.zsre_target, strict=ev.strict,
                             digest=self.data.digests[data])

    def axes(self, editor: str | None, data: str | None, n: int, ft: DataRef, recipe: _Recipe) -> CellAxes:
        labels = self.data.labels
        return CellAxes(model=self.model.ref.name, model_label=self.model.label, editor=editor, edit_data=data,
                        edit_data_label=labels[data] if data else None, n_edits=n, recipe=recipe.label,
                        method=recipe.recipe.method, layers=recipe.recipe.layers, targets=recipe.recipe.targets,
                        finetune_data=ft.spec, finetune_data_label=labels[ft.spec], seed=self.seed)


# --------------------------------------------------------------------------- building


class IdView:
    """A stage config as it is hashed into stage and cell ids: every path that the grid file spells relative
    (`zsre:../data/z.json`, `../models/tiny`, a statistics corpus, a downstream task's file, `.`), which the
    configs carry resolved to an absolute path so that a stage runs from any directory, is hashed as it is spelled
    (normalised: `zsre:@grid/../data/z.json`). Paths spelled absolute stay as they are.

    So two clones of a repository, wherever they lie, plan the same ids for a grid whose data lies beside it (or
    behind a symlink the grid names), and a run directory is reused from either; the content digests in the
    configs still refuse changed data. Built from every string of the grid (`GridSpec.model_dump`): each piece of
    one (the whole string and its parts between ':') that is not absolute is resolved as the planner resolves
    paths, `(base / piece).resolve()`; a config string is rewritten only where such a resolved path is a whole
    path in it (not the directory of a longer path), so an absolute spelling is never touched."""

    def __init__(self, grid: GridSpec) -> None:
        base = grid.base_dir
        found: dict[str, str] = {}
        for text in _strings(grid.model_dump(mode="json")):
            if not text or "://" in text or "\n" in text or len(text) > 4096:
                continue
            for piece in dict.fromkeys((text, *text.split(":"))):
                if piece and not piece.startswith(("/", "~")):
                    found.setdefault(str((base / piece).resolve()), "@grid/" + os.path.normpath(piece))
        keys = sorted(found, key=len, reverse=True)
        self._found = found
        self._pattern = re.compile("(?:" + "|".join(map(re.escape, keys)) + r")(?![\w.\-/])") if keys else None

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        if isinstance(value, str) and self._pattern is not None:
            return self._pattern.sub(lambda m: self._found[m.group(0)], value)
        return value


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class _Builder:
    def __init__(self, id_view: IdView) -> None:
        self.id_view = id_view
        self.stages: dict[str, Stage] = {}

    def add(self, spec: StageSpec, deps: tuple[str, ...], label: str) -> str:
        config = spec.to_config()
        key = {"kind": spec.kind, "config": self.id_view(config), "deps": list(deps)}
        sid = f"{spec.kind}-{stable_hash(key, 16)}"
        if sid not in self.stages:
            stage = Stage(sid, spec.kind, config, deps, label)
            stage.__dict__["spec"] = spec          # the record it was built from (cached_property's slot)
            self.stages[sid] = stage
        return sid


def build_plan(spec: GridSpec) -> Plan:
    """Every cell of `spec` and the stages it needs. Validates editor overrides and recipes against the
    real config classes; loads no model and reads no data."""
    sh = spec.shared
    b = _Builder(IdView(spec))
    data = _GridData.of(spec)
    cells: list[Cell] = []
    models = [_resolve_model(m, spec.base_dir) for m in spec.models]
    for index, model in enumerate(models):
        for seed in spec.seeds:
            ctx = PlanContext.of(spec, data, index, model, seed)
            for ft, recipe, n in itertools.product(data.finetune, ctx.recipes, spec.n_edits):
                cells += _cells(b, ctx, ft, recipe, n)
    # Execution order: cheap stages that fail early (bad data, bad layers) before expensive ones; within a rank,
    # plan order. Every stage's dependencies have a lower rank.
    stages = {s.id: s for s in sorted(b.stages.values(), key=_rank)}
    _check_order(stages)
    runtime = {
        "cache_dir": _resolve_path(sh.cache_dir, spec.base_dir) if sh.cache_dir else None, "device": sh.device,
        "threads": sh.threads, "max_attempts": sh.max_attempts, "eval_batch_size": sh.evaluation.batch_size,
        "stats_batch_size": sh.statistics.batch_size,
        # How fine-tuning stages run (one process, or sharded over N: the same numbers), so no stage id has it.
        "finetune_devices": sh.finetune_devices,
        "resources": {k: spec.resources.for_kind(k).model_dump()
                      for k in ("stats", "targets", "patch", "finetune", "evaluate")},
        "slurm": spec.slurm.model_dump(), "ray": spec.ray.model_dump(), "base_dir": str(spec.base_dir),
        # Permission to unpickle weights: asked for per model in the grid file, given to the stages at run time
        # (it changes whether a model may load, never what a stage computes, so it enters no stage id).
        "allow_pickle": sorted({m.ref.name for m in models if m.entry.allow_pickle}),
    }
    _check_unique(cells)
    return Plan(spec.name, tuple(cells), stages, runtime, spec.model_dump(mode="json"))


def _cells(b: _Builder, ctx: PlanContext, ft: DataRef, recipe: _Recipe, n: int) -> list[Cell]:
    """The cells of one (fine-tuning data, recipe, number of edits) for the context's model and seed."""
    if n == 0:
        # One fine-tune-only cell per distinct M_f: editors that edit the same layers define the same
        # `edited`/`non-edited` layers and share it.
        out = []
        for editor in _distinct_layer_sets(ctx.editors) if recipe.selective else [None]:
            mf = _finetune_base(b, ctx, ft, recipe, editor)
            axes = ctx.axes(editor.layer_label if editor else None, None, 0, ft, recipe)
            out.append(_cell(b, axes, CellRoles(finetune_base=mf)))
        return out
    out = []
    for editor in ctx.editors:
        mf = _finetune_base(b, ctx, ft, recipe, editor if recipe.selective else None)
        out += [_edited_cell(b, ctx, editor, data, n, ft, recipe, mf) for data in ctx.data.edit]
    return out


def _distinct_layer_sets(editors: tuple[_Editor, ...]) -> list[_Editor]:
    return list({e.layer_key: e for e in reversed(editors)}.values())[::-1]


def _finetune(ctx: PlanContext, ft: DataRef, recipe: _Recipe, *, editor: _Editor | None = None,
              patch: str | None = None, control: int = 0) -> FinetuneSpec:
    """A finetune stage's spec; `editor`: whose layers an `edited`/`non-edited` recipe of M_f refers to."""
    layers = editor.ref.layers if editor else None
    by = EditorRef(name=editor.ref.name) if editor and layers is None else None     # the preset's, once loaded
    return FinetuneSpec(model=ctx.model.ref, recipe=recipe.recipe, data=ft, held_out=ctx.data.held_out_for(ft),
                        downstream=ctx.data.downstream, eval_every=ctx.grid.shared.evaluation.eval_every,
                        edited_layers=layers, edited_by=by, patch=patch, control=control)


def _finetune_base(b: _Builder, ctx: PlanContext, ft: DataRef, recipe: _Recipe, editor: _Editor | None) -> str:
    """The M_f stage: the base model fine-tuned with `recipe`. For an `edited`/`non-edited` recipe `editor` says
    which layers are the edited ones (editors with the same layers share it); otherwise M_f does not depend on the
    editor at all (one M_f per model x recipe x data x seed)."""
    spec = _finetune(ctx, ft, recipe, editor=editor)
    return b.add(spec, (), f"M_f {ctx.model.label} {recipe.label} {ctx.data.labels[ft.spec]} s{ctx.seed}")


def _stats(b: _Builder, ctx: PlanContext, editor: _Editor) -> str | None:
    """The E1 statistics stage of an editor's layers (None for an editor that needs none). Resolved: shared by every
    editor with the same layers and statistics settings; else keyed by the fields that decide them."""
    if not editor.needs_statistics:
        return None
    ref = editor.ref
    if ref.config is not None:
        from editdecay.edit.registry import make_config

        stats = StatsSpec(model=ctx.model.ref, statistics=StatisticsRef.of(make_config(ref.name, **ref.config)))
        label = f"E1 {ctx.model.label} {list(stats.statistics.layers)}"
    else:
        keep = ("layers", "stats_corpus", "stats_tokens", "stats_dtype", "stats_tolerance")
        fields = {k: v for k, v in ref.fields.items() if k in keep}
        stats = StatsSpec(model=ctx.model.ref, editor=EditorRef(name=ref.name, fields=fields))
        label = f"E1 {ctx.model.label} {ref.name}"
    return b.add(stats, (), label)


def _targets(b: _Builder, ctx: PlanContext, editor: _Editor, requests: EditSelection, n: int,
             where: str) -> str | None:
    """The E3 target values stage of an edit (None: the editor has none, or the edit runs in several sequential
    batches). Resolved: shared by every editor with the same E3 settings; else keyed by the fields that decide
    them."""
    batch = ctx.grid.shared.evaluation.edit_batch_size
    if not editor.separate_targets or (batch is not None and batch < n):
        return None
    ref = editor.ref
    if ref.config is not None:
        from editdecay.edit.registry import make_config

        values = TargetValuesConfig.of(make_config(ref.name, **ref.config))
        spec = TargetsSpec(model=ctx.model.ref, requests=requests, values=values)
        return b.add(spec, (), f"E3 {ctx.model.label} l*={values.layer} {where}")
    keep = ("layers", *TargetValuesConfig.FIELDS)
    spec = TargetsSpec(model=ctx.model.ref, requests=requests,
                       editor=EditorRef(name=ref.name, fields={k: v for k, v in ref.fields.items() if k in keep}))
    return b.add(spec, (), f"E3 {ctx.model.label} {ref.name} {where}")


def _edited_cell(b: _Builder, ctx: PlanContext, editor: _Editor, data: str, n: int, ft: DataRef, recipe: _Recipe,
                 mf: str) -> Cell:
    """A cell with edits: statistics and target values -> patch -> M_ef, plus M0 and M_f measured on its
    requests."""
    model, where = ctx.model, f"{ctx.data.labels[data]} n{n} s{ctx.seed}"
    requests = ctx.requests(data, n)
    stats = _stats(b, ctx, editor)
    targets = _targets(b, ctx, editor, requests, n, where)
    patch = b.add(PatchSpec(model=model.ref, editor=editor.ref, requests=requests,
                            batch_size=ctx.grid.shared.evaluation.edit_batch_size, targets=targets),
                  tuple(d for d in (stats, targets) if d), f"{editor.label} {model.label} {where}")
    n_control = ctx.grid.shared.evaluation.n_control
    control = n if n_control is None else n_control
    eval_base = b.add(EvaluateSpec(model=model.ref, requests=requests, control=control), (), f"M0 {model.label} {where}")
    eval_mf = b.add(EvaluateSpec(model=model.ref, requests=requests, finetune=mf, control=control), (mf,),
                    f"M_f {model.label} {recipe.label} on {where}")
    mef = b.add(_finetune(ctx, ft, recipe, patch=patch, control=control), (patch,),
                f"M_ef {model.label} {editor.label} {ctx.data.labels[data]} n{n} {recipe.label} s{ctx.seed}")
    roles = CellRoles(stats=stats, targets=targets, patch=patch, eval_base=eval_base, finetune_base=mf,
                      eval_finetuned_base=eval_mf, finetune_edited=mef)
    return _cell(b, ctx.axes(editor.label, data, n, ft, recipe), roles)


def _cell(b: _Builder, axes: CellAxes, roles: CellRoles) -> Cell:
    ids = roles.ids()
    sid = b.add(CellSpec(axes=axes, roles=roles), tuple(dict.fromkeys(ids.values())), axes.label)
    cid = f"{_slug(axes.label.replace('/', '_'))}-{sid.split('-', 1)[1][:8]}"
    return Cell(cid, axes.label, axes.to_dict(), {**ids, "cell": sid})


def missing_files(plan: Plan) -> list[str]:
    """Local models, data files and corpus files the plan names that do not exist (yet): a grid may be planned
    before its data is downloaded, so these are warnings here and errors in the stage that needs them."""
    paths: dict[str, str] = {}

    def data(spec: str | None, what: str) -> None:
        if spec is None:
            return
        parsed = data_sources.parse_spec(spec)
        if data_sources.source_of(parsed).local_path and parsed.argument.startswith("/"):
            paths[parsed.argument] = what

    for st in plan.stages.values():
        s = st.spec
        model = getattr(s, "model", None)
        if model is not None and model.name.startswith("/"):
            paths[model.name] = "model directory"
        requests = getattr(s, "requests", None)
        data(requests.data if requests else None, "edit data")
        if isinstance(s, FinetuneSpec):
            data(s.data.spec, "fine-tuning data")
            for t in s.downstream.tasks if s.downstream else ():
                kind, rest = data_sources.split_spec(t)
                if kind in ("local", "ppl"):
                    paths[rest] = "downstream task data"
                elif kind == "commonsense":
                    from editdecay.measure.downstream.commonsense import spec_parts

                    paths[str(spec_parts(t)[0])] = "downstream task data"
        if isinstance(s, StatsSpec):
            corpus = s.statistics.corpus if s.statistics else s.editor.fields.get("stats_corpus")
            if isinstance(corpus, str) and corpus.startswith("/"):
                paths[corpus] = "statistics corpus"
    return [f"{what} {p} does not exist" for p, what in paths.items() if not Path(p).exists()]


def _rank(s: Stage) -> int:
    """Plan order (workers take ready stages in it): what the edits wait for first (E1 and E3 side by side on two
    workers), then the edit, M0, M_f, M_ef."""
    spec = s.spec
    if isinstance(spec, EvaluateSpec):
        return 3 if spec.finetune is None else 5       # M0 before M_f exists; M_f after it
    if isinstance(spec, FinetuneSpec):
        return 4 if spec.patch is None else 6          # M_f, then M_ef
    return {"stats": 0, "targets": 1, "patch": 2, "cell": 7}[s.kind]


def _check_order(stages: dict[str, Stage]) -> None:
    seen: set[str] = set()
    for sid, st in stages.items():
        missing = [d for d in st.deps if d not in seen]
        if missing:
            raise RuntimeError(f"plan order: stage {sid} comes before its dependency {missing[0]}")
        seen.add(sid)


def _check_unique(cells: list[Cell]) -> None:
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"two cells of the grid are the same configuration ({dup[0]}); remove the repeated "
                          f"axis value")


__all__ = ["Cell", "PLAN_FORMAT", "Plan", "PlanContext", "Stage", "build_plan", "missing_files"]
