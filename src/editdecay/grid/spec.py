"""The grid file: a typed, validated description of a whole study (PROTOCOL.md, "The grid the study ran").

A grid is a product of axes -- models, editors, edit data sets, numbers of edits
(0: fine-tune only), fine-tuning recipes (method x layer choice x targets),
fine-tuning data and seeds -- plus settings shared by every cell (statistics
corpus, evaluation, downstream tasks) and how to run it (resources, Slurm, Ray).

Validation is pure: this module reads YAML and checks it with pydantic, and never
imports torch, loads a model, reads a data set or touches the network, so a typo
fails in milliseconds. Errors name the key path, the value and what is valid, e.g.
``recipes[0].method: 'lorra' is not valid; use one of full, lora, dora (did you mean 'lora'?)``.
Checks that need the editor or recipe classes (field names of `overrides`) run in
`plan.build_plan`; checks that need the data or the model run in the stage that uses them.

Relative paths (local model directories, ``counterfact:PATH``-style data, a corpus
file, ``local:DIR`` / ``ppl:FILE`` downstream tasks) are relative to the directory of the grid file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from editdecay.core.config import did_you_mean
from editdecay.core.errors import ConfigError
from editdecay.data import EDIT_SOURCES
from editdecay.data.instructions import HELD_OUT_TASKS
from editdecay.data.instructions import SOURCES as FINETUNE_SOURCES
from editdecay.edit.config import EDITOR_NAMES
from editdecay.finetune.recipe import LAYER_CHOICES, METHODS, PRESETS, TARGET_CHOICES

# The valid choices come from the modules that own them (pure modules: validating a grid file imports no torch).
PRESET_NAMES = tuple(PRESETS)
DOWNSTREAM_TASKS = HELD_OUT_TASKS     # held-out splits scored in the decay curve (measure/task.py); every other
                                      # downstream entry is an lm-eval task spec (measure/downstream/spec.py)
STAGE_KINDS = ("stats", "patch", "finetune", "evaluate", "cell")

LayerChoice = Union[str, tuple[int, ...]]
TargetChoice = Union[str, tuple[str, ...]]


from editdecay.core.layers import parse_layer_text  # noqa: E402  (shared with the CLI)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _layers_value(v) -> tuple[int, ...]:
    if isinstance(v, str):
        return parse_layer_text(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        if any(x < 0 for x in v):
            raise ValueError(f"{list(v)}: layer indices must be integers >= 0")
        return tuple(sorted(set(v)))
    raise ValueError(f"{v!r} is not a layer list; give integers, e.g. [4, 5, 6], or a range such as '4-8'")


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _choice(value, options, what: str):
    if value not in options:
        raise ValueError(f"{value!r} is not a valid {what}; use one of {', '.join(options)}{did_you_mean(value, options)}")
    return value


# --------------------------------------------------------------------------- axes


class ModelEntry(_Strict):
    """One base model. `family` lets the plan resolve editor presets (edited layers) without reading the
    model's config: give it for hub ids; the embedded model and local directories are recognised."""

    name: str = Field(description="'smollm2-135m' (embedded), a local Hugging Face directory, or a hub id")
    label: str | None = Field(None, description="short name used in cell ids (default: derived from name)")
    family: str | None = Field(None, description="architecture family: gpt2 | gptj | gpt_neox | llama")
    revision: str | None = Field(None, description="hub revision (commit, tag or branch)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the weights load in")
    edit_layers: tuple[int, ...] | None = Field(None, description="edited layers for every editor on this model "
                                                                   "(default: the editor preset's)")
    editor_overrides: dict[str, Any] = Field(default_factory=dict,
                                             description="editor config fields for this model, e.g. {v_lr: 0.1}")
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own Python code")

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        return None if v is None else _choice(v, ("gpt2", "gptj", "gpt_neox", "llama"), "family")

    @field_validator("edit_layers", mode="before")
    @classmethod
    def _edit_layers(cls, v):
        return None if v is None else _layers_value(v)


class EditorEntry(_Strict):
    name: str = Field(description="memit | alphaedit")
    label: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="editor config fields (editors/config.py)")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _choice(v.lower(), EDITOR_NAMES, "editor")


