"""Expand a grid into cells and the content-addressed stages they need (no model, no data, no network).

A cell is one point of the product of the grid's axes. It needs (ALGORITHMS.md E7):

    role                  stage kind  what it computes                               shared by
    stats                 stats       E1 key statistics of the edited layers         model x layer set
    patch                 patch       the edit (E2-E5) as an EditPatch               model x editor x data x n x seed
    eval_base             evaluate    M0 on the cell's requests (E6)                 model x data x n x seed
    finetune_base         finetune    M_f: the base model fine-tuned with the recipe model x recipe x ft data x seed
    eval_finetuned_base   evaluate    M_f on the cell's requests (E6)                M_f x data x n x seed
    finetune_edited       finetune    M_ef with its decay curve (step 0 = M_e)       one cell
    cell                  cell        the cell's result file, from the above         one cell

A cell with n_edits = 0 needs only `finetune_base` and `cell` (M0 and M_f downstream
scores); it has no editor and no edit data, except that a recipe training the
`edited`/`non-edited` layers keeps the editor, since its layers say which those are.

A stage's id is a hash of its kind, of everything its output depends on (its
`config`) and of the ids of the stages it reads, so two cells that need the same
computation name the same stage and it runs once. Settings that change how, not
what, is computed (device, threads, batch sizes, cache location, resources) are
kept apart in `Plan.runtime` and do not enter any id.

Editor presets resolve here when the model's family is known without loading it
(the embedded model, a local directory's config.json, or `family:` in the grid);
otherwise the stage carries the preset name and the overrides and resolves them
when it runs (less sharing across editors, same results).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from editdecay.core.cache import stable_hash
from editdecay.core.errors import ConfigError
from editdecay.core.paths import looks_like_path
from editdecay.grid.spec import (
    DOWNSTREAM_TASKS,
    EditorEntry,
    GridSpec,
    ModelEntry,
    RecipeEntry,
)

PLAN_FORMAT = 1
ROLE_ORDER = ("stats", "patch", "eval_base", "finetune_base", "eval_finetuned_base", "finetune_edited", "cell")
EDITED_ROLES = ROLE_ORDER[:3] + ROLE_ORDER[4:6]      # roles a cell without edits does not have
SELECTIVE = ("edited", "non-edited")


@dataclass(frozen=True)
class Stage:
    """One unit of work. `config` is JSON and holds everything the output depends on."""

    id: str
    kind: str
    config: dict
    deps: tuple[str, ...]
    label: str

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "label": self.label, "deps": list(self.deps), "config": self.config}

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        return cls(d["id"], d["kind"], d["config"], tuple(d["deps"]), d["label"])


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid. `stages` maps a role (ROLE_ORDER) to a stage id."""

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

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise ConfigError(f"cell {cell_id!r} is not in grid {self.name!r}")

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
        return {"format": PLAN_FORMAT, "name": self.name, "summary": self.summary(),
                "cells": [c.to_dict() for c in self.cells],
                "stages": [{**s.to_dict(), "cells": uses[s.id]} for s in self.stages.values()],
                "runtime": self.runtime, "grid": self.grid}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise ConfigError(f"plan format {d.get('format')!r} is not supported (expected {PLAN_FORMAT})")
        stages = {s["id"]: Stage.from_dict(s) for s in d["stages"]}
        return cls(d["name"], tuple(Cell.from_dict(c) for c in d["cells"]), stages, d.get("runtime", {}),
                   d.get("grid", {}))


# --------------------------------------------------------------------------- resolution helpers


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def _resolve_path(text: str, base: Path) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_data(spec: str, base: Path) -> str:
    """`kind:PATH` with PATH made absolute (relative to the grid file); other specs unchanged."""
    kind, sep, rest = spec.partition(":")
    if (kind in FILE_KINDS or kind == "chatterbot") and rest:
        return f"{kind}:{_resolve_path(rest, base)}"
    return spec


FILE_KINDS = ("counterfact", "mcf", "multicounterfact", "zsre", "instructions", "text")


