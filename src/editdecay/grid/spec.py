"""The grid file: a typed, validated description of a whole study (docs/PROTOCOL.md, "The grid the study ran").

A grid is a product of axes -- models, editors, edit data sets, numbers of edits
(0: fine-tune only), fine-tuning recipes (method x layer choice x targets),
fine-tuning data and seeds -- plus settings shared by every cell (statistics
corpus, evaluation, downstream tasks) and how to run it (resources, Slurm, Ray).

Every block is a `core.config.Config` (frozen, unknown keys refused with the closest field of
that block suggested), and errors become text in `core.config.explain`, as for every other
record: ``recipes[0].method[1]='lorra' is not valid (did you mean 'lora'?); use one of full,
lora, dora``. Model entries are `core.model_ref.ModelRef`s; layer lists are `core.layers`'.
Validation is pure: this module never imports torch, loads a model, reads a data set or
touches the network, so a typo fails in milliseconds. Checks that need the editor or recipe
classes (field names of `overrides`) run in `plan.build_plan`; checks that need the data or
the model run in the stage that uses them.

Relative paths (local model directories, ``counterfact:PATH``-style data, a corpus file,
``local:DIR`` / ``ppl:FILE`` downstream tasks) are relative to the directory of the grid file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, PrivateAttr, StrictInt, ValidationError, field_validator, model_validator

from editdecay.core.arch import FAMILIES
from editdecay.core.config import Config, choice_reason, did_you_mean, explain
from editdecay.core.errors import ConfigError
from editdecay.core.layers import Layers
from editdecay.core.model_ref import ModelRef
from editdecay.core.placement import DEFAULT_DEVICE, DEVICE_HELP, Device
from editdecay.data import sources as data_sources
from editdecay.data.chatterbot import ChatterbotSettings
from editdecay.data.embedded_task import TaskSettings
from editdecay.data.source import EDIT, FINETUNE, HELD_OUT
from editdecay.edit.registry import editor_names
from editdecay.finetune.recipe import LAYER_CHOICES, METHODS, PRESETS, TARGET_CHOICES, LayerSpec, TargetSpec
from editdecay.finetune.schedule import EvalEvery

# The valid choices come from the modules and registries that own them (validating a grid file loads no model
# code): model families from core/arch.py, editors from edit/registry.py, data sources and held-out tasks from
# data/sources.py, so an entry registered at run time (a plug-in) is valid here too.
PRESET_NAMES = tuple(PRESETS)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _data_spec(role: str):
    """A validator of one data spec against the registered sources that play `role` (data/sources.py
    `parse_spec`: the one spec parser); its reason without the spec, which the error's key path shows."""
    def check(v):
        try:
            return data_sources.parse_spec(v, role).text
        except ConfigError as e:
            written = v.strip() if isinstance(v, str) else v
            reason = str(e).removeprefix(f"data {written!r}").lstrip(": ")
            raise ValueError(reason if reason.startswith("is ") else f"is not valid: {reason}") from None
    return check


# Axis values: integers >= 0 written as integers (a YAML `true` or `"3"` is a mistake, not a count).
Count = Annotated[StrictInt, Field(ge=0)]
EditData = Annotated[str, BeforeValidator(_data_spec(EDIT))]
FinetuneData = Annotated[str, BeforeValidator(_data_spec(FINETUNE))]


# --------------------------------------------------------------------------- axes


class ModelEntry(ModelRef):
    """One base model: a `ModelRef` (name, revision, dtype, trust_remote_code, allow_pickle) plus how the grid
    names and edits it. `family` lets the plan resolve editor presets (edited layers) without reading the
    model's config: give it for hub ids; the embedded model and local directories are recognised."""

    config_name = "model entry"

    name: str = Field(min_length=1, description="'smollm2-135m' (embedded), a local Hugging Face directory, "
                                                "or a hub id")
    label: Optional[str] = Field(None, description="short name used in cell ids (default: derived from name)")
    family: Optional[Literal[FAMILIES]] = Field(None, description=f"architecture family: {' | '.join(FAMILIES)}")
    edit_layers: Optional[Layers] = Field(None, description="edited layers for every editor on this model, e.g. "
                                                            "4-8 (default: the editor preset's)")
    editor_overrides: dict[str, Any] = Field(default_factory=dict,
                                             description="editor config fields for this model, e.g. {v_lr: 0.1}")