class RecipeEntry(_Strict):
    """Fine-tuning recipes: the product method x layers x targets, each a value or a list of values.

    A layer choice is all | edited | non-edited | explicit layers ([4, 5, 6] or '4-8'); several choices
    are a list of them, so an explicit layer set inside a product is a nested list: [[4, 5, 6], edited].
    A target choice is attention | mlp | all-linear | all, or a nested list of block-relative module names.
    """

    method: list[str] = Field(description="full | lora | dora, or a list of them")
    layers: list[LayerChoice] = Field(default_factory=lambda: ["all"], description="layer choice(s)")
    targets: list[TargetChoice] | None = Field(None, description="target choice(s); default: the preset's "
                                                                  "(all-linear; study full: all)")
    preset: str | None = Field(None, description="embedded | study (default: embedded for the embedded model, "
                                                 "else study)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Recipe fields (finetune/recipe.py), e.g. {max_steps: 5}")
    label: str | None = Field(None, description="name of the recipe in cell ids; only for a single recipe")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v):
        out = [_choice(m, METHODS, "method") for m in _as_list(v)]
        if len(set(out)) != len(out):
            raise ValueError(f"{out} lists a method twice")
        return out

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, int) for x in v)):
            v = [v]          # one choice; a list of integers is one explicit layer set (an int is no choice)
        out = []
        for c in _as_list(v):
            if isinstance(c, str) and c in LAYER_CHOICES:
                out.append(c)
            elif isinstance(c, str) and c and c[0].isdigit():
                out.append(parse_layer_text(c))
            elif isinstance(c, (list, tuple)):
                out.append(_layers_value(c))
            else:
                raise ValueError(f"{c!r} is not a layer choice; use one of {', '.join(LAYER_CHOICES)}, "
                                 f"a list of layer indices or a range such as '4-8'{did_you_mean(c, LAYER_CHOICES)}")
        return out

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v):
        if v is None:
            return None
        out = []
        for c in ([v] if isinstance(v, str) else _as_list(v)):
            if isinstance(c, str):
                out.append(_choice(c, TARGET_CHOICES, "target choice (or a nested list of module names)"))
            elif isinstance(c, (list, tuple)) and c and all(isinstance(x, str) and x.strip() for x in c):
                out.append(tuple(c))
            else:
                raise ValueError(f"{c!r} is not a target choice; use one of {', '.join(TARGET_CHOICES)} or a list "
                                 f"of block-relative module names such as [mlp.down_proj]")
        return out

    @field_validator("preset")
    @classmethod
    def _preset(cls, v):
        return None if v is None else _choice(v, PRESET_NAMES, "preset")

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


def _data_spec(v: str, sources: tuple[str, ...], what: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{v!r} is not a {what} spec")
    kind, sep, rest = v.partition(":")
    _choice(kind, sources, f"{what} source")
    if kind in ("counterfact", "mcf", "multicounterfact", "zsre", "instructions", "text") and not rest:
        raise ValueError(f"{v!r}: give a file, e.g. {kind}:path/to/file.json")
    return v


# --------------------------------------------------------------------------- shared settings


class StatisticsSettings(_Strict):
    """E1 key statistics, shared by every editor: unset fields keep the editor preset's values."""

    corpus: str | None = Field(None, description="generated | PATH (.txt/.jsonl/.parquet) | hf:NAME[:CONFIG]")
    tokens: int | None = Field(None, ge=1, description="corpus tokens used (the study: 100k Wikipedia samples)")
    dtype: Literal["float32", "float64"] | None = Field(None, description="accumulation dtype")
    tolerance: float | None = Field(None, gt=0, lt=1, description="adaptive E1: stop when the edit keys' solve "
                                    "changes by less than this between doubling token counts (tokens is then "
                                    "the cap; 1e-2 measured on the embedded model); None: exactly `tokens`")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass of the statistics run")


class EvaluationSettings(_Strict):
    batch_size: int = Field(32, ge=1, description="prompts per scoring batch (E6)")
    eval_every: int = Field(25, ge=0, description="decay curve: measure M_ef every K fine-tuning steps "
                                                  "(0: only first and last)")
    zsre_target: Literal["answers", "alt"] = Field("answers", description="zsRE edit target (ALGORITHMS.md E6)")
    strict: bool = Field(False, description="a rejected edit record fails the stage instead of being skipped")
    edit_batch_size: int | None = Field(None, ge=1, description="edits per sequential batch (None: one batch)")


class TaskSettings(_Strict):
    """The embedded generated task (finetune.task): fine-tuning data `embedded` and downstream `embedded`."""

    n_train: int = Field(2000, ge=1)
    n_test: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)


class ChatterbotSettings(_Strict):
    """The chatterbot corpus (data/chatterbot.py): fine-tuning data `chatterbot` and downstream `chatterbot`."""

    n_test: int = Field(150, ge=1, description="held-out records (whole prompt groups; the rest is training data)")
    seed: int = Field(0, ge=0, description="seed of the held-out split")
    strict: bool = Field(False, description="a malformed conversation fails instead of being skipped")
    format: Literal["reply", "choice"] = Field("reply", description="reply: the corpus' reply is the response "
                                               "(free text); choice: pick the corpus' reply among n_choices, "
                                               "answer 'the correct answer is answerK' (Commonsense170K style)")
    n_choices: int = Field(3, ge=2, description="candidate replies per record (format choice)")
    max_reply_words: int = Field(30, ge=1, description="longest reply taking part, in words (format choice)")