def data_digest(spec: str) -> str | None:
    """Content hash of the data behind a spec, part of the ids of the stages that read it: edited data means
    new stages, never a silent mix of old and new. A file that does not exist yet hashes to "missing" (a grid
    may be planned before its data is downloaded); the bundled `worldfacts` set and the `chatterbot` corpus
    (the installed package's English files, or `chatterbot:DIR`) hash their files; generated (`embedded`)
    and hub (`hf:`) data are named by their spec alone."""
    import hashlib

    kind, _, rest = spec.partition(":")
    if kind in FILE_KINDS and rest:
        from editdecay.core.cache import sha256_file

        return sha256_file(Path(rest))[:16] if Path(rest).is_file() else "missing"
    if kind == "worldfacts":
        from importlib import resources

        root = resources.files("editdecay.data")
        h = hashlib.sha256()
        names = sorted(x.name for x in root.iterdir() if x.name.startswith("worldfacts") and x.name.endswith(".json"))
        for name in names:
            h.update(name.encode() + b"\0" + root.joinpath(name).read_bytes())
        return h.hexdigest()[:16]
    if kind == "chatterbot":
        from editdecay.data.chatterbot import files_digest, package_root

        root = Path(rest) if rest else package_root()
        return files_digest(root) if root.is_dir() else "missing"
    return None


def task_objects(c: dict) -> tuple[object | None, object | None]:
    """(the task behind a finetune stage's data, the task whose held-out split it scores), from its config:
    `task` (the embedded task's settings) and `chatterbot` (the corpus' split settings; the corpus is the
    fine-tuning data's directory for `chatterbot:DIR`, else the installed package's). Either may be None."""
    from editdecay.data.chatterbot import ChatterbotCorpus
    from editdecay.data.embedded_task import EmbeddedTask

    kind, _, rest = c["data"].partition(":")
    embedded = EmbeddedTask(**c["task"]) if c.get("task") else None
    chatter = (ChatterbotCorpus(root=rest if kind == "chatterbot" and rest else None, **c["chatterbot"])
               if c.get("chatterbot") is not None else None)
    source_task = chatter if kind == "chatterbot" else embedded
    downstream = c.get("downstream") or []
    scored = embedded if "embedded" in downstream else chatter if "chatterbot" in downstream else None
    return source_task, scored


def check_data_digest(spec: str, planned: str | None) -> None:
    """Raise DataError if the data behind `spec` changed since the plan was made (ids would be stale)."""
    from editdecay.core.errors import DataError

    now = data_digest(spec)
    if planned is not None and now != planned:
        raise DataError(f"data {spec!r} changed since this grid was planned (content {planned} -> {now}); run "
                        f"`editdecay grid run` again: it plans anew and computes the stages of the new data")


def _data_labels(specs: list[str]) -> dict[str, str]:
    """Short names for data specs in cell labels: the source kind, or the file's stem where two specs of
    one kind (or any file-backed fine-tuning data) need telling apart."""
    kinds = [s.partition(":")[0] for s in specs]
    out = {}
    for spec, kind in zip(specs, kinds):
        rest = spec.partition(":")[2]
        if not rest or kinds.count(kind) == 1 and kind in ("worldfacts", "counterfact", "mcf", "multicounterfact",
                                                             "zsre"):
            out[spec] = kind
        elif kind == "hf":
            out[spec] = rest.split(":")[0].split("/")[-1]
        else:
            out[spec] = Path(rest).stem if kinds.count(kind) == 1 else f"{kind}-{Path(rest).stem}"
    return out


def _is_local(name: str, base: Path) -> bool:
    return looks_like_path(name) or (base / name).exists()


@dataclass(frozen=True)
class _Model:
    """A model entry resolved without loading it."""

    entry: ModelEntry
    ref: dict            # identity: name (absolute path for local dirs), revision, dtype, trust_remote_code
    label: str
    family: str | None   # None: unknown until the model is loaded
    embedded: bool


