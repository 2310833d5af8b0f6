"""The result-file schema: what an edit, a fine-tuning run and a grid cell write, as typed records.

Every writer validates its result through `validate_result` before the file is written
(`core.results.write_result`), and the report reads cell results through `read_result`, so a
field a writer forgot or misspelt fails where it is made, not in somebody's report months later.

The records are open (`extra="allow"`): the JSON files keep their shape, and a field added by a
newer writer does not break an older reader. What the schema pins is what readers rely on:
the kind, the versions, the model identity, the per-stage metrics with their `n`, and the
per-request rows (case id, outcomes under every model, success flags, margins).

Versions: `schema_version` is the version of this schema (1: results written before the
schema was typed; 2: validated by this module, the models of edit and fine-tuning results
named pre/post/finetuned; 3: every result names its models M0, M_e, M_f, M_ef). Results of
versions 1 and 2 read unchanged, with their models renamed on reading (`legacy_models`).
Grid cells also carry `cell_schema_version` (1: configuration of untyped stage configs;
2: built from the typed stage specs, grid/specs.py), the layout `CellResult` describes.
A file from a newer editdecay (a higher version) is refused with a message saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from editdecay.core.config import explain
from editdecay.core.errors import EditDecayError

SCHEMA_VERSION = 3
CELL_SCHEMA_VERSION = 2
MODELS = ("M0", "M_e", "M_f", "M_ef")          # E7: base, edited, fine-tuned base, edited then fine-tuned
MODEL_NAMES = {"M0": "base", "M_e": "edited", "M_f": "fine-tuned base", "M_ef": "edited, then fine-tuned"}


class ResultSchemaError(EditDecayError):
    """A result does not follow the schema: the message names the file (if any), the field and the problem."""


def _not_newer(name: str, v: int, latest: int) -> int:
    if v > latest:
        raise ValueError(f"{name} {v} is newer than this editdecay reads (<= {latest}); update editdecay")
    return v


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Scores(_Open):
    """Aggregate E6 scores of one model stage (`measure.metrics.aggregate`), fractions in [0, 1] or None."""

    n: int = Field(ge=0, description="requests scored")
    efficacy: float | None = None
    paraphrase: float | None = None
    neighborhood: float | None = None

    @field_validator("efficacy", "paraphrase", "neighborhood")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not (0.0 <= v <= 1.0):
            raise ValueError("is not a fraction in [0, 1]")
        return v


class ModelIdentity(_Open):
    name: str
    fingerprint: str | None = Field(None, description="hash of the weights (core.models)")


class _Result(_Open):
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    kind: str

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return _not_newer("schema_version", v, SCHEMA_VERSION)


def legacy_models(result: dict) -> dict:
    """An edit, eval-edits or fine-tuning result of schema 1-2 with its models renamed as in schema 3: `pre` ->
    M0; `post` -> M_e (M0 for a fine-tuning run of the unedited model); `finetuned` -> M_ef (M_f when unedited);
    per-request `success_post` / `success_finetuned` -> `success`. Results of schema 3 are returned unchanged."""
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not ({"pre", "post", "finetuned"} & set(metrics)):
        return result
    kind = result.get("kind")
    edited = kind != "finetune" or "pre" in metrics or bool((result.get("extra") or {}).get("patch"))
    names = {"pre": "M0", "post": "M_e" if edited else "M0", "finetuned": "M_ef" if edited else "M_f"}
    out = {**result, "metrics": {names.get(k, k): v for k, v in metrics.items()}}
    if kind == "finetune":
        out["models"] = {"before": names["post"], "after": names["finetuned"]}
    rows = []
    for row in result.get("requests") or []:
        if not isinstance(row, dict):
            rows.append(row)
            continue
        new = {names.get(k, k): v for k, v in row.items() if not k.startswith("success_")}
        if kind == "eval-edits" and "stage" in row:
            new["stage"] = names.get(row["stage"], row["stage"])
        successes = {names[k.removeprefix("success_")]: v for k, v in row.items() if k.startswith("success_")}
        if successes:
            new["success"] = successes
        rows.append(new)
    if "requests" in result:
        out["requests"] = rows
    return out


class _Renamed(_Result):
    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        return legacy_models(data) if isinstance(data, dict) else data


class EditRequestRow(_Open):
    case_id: str
    M0: dict
    M_e: dict


class EditResult(_Renamed):
    """`editdecay edit` / `edit.workflow.run_edit`: metrics of M0 and M_e (before and after editing), per request."""

    kind: Literal["edit"]
    config: dict
    model: ModelIdentity
    data: dict
    metrics: dict[str, Scores]
    requests: list[EditRequestRow]
    edit: dict
    timings: dict[str, float]


class EvaluationResult(_Renamed):
    """`editdecay eval-edits`: metrics of one model, M0 or (a patch applied) M_e."""

    kind: Literal["eval-edits"]
    metrics: dict[str, Scores]


class FinetuneRequestRow(_Open):
    case_id: str


class FinetuneResult(_Renamed):
    """`editdecay finetune` / `finetune.run.run_finetune`. Written at the start (status "running") and again at the
    end, so metrics and curve may still be empty. `models`: the model handed to fine-tuning and the fine-tuned one
    (M_e and M_ef when edited, M0 and M_f when not)."""

    kind: Literal["finetune"]
    status: str
    model: ModelIdentity
    recipe: dict
    models: dict[str, str] = Field(default_factory=lambda: {"before": "M_e", "after": "M_ef"})
    metrics: dict[str, Scores] = Field(default_factory=dict)
    curve: list[dict] = Field(default_factory=list)
    decay: dict | None = None
    requests: list[FinetuneRequestRow] = Field(default_factory=list)


class CellRequestRow(_Open):
    """One request of a cell under the four models: E7's per-request survival table."""

    case_id: str
    success: dict[str, bool]
    margin: dict[str, float | None]
    flipped: bool | None = None

    @model_validator(mode="after")
    def _every_model(self):
        extra = self.model_extra or {}
        missing = [m for m in MODELS if m not in self.success or m not in extra]
        if missing:
            raise ValueError(f"request {self.case_id!r} has no outcome for model {missing[0]!r}; "
                             f"expected {', '.join(MODELS)}")
        return self

    def outcome(self, model: str) -> dict:
        return (self.model_extra or {})[model]


