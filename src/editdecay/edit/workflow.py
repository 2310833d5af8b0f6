"""What `editdecay edit` and `editdecay eval-edits` do: load data and model in the right order, evaluate, build
results (models named M0 and M_e, core/schema.py).

Data and configs are validated before any model is loaded (fail early, cheaply).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from editdecay.core.config import Config
from editdecay.core.model_ref import ModelRef
from editdecay.core.placement import DEFAULT_DEVICE
from editdecay.core.results import Timer, environment
from editdecay.data.sources import EditSelection
from editdecay.measure.metrics import aggregate, evaluate_requests

log = logging.getLogger(__name__)


def evaluate_stage_result(model: ModelRef, requests: EditSelection | None, patch_dir: Path | None, *,
                          limit: int | None = None, seed: int | None = None, batch_size: int | None = None,
                          device: str = DEFAULT_DEVICE, allow_foreign_patch: bool = False) -> dict:
    """Evaluate edit metrics of one model: M0 (no patch) or M_e (the patch in `patch_dir` applied).

    `requests` None: the patch's own requests (the first `limit`, or a seeded sample with `seed`), else
    worldfacts. A patch computed on other weights than the loaded model's is refused (ConfigError) unless
    `allow_foreign_patch`; the result's `patch` entry records both fingerprints either way.
    """
    timer = Timer()
    patch = None
    if patch_dir is not None:
        from editdecay.edit.registry import load_patch

        patch = load_patch(patch_dir)
    with timer("load_data"):
        if patch is not None and requests is None:
            # The documented default with a patch: its own requests.
            from editdecay.data import EditDataset, subset

            ds = subset(EditDataset(f"patch:{patch_dir}", tuple(patch.requests), len(patch.requests)), limit, seed,
                        field="--limit")
        else:
            ds = (requests or EditSelection(data="worldfacts")).load()
            if ds.rejected:
                log.warning(ds.summary())
    with timer("load_model"):
        lm = model.load(device=device)
    stage, handle, patch_info = "M0", None, None
    if patch is not None:
        check = patch.check_model(lm.identity, allow_foreign=allow_foreign_patch, where=f"patch {patch_dir}")
        patch_info = {"dir": str(patch_dir), "editor": patch.editor, "layers": list(patch.layers), **check}
        handle = patch.apply(lm.model)
        stage = "M_e"
    with timer("evaluate"):
        outcomes = evaluate_requests(lm.model, lm.tokenizer, list(ds.requests), batch_size=batch_size, progress=True)
    if handle is not None:
        handle.revert()
    return {
        "kind": "eval-edits",
        "config": {"model": model.to_dict(), "requests": requests.to_dict() if requests else None,
                   "patch": str(patch_dir) if patch_dir else None, "batch_size": batch_size, "device": device,
                   "allow_foreign_patch": allow_foreign_patch},
        "model": lm.identity.to_dict(),
        **({"patch": patch_info} if patch_info is not None else {}),
        "data": ds.to_dict(),
        "metrics": {stage: aggregate(outcomes)},
        "requests": [{"model": stage, **o.to_dict()} for o in outcomes],
        "timings": timer.seconds,
        "environment": environment(device),
    }


def edit_config(editor: str, lm, overrides: dict):
    """The editor's preset for the loaded model (its family, or the embedded model's own) + explicit overrides,
    validated (edit/registry.py `resolve_config`)."""
    from editdecay.edit.registry import resolve_config

    return resolve_config(editor, lm.identity.family, lm.identity.name, overrides)


class EditJob(Config):
    """What `editdecay edit` does, as one record: edit `model` with `editor` (its preset for the model, then
    `overrides`) on the selected `requests`, in sequential batches of `batch_size` (None: one batch), and measure
    the requests under M0 and M_e (`eval_batch_size` prompts per pass; None: from free memory)."""

    config_name: ClassVar[str] = "edit"

    model: ModelRef = Field(default_factory=ModelRef, description="the model to edit")
    editor: str = Field("memit", description="a registered editor (edit/registry.py)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="editor config fields over its preset")
    requests: EditSelection = Field(description="the edit requests")
    batch_size: int | None = Field(None, ge=1, description="edits per sequential batch (None: one batch)")
    eval_batch_size: int | None = Field(None, ge=1, description="prompts per scoring pass (None: from free memory)")


def run_edit(job: EditJob, *, out: Path | None = None, device: str = DEFAULT_DEVICE, cache=None,
             progress: bool = True) -> dict:
    """Load data, then the model; evaluate M0, edit, evaluate M_e; save patch + result.json into `out`.
    Raises ConfigError for an unknown editor or a setting it does not have before anything is loaded."""
    from editdecay.core.cache import Cache
    from editdecay.edit.api import edit_model, validate_inputs
    from editdecay.edit.registry import check_fields

    check_fields(job.editor, job.overrides)   # an unknown editor, or another editor's setting: fail before loading
    timer = Timer()
    with timer("load_data"):
        ds = job.requests.load()
        if ds.rejected:
            log.warning(ds.summary())
        requests = list(ds.requests)
    with timer("load_model"):
        lm = job.model.load(device=device, cache=cache)
    cfg = edit_config(job.editor, lm, job.overrides)
    validate_inputs(lm, cfg, requests, strict=job.requests.strict)      # before the (slow) M0 evaluation
    with timer("evaluate_M0"):
        base = evaluate_requests(lm.model, lm.tokenizer, requests, batch_size=job.eval_batch_size, progress=progress)
    patch, run = edit_model(lm, job.editor, cfg, requests, batch_size=job.batch_size, cache=cache or Cache.default(),
                            progress=progress, strict=job.requests.strict)
    with timer("evaluate_M_e"):
        edited = evaluate_requests(lm.model, lm.tokenizer, requests, batch_size=job.eval_batch_size,
                                   progress=progress)
    timings = {**timer.seconds, **run.timer.seconds}
    result = {
        "kind": "edit",
        "config": {**job.to_dict(), "device": device, "editor_config": cfg.to_dict()},
        "model": lm.identity.to_dict(),
        "data": ds.to_dict(),
        "metrics": {"M0": aggregate(base), "M_e": aggregate(edited)},
        "requests": [{"case_id": a.case_id, "M0": a.to_dict(), "M_e": b.to_dict()} for a, b in zip(base, edited)],
        "edit": {"layers": list(patch.layers), "delta_norms": patch.norms(), **run.provenance()},
        "warnings": list(run.warnings),
        "timings": timings,
        "environment": environment(device),
    }
    if out is not None:
        from editdecay.core.results import write_result

        patch.extra["timings"] = timings
        patch.save(out)
        write_result(Path(out) / "result.json", result)
    return result