def _resolve_model(entry: ModelEntry, base: Path) -> _Model:
    from editdecay.core.models import EMBEDDED_NAME

    name, family = entry.name, entry.family
    embedded = name == EMBEDDED_NAME
    if not embedded and _is_local(name, base):
        name = _resolve_path(name, base)
        cfg = Path(name) / "config.json"
        if family is None and cfg.is_file():
            from editdecay.core.arch import arch_for_model_type

            try:
                model_type = json.loads(cfg.read_text()).get("model_type", "?")
            except (OSError, ValueError) as e:
                raise ConfigError(f"models: {cfg} is not readable JSON ({e})") from None
            family = arch_for_model_type(model_type).family
    elif embedded:
        family = family or "llama"
    label = entry.label or (EMBEDDED_NAME if embedded else Path(name.rstrip("/")).name.lower())
    ref = {"name": name, "revision": entry.revision, "dtype": entry.dtype, "trust_remote_code": entry.trust_remote_code}
    return _Model(entry, ref, label, family, embedded)


def _editor_fields(model: _Model, editor: EditorEntry, seed: int, spec: GridSpec) -> dict:
    """Explicit editor-config fields for one (model, editor, seed): model overrides < editor overrides,
    plus shared statistics settings, the model's edit layers and the seed of the context prefixes (E2)."""
    st = spec.shared.statistics
    fields = {**model.entry.editor_overrides, **editor.overrides}
    if model.entry.edit_layers is not None and "layers" not in editor.overrides:
        fields["layers"] = list(model.entry.edit_layers)
    if isinstance(fields.get("layers"), str):
        from editdecay.grid.spec import parse_layer_text

        fields["layers"] = list(parse_layer_text(fields["layers"]))
    for key, value in (("stats_corpus", st.corpus), ("stats_tokens", st.tokens), ("stats_dtype", st.dtype),
                       ("stats_tolerance", st.tolerance)):
        if value is not None:
            fields[key] = value
    corpus = fields.get("stats_corpus")
    if isinstance(corpus, str) and not corpus.startswith(("generated", "hf:")):    # a local file
        fields["stats_corpus"] = _resolve_path(corpus, spec.base_dir)
    fields["seed"] = seed
    return fields


def _editor_config(model: _Model, editor: EditorEntry, fields: dict, where: str) -> dict | None:
    """The full editor config when the preset is known (validated), else None (resolved when the stage runs).
    Override names and values are validated either way."""
    from editdecay.edit import make_config
    from editdecay.edit.presets import preset_for

    try:
        if model.family is None:
            make_config(editor.name, **{"layers": (0,), **fields})
            return None
        merged = {**preset_for(editor.name, model.family, model.ref["name"] if model.embedded else None), **fields}
        return make_config(editor.name, **merged).model_dump(mode="json")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _recipe(entry: RecipeEntry, index: int, method: str, layers, targets, seed: int, model: _Model):
    from editdecay.finetune.recipe import preset

    name = entry.preset or ("embedded" if model.embedded else "study")
    chosen = {"layers": layers, "seed": seed, **({"targets": targets} if targets is not None else {})}
    try:
        return preset(name, method, **chosen, **entry.overrides)
    except ConfigError as e:
        raise ConfigError(f"recipes[{index}] (method={method}, layers={layers}, targets={targets}): {e}") from None


def _recipe_label(entry: RecipeEntry, method: str, layers, targets) -> str:
    if entry.label:
        return entry.label
    lay = layers if isinstance(layers, str) else "L" + "-".join(map(str, layers))
    if targets is None:
        return f"{method}-{lay}"
    tgt = targets if isinstance(targets, str) else "+".join(targets)
    return f"{method}-{lay}-{tgt}"


# --------------------------------------------------------------------------- building


class _Builder:
    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}

    def add(self, kind: str, config: dict, deps: tuple[str, ...], label: str) -> str:
        sid = f"{kind}-{stable_hash({'kind': kind, 'config': config, 'deps': list(deps)}, 16)}"
        if sid not in self.stages:
            self.stages[sid] = Stage(sid, kind, config, deps, label)
        return sid