class CellInfo(_Open):
    id: str
    label: str
    axes: dict


class CellResult(_Result):
    """A grid cell's result (`DIR/results/<cell-id>.json`): M0 / M_e / M_f / M_ef metrics, decay, curve, rows.

    The grid's cell stage builds its result as this record (fields beyond the pinned ones are optional, so
    results of cell schema 1 read unchanged).

    Fields (those typed below are validated; the others are kept as written)::

        schema_version        SCHEMA_VERSION
        kind                  "grid-cell"
        cell_schema_version   CELL_SCHEMA_VERSION
        grid                  grid name
        cell                  {id, label, axes: {model, editor, edit_data, n_edits, recipe, method, layers, targets,
                               finetune_data, seed, ...labels}}
        config                resolved configuration: {model (ModelRef), editor (full editor config, null without
                               edits), recipe (full Recipe), edited_layers, requests {data, n, seed, zsre_target,
                               strict, digest}, finetune_data, data_settings (its source's settings), held_out {spec,
                               digest, settings}, downstream (lm-eval task specs), downstream_limit, eval_every};
                               cell schema 1 had `task` and `chatterbot` instead of data_settings/held_out
        stages                role -> {id, kind, created, seconds, host}: the stages the numbers come from
        model                 ModelIdentity of the base model (weights fingerprint)
        data                  edit data identity and rejections (null without edits)
        metrics               {M0, M_e, M_f, M_ef}: each `metrics.aggregate` (efficacy, paraphrase, neighborhood as
                               fractions, n, ...) plus task_accuracy / task_prefix_accuracy / n_task (the embedded
                               task) and, with lm-eval tasks configured, downstream {lm-eval task: {metric: value,
                               <metric>_stderr, ..., n (documents scored)}} (acc/acc_norm for multiple choice;
                               word_perplexity, byte_perplexity, bits_per_byte, token_perplexity, n_tokens for
                               ppl:) and downstream_score (mean acc over the tasks that have one: the study's DS);
                               M_e and M_ef are absent for n_edits = 0
        decay                 {edit_flip_ratio: {value, n_flipped, n_success_edited, n, ...},
                               relative_decrease: {efficacy, paraphrase, neighborhood},
                               downstream: {M0, M_e, M_f, M_ef, delta_edit, delta_finetune (embedded task accuracy),
                                            tasks: {lm-eval task: {metric: {M0, M_e, M_f, M_ef, delta_edit,
                                                    delta_finetune, delta_finetune_base}}},
                                            score: {the same for downstream_score}}} (E7); delta_edit = M_e - M0,
                               delta_finetune = M_ef - M_e, delta_finetune_base = M_f - M0
        downstream            how lm-eval tasks were scored: {spec {tasks, limit, num_fewshot, batch_size}, tasks
                               (lm-eval names), provenance {lm_eval_version, limit, num_fewshot, tasks: {name: {spec,
                               version, num_fewshot, output_type, n_documents, digest}}}}; null without lm-eval tasks
        curve                 decay curve of M_ef: [{step, efficacy, paraphrase, neighborhood, task_accuracy, ...}],
                               step 0 = M_e; `curve_base`: the same for M_f (step 0 = M0)
        requests              per-request survival table: [{case_id, M0, M_e, M_f, M_ef (RequestOutcome dicts),
                               success: {M0, M_e, M_f, M_ef}, margin: {...}, flipped}]
        training              {base: summary of M_f's training, edited: summary of M_ef's}
        timings               seconds per stage role
        environment           results.environment() of the process that assembled the result
    """

    kind: Literal["grid-cell"] = "grid-cell"
    cell_schema_version: int = Field(CELL_SCHEMA_VERSION, ge=1)
    grid: str
    cell: CellInfo
    config: dict = Field(default_factory=dict)
    stages: dict[str, dict] = Field(default_factory=dict)
    model: dict | None = None
    data: dict | None = None
    metrics: dict[str, Scores]
    decay: dict | None = None
    curve: list[dict] = Field(default_factory=list)
    curve_base: list[dict] = Field(default_factory=list)
    training: dict[str, dict] = Field(default_factory=dict)
    downstream: dict | None = None
    requests: list[CellRequestRow] = Field(default_factory=list)
    timings: dict[str, float | None] = Field(default_factory=dict)
    environment: dict = Field(default_factory=dict)

    @field_validator("cell_schema_version")
    @classmethod
    def _known_cell_version(cls, v: int) -> int:
        return _not_newer("cell_schema_version", v, CELL_SCHEMA_VERSION)

    @model_validator(mode="after")
    def _rows_for_edits(self):
        n_edits = int(self.cell.axes.get("n_edits") or 0)
        if n_edits > 0 and not self.requests:
            raise ValueError(f"n_edits={n_edits} but 'requests' is empty")
        return self


