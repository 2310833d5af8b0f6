"""Glue that the CLI commands share: load data and model in the right order, evaluate, build results.

Data and configs are validated before any model is loaded (fail early, cheaply).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data import load_edit_data
from .metrics import aggregate, evaluate_requests
from .models import load_model
from .results import Timer, environment

log = logging.getLogger(__name__)


def evaluate_stage_result(*, model: str, data: str | None, limit: int | None, seed: int | None,
                          patch_dir: Path | None, zsre_target: str = "answers", strict: bool = False,
                          batch_size: int = 32, dtype: str = "float32", device: str = "cpu") -> dict:
    """Evaluate edit metrics of one model stage: `pre` (no patch) or `post` (patch applied)."""
    timer = Timer()
    patch = None
    if patch_dir is not None:
        from .patch import EditPatch

        patch = EditPatch.load(patch_dir)
    with timer("load_data"):
        if patch is not None and data is None:
            requests = list(patch.requests)
            data_info = {"name": f"patch:{patch_dir}", "n_kept": len(requests)}
        else:
            ds = load_edit_data(data or "worldfacts", zsre_target=zsre_target, strict=strict, limit=limit, seed=seed)
            if ds.rejected:
                log.warning(ds.summary())
            requests = list(ds.requests)
            data_info = ds.to_dict()
    with timer("load_model"):
        lm = load_model(model, dtype=dtype, device=device)
    stage = "pre"
    handle = None
    if patch is not None:
        handle = patch.apply(lm.model)
        stage = "post"
    with timer("evaluate"):
        outcomes = evaluate_requests(lm.model, lm.tokenizer, requests, batch_size=batch_size, progress=True)
    if handle is not None:
        handle.revert()
    return {
        "kind": "eval-edits",
        "config": {"model": model, "data": data, "limit": limit, "seed": seed, "patch": str(patch_dir) if patch_dir else None,
                   "zsre_target": zsre_target, "strict": strict, "batch_size": batch_size, "dtype": dtype, "device": device},
        "model": lm.identity.to_dict(),
        "data": data_info,
        "metrics": {stage: aggregate(outcomes)},
        "requests": [{"stage": stage, **o.to_dict()} for o in outcomes],
        "timings": timer.seconds,
        "environment": environment(device),
    }