def build_plan(spec: GridSpec) -> Plan:
    """Every cell of `spec` and the stages it needs. Validates editor overrides and recipes against the
    real config classes; loads no model and reads no data."""
    base = spec.base_dir
    sh = spec.shared
    ev = sh.evaluation
    b = _Builder()
    cells: list[Cell] = []
    models = [_resolve_model(m, base) for m in spec.models]
    edit_data = [_resolve_data(d, base) for d in spec.edit_data]
    ft_data = [_resolve_data(d, base) for d in spec.finetune_data]
    labels = {**_data_labels(edit_data), **_data_labels(ft_data)}
    digests = {d: data_digest(d) for d in dict.fromkeys(edit_data + ft_data)}
    uses_task = "embedded" in sh.downstream or any(d == "embedded" for d in ft_data)
    task = sh.embedded_task.model_dump() if uses_task else None
    downstream = _downstream_config(spec)

    for mi, model in enumerate(models):
        for seed in spec.seeds:
            # Resolve every (editor, recipe) once per model and seed; the loops below only combine ids.
            editors = []
            for ei, editor in enumerate(spec.editors):
                fields = _editor_fields(model, editor, seed, spec)
                where = f"models[{mi}] ({model.label}) with editors[{ei}] ({editor.name})"
                editors.append((editor, fields, _editor_config(model, editor, fields, where)))
            recipes = []
            for ri, entry in enumerate(spec.recipes):
                for method in entry.method:
                    for layers in entry.layers:
                        for targets in entry.targets or [None]:
                            r = _recipe(entry, ri, method, layers, targets, seed, model)
                            recipes.append((_recipe_label(entry, method, layers, targets), r))
            names = [lab for lab, _ in recipes]
            dup = sorted({lab for lab in names if names.count(lab) > 1})
            if dup:
                raise ConfigError(f"recipes: two recipes are both called {dup[0]!r}; give them distinct labels")

            for ft in ft_data:
                for rlabel, recipe in recipes:
                    selective = recipe.layers in SELECTIVE
                    if selective and not editors:
                        raise ConfigError(f"recipes: {rlabel!r} trains the {recipe.layers!r} layers, which the "
                                          f"editor defines; add an editor to `editors`")
                    for n in spec.n_edits:
                        if n == 0:
                            # One fine-tune-only cell per distinct M_f: editors that edit the same layers
                            # define the same `edited`/`non-edited` layers and share it.
                            for editor_fields in _distinct_layer_sets(editors) if selective else [None]:
                                mf = _finetune_base(b, model, recipe, rlabel, editor_fields, ft, task, spec,
                                                    labels, digests, seed, downstream)
                                axes = _axes(model, _layer_set_label(editor_fields), None, 0, rlabel, recipe, ft,
                                             seed, labels)
                                cells.append(_cell(b, axes, {"finetune_base": mf}))
                            continue
                        for editor_fields in editors:
                            mf = _finetune_base(b, model, recipe, rlabel, editor_fields if selective else None, ft,
                                                task, spec, labels, digests, seed, downstream)
                            for data in edit_data:
                                cells.append(_edited_cell(b, model, editor_fields, data, n, seed, ft, rlabel, recipe,
                                                          task, spec, labels, digests, mf, downstream))
    # Execution order: cheap stages that fail early (bad data, bad layers) before expensive ones; within a rank,
    # plan order. Every stage's dependencies have a lower rank.
    stages = {s.id: s for s in sorted(b.stages.values(), key=_rank)}
    _check_order(stages)
    runtime = {
        "cache_dir": _resolve_path(sh.cache_dir, base) if sh.cache_dir else None, "device": sh.device,
        "threads": sh.threads, "max_attempts": sh.max_attempts, "finetune_devices": sh.finetune_devices, "eval_batch_size": ev.batch_size, "stats_batch_size": sh.statistics.batch_size,
        "resources": {k: spec.resources.for_kind(k).model_dump() for k in ("stats", "patch", "finetune", "evaluate")},
        "slurm": spec.slurm.model_dump(), "ray": spec.ray.model_dump(), "base_dir": str(base),
    }
    _check_unique(cells)
    return Plan(spec.name, tuple(cells), stages, runtime, spec.model_dump(mode="json"))