class SharedSettings(_Strict):
    statistics: StatisticsSettings = Field(default_factory=StatisticsSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    downstream: list[str] = Field(default_factory=lambda: ["embedded"],
                                  description="downstream tasks scored for M0, M_e, M_f, M_ef: embedded (the "
                                              "generated task's held-out split) or chatterbot (the chatterbot "
                                              "corpus' held-out split) and lm-eval tasks: everyday, boolq, "
                                              "piqa, siqa, hellaswag, winogrande, arc-e, arc-c, obqa, "
                                              "lm-eval:NAME, local:DIR, ppl:FILE")
    downstream_limit: int | None = Field(None, ge=1, description="documents per lm-eval task (None: all); the "
                                                                 "first N, the same for every model")
    embedded_task: TaskSettings = Field(default_factory=TaskSettings)
    chatterbot: ChatterbotSettings = Field(default_factory=ChatterbotSettings)
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per stage (default: torch's)")
    finetune_devices: int = Field(1, ge=1, description="shard every fine-tuning stage over this many GPUs of the "
                                                       "node (FSDP, one process each; full fine-tuning only)")
    max_attempts: int = Field(3, ge=1, description="starts of a stage whose process dies before it ends (killed "
                                                   "for memory, a time limit) before it is recorded as failed")
    cache_dir: str | None = Field(None, description="editdecay cache (converted models, E1 statistics); default "
                                                    "$EDITDECAY_CACHE or the user cache directory")

    @field_validator("downstream")
    @classmethod
    def _downstream(cls, v):
        from editdecay.measure.downstream.spec import VALID_TEXT, parse_task

        out = []
        for t in v:
            if t in DOWNSTREAM_TASKS:
                out.append(t)
                continue
            try:
                parse_task(t)          # syntax only; paths resolve against the grid file in plan.build_plan
            except ConfigError as e:
                if isinstance(t, str) and did_you_mean(t, DOWNSTREAM_TASKS):
                    raise ValueError(f"{t!r} is not a valid downstream task; use embedded, chatterbot or one of "
                                     f"{VALID_TEXT}{did_you_mean(t, DOWNSTREAM_TASKS)}") from None
                raise ValueError(str(e).replace("downstream task ", "", 1)) from None
            out.append(t.strip())
        if len(set(out)) != len(out):
            raise ValueError(f"{out}: a downstream task is listed twice")
        held_out = [t for t in out if t in DOWNSTREAM_TASKS]
        if len(held_out) > 1:
            raise ValueError(f"{held_out}: one held-out task per grid (the decay curve scores one); keep one of "
                             f"{' or '.join(held_out)}")
        return out


# --------------------------------------------------------------------------- how to run


class Resources(_Strict):
    cpus: float = Field(1, gt=0, description="CPU cores per stage (Ray num_cpus, Slurm cpus_per_task)")
    gpus: float = Field(0, ge=0, description="GPUs per stage (Ray num_gpus, Slurm gpus_per_node)")
    memory_gb: float | None = Field(None, gt=0, description="memory per stage (Ray memory, Slurm mem_gb)")


class ResourceSettings(_Strict):
    default: Resources = Field(default_factory=Resources)
    stats: Resources | None = None
    patch: Resources | None = None
    finetune: Resources | None = None
    evaluate: Resources | None = None

    def for_kind(self, kind: str) -> Resources:
        return getattr(self, kind, None) or self.default


class SlurmSettings(_Strict):
    """Parameters of the submitit Slurm executor (one job array per wave of independent stages)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timeout_min: int = Field(24 * 60, ge=1)
    array_parallelism: int = Field(64, ge=1, description="array tasks running at once")
    constraint: str | None = None
    additional_parameters: dict[str, Any] = Field(default_factory=dict, description="extra #SBATCH settings")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each job (module load ...); "
                             "they run as shell: a grid file is trusted input (a results directory's copy of it "
                             "never supplies them)")


class RaySettings(_Strict):
    address: str | None = Field(None, description="cluster address (None: start a local cluster; 'auto': join)")
    runtime_env: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- the grid


class GridSpec(_Strict):
    """A whole grid. `load_grid` builds it from YAML; `plan.build_plan` expands it into cells and stages."""

    name: str = "grid"
    description: str = ""
    models: list[ModelEntry] = Field(min_length=1)
    editors: list[EditorEntry] = Field(default_factory=list)
    edit_data: list[str] = Field(default_factory=list, description="worldfacts | counterfact:PATH | zsre:PATH")
    n_edits: list[int] = Field(description="numbers of edits, one batch each; 0 means fine-tune only")
    recipes: list[RecipeEntry] = Field(min_length=1)
    finetune_data: list[str] = Field(default_factory=lambda: ["embedded"],
                                     description="embedded | chatterbot[:DIR] | instructions:PATH | text:PATH | "
                                                 "hf:NAME[:SPLIT]")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    shared: SharedSettings = Field(default_factory=SharedSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    ray: RaySettings = Field(default_factory=RaySettings)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in _as_list(v)]

    @field_validator("editors", mode="before")
    @classmethod
    def _editors(cls, v):
        return [{"name": e} if isinstance(e, str) else e for e in _as_list(v)]

    @field_validator("edit_data", mode="before")
    @classmethod
    def _edit_data(cls, v):
        return [_data_spec(d, EDIT_SOURCES, "edit data") for d in _as_list(v)]

    @field_validator("finetune_data", mode="before")
    @classmethod
    def _ft_data(cls, v):
        return [_data_spec(d, FINETUNE_SOURCES, "fine-tuning data") for d in _as_list(v)]

    @field_validator("n_edits", mode="before")
    @classmethod
    def _n_edits(cls, v):
        v = _as_list(v)
        bad = [n for n in v if isinstance(n, bool) or not isinstance(n, int) or n < 0]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a number of edits; give integers >= 0 (0: fine-tune only)")
        if not v:
            raise ValueError("give at least one number of edits")
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v):
        v = _as_list(v)
        bad = [s for s in v if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a seed; give integers >= 0")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        for name, values in (("n_edits", self.n_edits), ("seeds", self.seeds), ("edit_data", self.edit_data),
                             ("finetune_data", self.finetune_data), ("models", [m.name for m in self.models]),
                             ("editors", [e.label or e.name for e in self.editors])):
            dup = sorted({str(x) for x in values if list(values).count(x) > 1})
            if dup:
                raise ValueError(f"{name}: {dup[0]!r} is listed twice (give a distinct label to repeat an entry)")
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


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "is-instance"}


def _loc(loc: tuple) -> str:
    """('recipes', 0, 'layers', 'list[...]', 1) -> 'recipes[0].layers[1]': pydantic's union/type tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in _TYPE_TAGS or "[" in str(part) or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "grid"


def _known_fields() -> set[str]:
    names: set[str] = set()
    for cls in (GridSpec, ModelEntry, EditorEntry, RecipeEntry, SharedSettings, StatisticsSettings,
                EvaluationSettings, TaskSettings, ResourceSettings, Resources, SlurmSettings, RaySettings):
        names.update(cls.model_fields)
    return names


def _messages(e: ValidationError) -> list[str]:
    out, seen = [], set()
    for err in e.errors():
        where = _loc(err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            msg = f"{where}: unknown key{did_you_mean(key, _known_fields())}"
        elif err["type"] == "missing":
            msg = f"{where}: required key is missing"
        else:
            text = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            value = err.get("input")
            shown = "" if isinstance(value, (dict, list)) or text.startswith(repr(value)) else f" (got {value!r})"
            msg = f"{where}: {text}{shown}"
        if msg not in seen:
            seen.add(msg)
            out.append(msg)
    return out


def grid_from_dict(data: dict, *, source: str = "grid", base_dir: Path | None = None) -> GridSpec:
    """Validate a grid given as a dict; ConfigError lists every problem with its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of grid keys (models, editors, ...), "
                          f"got {type(data).__name__}")
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as e:
        lines = _messages(e)
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None
    spec._base_dir = Path(base_dir or Path.cwd()).resolve()
    return spec


def load_grid(path: str | Path) -> GridSpec:
    """Read and validate a grid YAML file (relative paths inside it are relative to its directory)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return grid_from_dict(data, source=str(path), base_dir=path.parent)


__all__ = ["DOWNSTREAM_TASKS", "EDITOR_NAMES", "EditorEntry", "EvaluationSettings", "GridSpec", "LAYER_CHOICES",
           "METHODS", "ModelEntry", "RaySettings", "RecipeEntry", "ResourceSettings", "Resources", "STAGE_KINDS",
           "SharedSettings", "ChatterbotSettings", "SlurmSettings", "StatisticsSettings", "TaskSettings", "grid_from_dict", "load_grid",
           "parse_layer_text"]