class EditorEntry(Config):
    """One editor of the `editors` axis, with editor-config fields that override its preset."""

    config_name = "editor entry"

    name: str = Field(description="a registered editor (edit/registry.py), e.g. memit")
    label: Optional[str] = Field(None, description="name of the editor in cell ids (default: name)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fields of the editor's config (its "
                                                                        "module), e.g. {layers: 4-8}")

    @field_validator("name", mode="before")
    @classmethod
    def _registered(cls, v):
        if isinstance(v, str) and v.lower() in editor_names():
            return v.lower()
        raise ValueError(choice_reason(v, editor_names()))


class RecipeEntry(Config):
    """Fine-tuning recipes: the product method x layers x targets, each a value or a list of values.

    A layer choice is all | edited | non-edited | explicit layers ([4, 5, 6] or '4-8'); several choices
    are a list of them, so an explicit layer set inside a product is a nested list: [[4, 5, 6], edited].
    A target choice is attention | mlp | all-linear | all, or a nested list of block-relative module names.
    """

    config_name = "recipe entry"

    method: list[Literal[METHODS]] = Field(description=" | ".join(METHODS) + ", or a list of them")
    layers: list[LayerSpec] = Field(default_factory=lambda: ["all"],
                                    description=" | ".join(LAYER_CHOICES) + " | layer indices, or a list of them")
    targets: Optional[list[TargetSpec]] = Field(None, description=" | ".join(TARGET_CHOICES) + " | module names, or "
                                                "a list of them; default: the preset's (all-linear; study full: all)")
    preset: Optional[Literal[PRESET_NAMES]] = Field(None, description="embedded | study (default: embedded for the "
                                                                      "embedded model, else study)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Recipe fields (finetune/recipe.py), e.g. {max_steps: 5}")
    label: Optional[str] = Field(None, description="name of the recipe in cell ids; only for a single recipe")

    @field_validator("method", mode="before")
    @classmethod
    def _methods(cls, v):
        return _as_list(v)

    @field_validator("method")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("names a method twice")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_choices(cls, v):
        if isinstance(v, (str, int)) or (isinstance(v, list) and v and all(isinstance(x, int) for x in v)):
            return [v]          # one choice; a list of integers is one explicit layer set (an int is no choice)
        return _as_list(v)

    @field_validator("targets", mode="before")
    @classmethod
    def _target_choices(cls, v):
        return None if v is None else [v] if isinstance(v, str) else _as_list(v)

    @field_validator("overrides")
    @classmethod
    def _no_axis_in_overrides(cls, v):
        axis = [k for k in ("method", "layers", "targets", "seed") if k in v]
        if axis:
            where = "the grid's `seeds` axis" if axis[0] == "seed" else f"the recipe's own `{axis[0]}` key"
            raise ValueError(f"{axis[0]!r} cannot be an override; set it with {where}")
        return v

    @model_validator(mode="after")
    def _label_single(self):
        n = len(self.method) * len(self.layers) * len(self.targets or [None])
        if self.label is not None and n > 1:
            raise ValueError(f"label={self.label!r} names one recipe, but this entry expands to {n}; drop the label")
        return self


# --------------------------------------------------------------------------- shared settings