def _downstream_config(spec: GridSpec) -> dict:
    """The finetune stages' downstream keys: the task list with `local:`/`ppl:` paths made absolute and, when
    there are lm-eval tasks, their limit and data digests (a changed corpus or task directory names new
    stages). A grid with only the embedded task keeps exactly the keys (and stage ids) it always had."""
    from editdecay.measure.downstream.spec import parse_task, task_digest

    tasks = [t if t in DOWNSTREAM_TASKS else parse_task(t, spec.base_dir) for t in spec.shared.downstream]
    lm_tasks = [t for t in tasks if t not in DOWNSTREAM_TASKS]
    # The chatterbot corpus' split settings, only where the grid uses it (other grids keep their stage ids).
    uses_chatterbot = "chatterbot" in tasks or any(d.partition(":")[0] == "chatterbot" for d in spec.finetune_data)
    extra = {"chatterbot": spec.shared.chatterbot.model_dump()} if uses_chatterbot else {}
    if not lm_tasks:
        return {"downstream": tasks, **extra}
    return {"downstream": tasks, "downstream_limit": spec.shared.downstream_limit,
            "downstream_digests": {t: task_digest(t) for t in lm_tasks}, **extra}


def _finetune_base(b: _Builder, model: _Model, recipe, rlabel: str, editor_fields, ft: str, task: dict | None,
                   spec: GridSpec, labels: dict[str, str], digests: dict[str, str | None], seed: int,
                   downstream: dict) -> str:
    """The M_f stage: the base model fine-tuned with `recipe`. For an `edited`/`non-edited` recipe
    `editor_fields` says which layers are the edited ones; otherwise it is None and M_f does not depend on
    the editor at all (one M_f per model x recipe x data x seed)."""
    edited = None
    if editor_fields is not None:
        editor, fields, cfg = editor_fields
        edited = cfg["layers"] if cfg else {"editor": editor.name, "layers": fields.get("layers")}
    conf = {"model": model.ref, "recipe": recipe.to_dict(), "edited_layers": edited, "data": ft,
            "data_digest": digests[ft], "task": task, **downstream,
            "eval_every": spec.shared.evaluation.eval_every, "patch": None}
    return b.add("finetune", conf, (), f"M_f {model.label} {rlabel} {labels[ft]} s{seed}")


def _layer_key(editor_fields) -> str:
    editor, fields, cfg = editor_fields
    return json.dumps(cfg["layers"] if cfg else [editor.name, fields.get("layers")])


def _distinct_layer_sets(editors: list) -> list:
    return list({_layer_key(e): e for e in reversed(editors)}.values())[::-1]


def _layer_set_label(editor_fields) -> str | None:
    """The `editor` axis of a fine-tune-only cell: None, or the edited layers its selective recipe refers to."""
    if editor_fields is None:
        return None
    editor, fields, cfg = editor_fields
    layers = cfg["layers"] if cfg else fields.get("layers")
    return "L" + "-".join(map(str, layers)) if layers else f"{editor.name}-preset-layers"


def _axes(model: _Model, editor: str | None, data: str | None, n: int, rlabel: str, recipe, ft: str,
          seed: int, labels: dict[str, str]) -> dict:
    return {"model": model.ref["name"], "model_label": model.label, "editor": editor,
            "edit_data": data, "edit_data_label": labels[data] if data else None, "n_edits": n,
            "recipe": rlabel, "method": recipe.method,
            "layers": recipe.layers if isinstance(recipe.layers, str) else list(recipe.layers),
            "targets": recipe.targets if isinstance(recipe.targets, str) else list(recipe.targets),
            "finetune_data": ft, "finetune_data_label": labels[ft], "seed": seed}


def _cell(b: _Builder, axes: dict, roles: dict[str, str]) -> Cell:
    label = "/".join([axes["model_label"], axes["editor"] or "-", axes["edit_data_label"] or "-",
                      f"n{axes['n_edits']}", axes["recipe"], axes["finetune_data_label"], f"s{axes['seed']}"])
    deps = tuple(dict.fromkeys(roles.values()))
    sid = b.add("cell", {"axes": axes, "roles": roles}, deps, label)
    cid = f"{_slug(label.replace('/', '_'))}-{sid.split('-', 1)[1][:8]}"
    return Cell(cid, label, axes, {**roles, "cell": sid})


