"""The result-file schema: what an edit, a fine-tuning run and a grid cell write, as typed records.

Every writer validates its result through `validate_result` before the file is written
(`core.results.write_result`), and the report reads cell results through `read_result`, so a
field a writer forgot or misspelt fails where it is made, not in somebody's report months later.

The records are open (`extra="allow"`): the JSON files keep their shape, and a field added by a
newer writer does not break an older reader. What the schema pins is what readers rely on:
the kind, the versions, the model identity, the per-stage metrics with their `n`, and the
per-request rows (case id, outcomes under every model, success flags, margins).

Versions: `schema_version` is the version of this schema (1: results written before the
schema was typed, which read unchanged; 2: validated by this module). Grid cells also carry
`cell_schema_version` (1), the version of the cell layout (`CellResult` describes every field).
A file from a newer editdecay (a higher version) is refused with a message saying so.
"""

from __future__ import annotations

import json
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

from editdecay.core.errors import EditDecayError

SCHEMA_VERSION = 2
CELL_SCHEMA_VERSION = 1
MODELS = ("M0", "M_e", "M_f", "M_ef")          # E7: base, edited, fine-tuned base, edited then fine-tuned


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
            raise ValueError(f"{v!r} is not a fraction in [0, 1]")
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


class EditRequestRow(_Open):
    case_id: str
    pre: dict
    post: dict


class EditResult(_Result):
    """`editdecay edit` / `edit.workflow.run_edit`: metrics before and after editing, per request."""

    kind: Literal["edit"]
    config: dict
    model: ModelIdentity
    data: dict
    metrics: dict[str, Scores]
    requests: list[EditRequestRow]
    edit: dict
    timings: dict[str, float]


class EvaluationResult(_Result):
    """`editdecay eval-edits`: metrics of one model (optionally patched)."""

    kind: Literal["eval-edits"]
    metrics: dict[str, Scores]


class FinetuneRequestRow(_Open):
    case_id: str


class FinetuneResult(_Result):
    """`editdecay finetune` / `finetune.run.run_finetune`. Written at the start (status "running") and again at the
    end, so metrics and curve may still be empty."""

    kind: Literal["finetune"]
    status: str
    model: ModelIdentity
    recipe: dict
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

    Fields (those typed below are validated; the others are kept as written)::

        schema_version        SCHEMA_VERSION
        kind                  "grid-cell"
        cell_schema_version   CELL_SCHEMA_VERSION
        grid                  grid name
        cell                  {id, label, axes: {model, editor, edit_data, n_edits, recipe, method, layers, targets,
                               finetune_data, seed, ...labels}}
        config                resolved configuration: {model, editor (full editor config, null without edits),
                               recipe (full Recipe), edited_layers, requests {data, n, seed, zsre_target, strict},
                               finetune_data, task, downstream (task specs), downstream_limit, eval_every}
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

    kind: Literal["grid-cell"]
    cell_schema_version: int = Field(ge=1)
    grid: str
    cell: CellInfo
    metrics: dict[str, Scores]
    decay: dict | None = None
    curve: list[dict] = Field(default_factory=list)
    requests: list[CellRequestRow] = Field(default_factory=list)

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


def _loc(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _explain(e: ValidationError, where: str) -> str:
    """One clause per problem, e.g. "requests[2] has no field 'success'"; at most five."""
    parts = []
    for err in e.errors()[:5]:
        loc = list(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing" and loc:
            parent = _loc(loc[:-1])
            parts.append(f"{parent + ' has' if parent else 'has'} no field {str(loc[-1])!r}")
        elif loc:
            parts.append(f"{_loc(loc)}: {msg}")
        else:
            parts.append(msg)
    more = f" (+{len(e.errors()) - 5} more)" if len(e.errors()) > 5 else ""
    return f"{where}: " + "; ".join(parts) + more


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
        raise ResultSchemaError(_explain(e, where)) from None


def read_result(path: str | Path, *, kind: str | None = None) -> Result:
    """Read and validate a result file. Raises ResultSchemaError naming the path (unreadable, not JSON, schema)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultSchemaError(f"result file {str(path)!r} is unreadable: {e}") from None
    return validate_result(data, where=str(path), kind=kind)


__all__ = ["CELL_SCHEMA_VERSION", "CellRequestRow", "CellResult", "EditResult", "EvaluationResult", "FinetuneResult",
           "MODELS", "ModelIdentity", "Result", "ResultSchemaError", "SCHEMA_VERSION", "Scores",
           "read_result", "validate_result"]