class StatisticsSettings(Config):
    """E1 key statistics, shared by every editor: unset fields keep the editor preset's values."""

    config_name = "statistics"

    corpus: Optional[str] = Field(None, description="generated | PATH (.txt/.jsonl/.parquet) | hf:NAME[:CONFIG]")
    tokens: Optional[int] = Field(None, ge=1, description="corpus tokens used (the study: 100k Wikipedia samples)")
    dtype: Optional[Literal["float32", "float64"]] = Field(None, description="accumulation dtype")
    tolerance: Optional[float] = Field(None, gt=0, lt=1, description="adaptive E1: stop when the edit keys' solve "
                                       "changes by less than this between doubling token counts (tokens is then "
                                       "the cap; 0.5 measured on the embedded model, docs/scale.md); None: exactly "
                                       "`tokens`")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass of the statistics run")


class EvaluationSettings(Config):
    """How edits are measured (E6) and how often the decay curve is (E7)."""

    config_name = "evaluation"

    batch_size: Optional[int] = Field(None, ge=1, description="prompts per scoring batch (E6); default: sized from "
                                                              "the device's free memory (32 on the CPU)")
    eval_every: EvalEvery = Field(25, description="decay curve: measure the edits (and the held-out task) every K "
                                                  "fine-tuning steps (0: only first and last), or at a list of steps "
                                                  "(e.g. [2, 4, 8, 16, 32]; step 0 and the last step always)")
    zsre_target: Literal["answers", "alt"] = Field("answers", description="zsRE edit target: answers "
                                                   "(MEMIT/AlphaEdit) or alt (EasyEdit), docs/METHODS.md E6")
    strict: bool = Field(False, description="a rejected edit record, or a subject that does not end on a token "
                                            "boundary of its prompt, is an error instead of a warning")
    edit_batch_size: Optional[int] = Field(None, ge=1, description="edits per sequential batch (default: one batch)")
    n_control: Optional[int] = Field(None, ge=0, description="knowledge control: facts of the same edit data that "
                                                             "are not edited, measured on M0, M_e, M_f and M_ef "
                                                             "(default: as many as the cell's edits, fewer where the "
                                                             "data has fewer left; 0: none)")


def _downstream_task(t):
    """A held-out task of a registered source (data/sources.py), scored in the decay curve (measure/task.py), or
    an lm-eval task spec (measure/downstream/spec.py)."""
    from editdecay.measure.downstream.spec import VALID_TEXT, parse_task

    held_out = data_sources.names(HELD_OUT)
    if t in held_out:
        return t
    try:
        parse_task(t)          # syntax only; paths resolve against the grid file in plan.build_plan
    except ConfigError as e:
        if isinstance(t, str) and did_you_mean(t, held_out):
            raise ValueError(choice_reason(t, held_out, extra=f"or {VALID_TEXT}")) from None
        reason = str(e).removeprefix(f"downstream task {t!r}").lstrip(": ")
        raise ValueError(reason if reason.startswith("is ") else f"is not valid: {reason}") from None
    return t.strip()


class SharedSettings(Config):
    """Settings every cell shares."""

    config_name = "shared"

    statistics: StatisticsSettings = Field(default_factory=StatisticsSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    downstream: list[Annotated[str, BeforeValidator(_downstream_task)]] = Field(
        default_factory=lambda: ["embedded"],
        description="downstream tasks scored for M0, M_e, M_f, M_ef: embedded (the generated task's held-out "
                    "split) or chatterbot (the chatterbot corpus' held-out split) and lm-eval tasks: everyday, "
                    "boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, obqa, lm-eval:NAME, local:DIR, "
                    "ppl:FILE, and commonsense:DIR[:task,...] (the study's generation protocol)")
    downstream_limit: Optional[int] = Field(None, ge=1, description="documents per lm-eval task and records per "
                                                                    "commonsense task (default: all); the first N, "
                                                                    "the same for every model")
    downstream_num_beams: int = Field(4, ge=1, description="commonsense:DIR tasks: beams of the beam search (the "
                                                           "study: 4)")
    downstream_max_new_tokens: int = Field(32, ge=1, description="commonsense:DIR tasks: tokens generated per "
                                                                 "response (the study: 32)")
    downstream_prompt: Literal["study", "llm-adapters"] = Field(
        "study", description="commonsense:DIR tasks: the prompt of the study's code or of LLM-Adapters'")
    embedded_task: TaskSettings = Field(default_factory=TaskSettings)
    chatterbot: ChatterbotSettings = Field(default_factory=ChatterbotSettings)
    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP)
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    finetune_devices: int = Field(1, ge=1, description="fine-tuning sharded over this many processes of one node, a "
                                                       "GPU each (FSDP over torch's launcher; gloo on the CPU); "
                                                       "full fine-tuning only")
    max_attempts: int = Field(3, ge=1, description="starts of a stage whose process dies before it ends (killed "
                                                   "for memory, a time limit) before it is recorded as failed")
    cache_dir: Optional[str] = Field(None, description="editdecay cache (converted models, E1 statistics); default "
                                                       "$EDITDECAY_CACHE or the user cache directory")

    @field_validator("downstream")
    @classmethod
    def _downstream(cls, v):
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"names {dup[0]!r} twice")
        held_out = [t for t in v if t in data_sources.names(HELD_OUT)]
        if len(held_out) > 1:
            raise ValueError(f"has {len(held_out)} held-out tasks; one per grid (the decay curve scores one): keep "
                             f"one of {' or '.join(held_out)}")
        return v