def _edited_cell(b: _Builder, model: _Model, editor_fields, data: str, n: int, seed: int, ft: str, rlabel: str,
                 recipe, task: dict | None, spec: GridSpec, labels: dict[str, str], digests: dict[str, str | None],
                 mf: str, downstream: dict) -> Cell:
    """A cell with edits: statistics -> patch -> M_ef, plus M0 and M_f measured on its requests."""
    editor, fields, cfg = editor_fields
    editor_label = editor.label or editor.name
    ev = spec.shared.evaluation
    if cfg is not None:
        stats_conf = {"model": model.ref, "layers": cfg["layers"], "corpus": cfg["stats_corpus"],
                      "tokens": cfg["stats_tokens"], "dtype": cfg["stats_dtype"]}
        if cfg.get("stats_tolerance") is not None:      # adaptive E1 runs in the patch stage, on the edit keys
            stats_conf["tolerance"] = cfg["stats_tolerance"]
    else:   # preset unknown until the model is loaded: the fields that decide the statistics, and the preset
        keep = ("layers", "stats_corpus", "stats_tokens", "stats_dtype", "stats_tolerance")
        stats_conf = {"model": model.ref, "editor": editor.name, "fields": {k: fields[k] for k in keep if k in fields}}
    stats = b.add("stats", stats_conf, (), f"E1 {model.label} {editor.name if cfg is None else cfg['layers']}")
    requests = {"data": data, "digest": digests[data], "n": n, "seed": seed, "zsre_target": ev.zsre_target,
                "strict": ev.strict}
    patch = b.add("patch", {"model": model.ref, "editor": editor.name, "editor_config": cfg,
                            "editor_fields": None if cfg else fields, "requests": requests,
                            "batch_size": ev.edit_batch_size}, (stats,),
                  f"{editor_label} {model.label} {labels[data]} n{n} s{seed}")
    eval_base = b.add("evaluate", {"model": model.ref, "requests": requests, "finetune": None}, (),
                      f"M0 {model.label} {labels[data]} n{n} s{seed}")
    eval_mf = b.add("evaluate", {"model": model.ref, "requests": requests, "finetune": mf}, (mf,),
                    f"M_f {model.label} {rlabel} on {labels[data]} n{n} s{seed}")
    mef = b.add("finetune", {"model": model.ref, "recipe": recipe.to_dict(), "edited_layers": None, "data": ft,
                             "data_digest": digests[ft], "task": task, **downstream,
                             "eval_every": ev.eval_every, "patch": patch}, (patch,),
                f"M_ef {model.label} {editor_label} {labels[data]} n{n} {rlabel} s{seed}")
    axes = _axes(model, editor_label, data, n, rlabel, recipe, ft, seed, labels)
    roles = {"stats": stats, "patch": patch, "eval_base": eval_base, "finetune_base": mf,
             "eval_finetuned_base": eval_mf, "finetune_edited": mef}
    return _cell(b, axes, roles)


def missing_files(plan: Plan) -> list[str]:
    """Local models, data files and corpus files the plan names that do not exist (yet): a grid may be planned
    before its data is downloaded, so these are warnings here and errors in the stage that needs them."""
    paths: dict[str, str] = {}
    for st in plan.stages.values():
        c = st.config
        model = (c.get("model") or {}).get("name", "")
        if model.startswith("/"):
            paths[model] = "model directory"
        for spec, what in (((c.get("requests") or {}).get("data"), "edit data"), (c.get("data"), "fine-tuning data")):
            if isinstance(spec, str) and ":" in spec and spec.split(":", 1)[1].startswith("/"):
                paths[spec.split(":", 1)[1]] = what
        for t in c.get("downstream") or []:
            if t.startswith(("local:", "ppl:")):
                paths[t.split(":", 1)[1]] = "downstream task data"
        corpus = c.get("corpus") or (c.get("fields") or {}).get("stats_corpus")
        if isinstance(corpus, str) and corpus.startswith("/"):
            paths[corpus] = "statistics corpus"
    return [f"{what} {p} does not exist" for p, what in paths.items() if not Path(p).exists()]


def _rank(s: Stage) -> int:
    if s.kind == "evaluate":
        return 2 if s.config["finetune"] is None else 4       # M0 before M_f exists; M_f after it
    if s.kind == "finetune":
        return 3 if s.config["patch"] is None else 5          # M_f, then M_ef
    return {"stats": 0, "patch": 1, "cell": 6}[s.kind]


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


__all__ = ["Cell", "Plan", "ROLE_ORDER", "Stage", "build_plan", "check_data_digest", "data_digest", "missing_files",
           "task_objects"]