Result = Union[EditResult, EvaluationResult, FinetuneResult, CellResult]
_BY_KIND = {"edit": EditResult, "eval-edits": EvaluationResult, "finetune": FinetuneResult, "grid-cell": CellResult}


def validate_result(result: dict, *, where: str = "result", kind: str | None = None) -> Result:
    """The typed record of a result dict. Raises ResultSchemaError naming `where`, the field and the problem.

    kind: the expected kind (a file that holds another kind is refused); default: the result's own.
    """
    if not isinstance(result, dict):
        raise ResultSchemaError(f"{where}: a result is a JSON object, got {type(result).__name__}")
    got = result.get("kind")
    if kind is not None and got != kind:
        raise ResultSchemaError(f"{where}: kind is {got!r}, expected {kind!r}")
    cls = _BY_KIND.get(got)
    if cls is None:
        raise ResultSchemaError(f"{where}: kind {got!r} is not a result kind; known: {', '.join(_BY_KIND)}")
    data = {"schema_version": 1, **result}     # a file without a version was written before versions existed
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ResultSchemaError(f"{where}: {explain(e, cls, limit=5)}") from None


def read_result(path: str | Path, *, kind: str | None = None) -> Result:
    """Read and validate a result file. Raises ResultSchemaError naming the path (unreadable, not JSON, schema)."""
    from editdecay.core.files import MAX_RESULT_BYTES, read_json

    path = Path(path)
    data = read_json(path, "result file", limit=MAX_RESULT_BYTES, error=ResultSchemaError)
    return validate_result(data, where=str(path), kind=kind)


__all__ = ["CELL_SCHEMA_VERSION", "CellInfo", "CellRequestRow", "CellResult", "EditResult", "EvaluationResult",
           "FinetuneResult", "MODELS", "MODEL_NAMES", "ModelIdentity", "Result", "ResultSchemaError", "SCHEMA_VERSION",
           "Scores", "legacy_models", "read_result", "validate_result"]