# --------------------------------------------------------------------------- how to run


class Resources(Config):
    """What one stage asks of a Ray or Slurm worker."""

    config_name = "resources"

    cpus: float = Field(1, gt=0, description="CPU cores per stage (Ray num_cpus, Slurm cpus_per_task)")
    gpus: float = Field(0, ge=0, description="GPUs per stage (Ray num_gpus, Slurm gpus_per_node)")
    memory_gb: Optional[float] = Field(None, gt=0, description="memory per stage (Ray memory, Slurm mem_gb)")


class ResourceSettings(Config):
    """Resources per stage kind; a kind without its own entry takes `default`'s."""

    config_name = "resources"

    default: Resources = Field(default_factory=Resources, description="every stage kind without its own entry")
    stats: Optional[Resources] = Field(None, description="E1 statistics stages")
    targets: Optional[Resources] = Field(None, description="E3 target value stages (default: patch's entry)")
    patch: Optional[Resources] = Field(None, description="edit stages")
    finetune: Optional[Resources] = Field(None, description="fine-tuning stages")
    evaluate: Optional[Resources] = Field(None, description="evaluation stages")

    def for_kind(self, kind: str) -> Resources:
        if kind == "targets" and self.targets is None:
            return self.for_kind("patch")           # E3 needs what the edit needs (its gradient steps dominate)
        return getattr(self, kind, None) or self.default


class SlurmSettings(Config):
    """Parameters of the submitit Slurm executor (one job array per wave of independent stages)."""

    config_name = "slurm"

    partition: Optional[str] = Field(None, description="Slurm partition")
    account: Optional[str] = Field(None, description="Slurm account")
    qos: Optional[str] = Field(None, description="Slurm quality of service")
    timeout_min: int = Field(24 * 60, ge=1, description="time limit per job, in minutes")
    array_parallelism: int = Field(64, ge=1, description="array tasks running at once")
    constraint: Optional[str] = Field(None, description="Slurm node constraint")
    additional_parameters: dict[str, Any] = Field(default_factory=dict, description="extra #SBATCH settings")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job (module load ...); "
                             "they run as shell: a grid file is trusted input (a results directory's copy of it "
                             "never supplies them)")


class RaySettings(Config):
    """Where the Ray backend runs."""

    config_name = "ray"

    address: Optional[str] = Field(None, description="cluster address (None: start a local cluster; 'auto': join)")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime environment of the workers")


# --------------------------------------------------------------------------- the grid


