"""Glue that the CLI commands share: load data and model in the right order, evaluate, build results.

Data and configs are validated before any model is loaded (fail early, cheaply).
"""

from __future__ import annotations

import logging
from pathlib import Path

from editdecay.core.models import load_model
from editdecay.core.results import Timer, environment
from editdecay.data import load_edit_data
from editdecay.measure.metrics import aggregate, evaluate_requests

log = logging.getLogger(__name__)


def evaluate_stage_result(*, model: str, data: str | None, limit: int | None, seed: int | None,
                          patch_dir: Path | None, zsre_target: str = "answers", strict: bool = False,
                          batch_size: int | None = None, dtype: str = "float32", device: str = "cpu",
                          allow_foreign_patch: bool = False, allow_pickle: bool = False,
                          trust_remote_code: bool = False) -> dict:
    """Evaluate edit metrics of one model stage: `pre` (no patch) or `post` (patch applied).

    A patch computed on other weights than the loaded model's is refused (ConfigError) unless
    `allow_foreign_patch`; the result's `patch` entry records both fingerprints either way.
    """
    timer = Timer()
    patch = None
    if patch_dir is not None:
        from editdecay.edit.patch import EditPatch

        patch = EditPatch.load(patch_dir)
    with timer("load_data"):
        if patch is not None and data is None:
            # The documented default with a patch: its own requests (--limit/--seed apply to them too).
            from editdecay.data import EditDataset, subset

            ds = subset(EditDataset(f"patch:{patch_dir}", tuple(patch.requests), len(patch.requests)), limit, seed)
            requests = list(ds.requests)
            data_info = ds.to_dict()
        else:
            ds = load_edit_data(data or "worldfacts", zsre_target=zsre_target, strict=strict, limit=limit, seed=seed)
            if ds.rejected:
                log.warning(ds.summary())
            requests = list(ds.requests)
            data_info = ds.to_dict()
    with timer("load_model"):
        lm = load_model(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code)
    stage = "pre"
    handle = None
    patch_info = None
    if patch is not None:
        check = patch.check_model(lm.identity, allow_foreign=allow_foreign_patch, where=f"patch {patch_dir}")
        patch_info = {"dir": str(patch_dir), "editor": patch.editor, "layers": list(patch.layers), **check}
        handle = patch.apply(lm.model)
        stage = "post"
    with timer("evaluate"):
        outcomes = evaluate_requests(lm.model, lm.tokenizer, requests, batch_size=batch_size, progress=True)
    if handle is not None:
        handle.revert()
    return {
        "kind": "eval-edits",
        "config": {"model": model, "data": data, "limit": limit, "seed": seed, "patch": str(patch_dir) if patch_dir else None,
                   "zsre_target": zsre_target, "strict": strict, "batch_size": batch_size, "dtype": dtype, "device": device,
                   "allow_foreign_patch": allow_foreign_patch, "allow_pickle": allow_pickle,
                   "trust_remote_code": trust_remote_code},
        "model": lm.identity.to_dict(),
        **({"patch": patch_info} if patch_info is not None else {}),
        "data": data_info,
        "metrics": {stage: aggregate(outcomes)},
        "requests": [{"stage": stage, **o.to_dict()} for o in outcomes],
        "timings": timer.seconds,
        "environment": environment(device),
    }


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """"4,5,6" or "4-8" -> sorted layer indices; None or "" stays None. Errors name the text."""
    from editdecay.core.errors import ConfigError
    from editdecay.core.layers import parse_layer_text

    if text is None or text == "":
        return None
    try:
        return parse_layer_text(text)
    except ValueError as e:
        raise ConfigError(f"layers {e}") from None


def edit_config(editor: str, lm, overrides: dict):
    """The editor's preset for the loaded model (its family, or the embedded model's own) + explicit overrides,
    validated (edit/registry.py `resolve_config`)."""
    from editdecay.edit.registry import resolve_config

    return resolve_config(editor, lm.identity.family, lm.identity.name, overrides)


def run_edit(*, model: str, editor: str, data: str, n: int | None, seed: int | None, out: Path | None,
             overrides: dict, batch_size: int | None = None, zsre_target: str = "answers", strict: bool = False,
             dtype: str = "float32", device: str = "cpu", eval_batch_size: int | None = None, progress: bool = True,
             cache=None, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Load data, then the model; evaluate (pre), edit, evaluate (post); save patch + result.json."""
    from editdecay.core.cache import Cache
    from editdecay.edit.api import edit_model, validate_inputs
    from editdecay.edit.registry import check_fields

    check_fields(editor, overrides)          # an unknown editor, or another editor's setting: fail before loading
    timer = Timer()
    with timer("load_data"):
        ds = load_edit_data(data, zsre_target=zsre_target, strict=strict, limit=n, seed=seed)
        if ds.rejected:
            log.warning(ds.summary())
        requests = list(ds.requests)
    with timer("load_model"):
        lm = load_model(model, dtype=dtype, device=device, cache=cache, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code)
    cfg = edit_config(editor, lm, overrides)
    validate_inputs(lm, cfg, requests, strict=strict)                 # before the (slow) pre-edit evaluation
    with timer("evaluate_pre"):
        pre = evaluate_requests(lm.model, lm.tokenizer, requests, batch_size=eval_batch_size, progress=progress)
    patch, run = edit_model(lm, editor, cfg, requests, batch_size=batch_size, cache=cache or Cache.default(),
                            progress=progress, strict=strict)
    with timer("evaluate_post"):
        post = evaluate_requests(lm.model, lm.tokenizer, requests, batch_size=eval_batch_size, progress=progress)
    timings = {**timer.seconds, **run.timer.seconds}
    result = {
        "kind": "edit",
        "config": {"model": model, "editor": editor, "data": data, "n": n, "seed": seed, "batch_size": batch_size,
                   "zsre_target": zsre_target, "strict": strict, "dtype": dtype, "device": device,
                   "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code, "editor_config": cfg.model_dump(mode="json")},
        "model": lm.identity.to_dict(),
        "data": ds.to_dict(),
        "metrics": {"pre": aggregate(pre), "post": aggregate(post)},
        "requests": [{"case_id": a.case_id, "pre": a.to_dict(), "post": b.to_dict()} for a, b in zip(pre, post)],
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