class GridSpec(Config):
    """A whole grid. `load_grid` builds it from YAML; `plan.build_plan` expands it into cells and stages."""

    config_name = "grid"

    name: str = Field("grid", description="the grid's name (results directory, report title)")
    description: str = Field("", description="what the grid asks")
    models: list[ModelEntry] = Field(min_length=1, description="base models: names or {name, label, family, ...}")
    editors: list[EditorEntry] = Field(default_factory=list, description="editors: names or {name, overrides}")
    edit_data: list[EditData] = Field(default_factory=list, description="edit data: worldfacts | counterfact:PATH | "
                                                                        "zsre:PATH (data/sources.py)")
    n_edits: list[Count] = Field(min_length=1, description="numbers of edits, one batch each; 0 means fine-tune only")
    recipes: list[RecipeEntry] = Field(min_length=1, description="fine-tuning recipes")
    finetune_data: list[FinetuneData] = Field(default_factory=lambda: ["embedded"],
                                              description="fine-tuning data: embedded | chatterbot[:DIR] | "
                                                          "instructions:PATH | text:PATH | hf:NAME[:SPLIT] "
                                                          "(data/sources.py)")
    seeds: list[Count] = Field(default_factory=lambda: [0], min_length=1, description="seeds (one cell each)")
    shared: SharedSettings = Field(default_factory=SharedSettings, description="settings every cell shares")
    resources: ResourceSettings = Field(default_factory=ResourceSettings, description="resources per stage kind")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings, description="the Slurm backend's settings")
    ray: RaySettings = Field(default_factory=RaySettings, description="the Ray backend's settings")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("models", "editors", mode="before")
    @classmethod
    def _entries(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in _as_list(v)]

    @field_validator("edit_data", "finetune_data", "n_edits", "seeds", mode="before")
    @classmethod
    def _lists(cls, v):
        return _as_list(v)

    @model_validator(mode="after")
    def _consistent(self):
        # What to do about a repeat depends on the list: a label tells two editors apart (other overrides), but
        # the same model under two labels is the same weights, and its cells would be computed twice.
        remove = "remove the repeat: every cell would be computed twice"
        hints = {"models": "the same model under another label is the same weights, and its cells would be computed "
                           "twice: remove one entry", "editors": "give a distinct label to repeat an editor with "
                           "other overrides"}
        for name, values in (("n_edits", self.n_edits), ("seeds", self.seeds), ("edit_data", self.edit_data),
                             ("finetune_data", self.finetune_data), ("models", [m.name for m in self.models]),
                             ("editors", [e.label or e.name for e in self.editors])):
            dup = sorted({str(x) for x in values if list(values).count(x) > 1})
            if dup:
                raise ValueError(f"{name}: {dup[0]!r} is listed twice ({hints.get(name, remove)})")
        if any(n > 0 for n in self.n_edits):
            if not self.editors:
                raise ValueError("editors: n_edits has a number > 0 but no editor is given; add e.g. [memit]")
            if not self.edit_data:
                raise ValueError("edit_data: n_edits has a number > 0 but no edit data is given; "
                                 "add e.g. [worldfacts]")
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir


# --------------------------------------------------------------------------- loading


def grid_from_dict(data: dict, *, source: str = "grid", base_dir: Path | None = None) -> GridSpec:
    """Validate a grid given as a dict; ConfigError lists every problem with its key path (core.config.explain)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of grid keys (models, editors, ...), "
                          f"got {type(data).__name__}")
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {explain(e, GridSpec)}") from None
    spec._base_dir = Path(base_dir or Path.cwd()).resolve()
    return spec


def load_grid(path: str | Path) -> GridSpec:
    """Read and validate a grid YAML file (relative paths inside it are relative to its directory)."""
    from editdecay.core.files import read_yaml

    path = Path(path)
    data = read_yaml(path, "grid file")      # a regular UTF-8 file; YAML alias bombs refused
    return grid_from_dict(data, source=str(path), base_dir=path.parent)


__all__ = ["ChatterbotSettings", "EditorEntry", "EvaluationSettings", "GridSpec", "ModelEntry",
           "RaySettings", "RecipeEntry", "ResourceSettings", "Resources", "SharedSettings", "SlurmSettings",
           "StatisticsSettings", "TaskSettings", "grid_from_dict", "load_grid"]
