"""Edit a loaded model: statistics (E1) -> solver (E4/E5) -> batches -> patch."""

from __future__ import annotations

import logging

from editdecay.core.arch import check_layers
from editdecay.core.cache import Cache
from editdecay.core.checks import check_finite
from editdecay.core.errors import ConfigError
from editdecay.core.request import EditRequest
from editdecay.core.results import Timer
from editdecay.data.corpus import parse_corpus
from editdecay.edit.config import EditorConfig
from editdecay.edit.patch import EditPatch
from editdecay.edit.registry import editor_class
from editdecay.edit.run import EditingRun, validate_requests
from editdecay.edit.safety import check_statistics
from editdecay.edit.stats import second_moments
from editdecay.edit.target_values import TargetValues

log = logging.getLogger(__name__)


def _max_positions(model) -> int | None:
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return None


def validate_inputs(lm, cfg: EditorConfig, requests: list[EditRequest], *, strict: bool = False) -> None:
    """The checks an edit needs before any heavy work, in one place: the edited layers exist in the model
    (ConfigError naming the depth) and every request is usable with its tokenizer (DataError naming the request;
    `strict`: a subject that does not end on a token boundary is refused)."""
    check_layers(lm.model, list(cfg.layers), field="layers")
    validate_requests(lm.tokenizer, requests, strict=strict)


def build_run(lm, editor: str, cfg: EditorConfig, *, cache: Cache | None = None, progress: bool = True,
              stats_batch_size: int = 16, requests: list[EditRequest] | None = None) -> EditingRun:
    """Compute (or read from the cache) the statistics the editor needs, build it and start a fresh run.

    Raises NonFiniteError if a C_l (or a tensor the editor derives from it, e.g. an E5 projector) holds
    NaN/inf, StatisticsError if a C_l rests on fewer than d_k tokens or is numerically rank-deficient
    (`edit.safety.check_statistics`); fewer than 10 x d_k tokens is a warning kept in `run.warnings` (and the
    patch). The layers must have been checked against the model (`validate_inputs`, as `edit_model` does).
    With `cfg.stats_tolerance` the statistics are adaptive (edit/stats_adaptive.py) and measured on the keys
    of `requests` (their first 256), which must then be given; the editor class gives the measure
    (`statistics_probe`).
    """
    cls = editor_class(editor)
    timer = Timer()
    stats, warnings = None, []
    with timer("statistics"):
        if cls.needs_statistics:
            corpus = parse_corpus(cfg.stats_corpus)
            max_pos = _max_positions(lm.model)
            if max_pos is not None and corpus.seq_len > max_pos:
                corpus = parse_corpus(cfg.stats_corpus, seq_len=max_pos)     # short-context models
            if cfg.stats_tolerance is not None:
                stats = _adaptive_stats(lm, cls, cfg, corpus, requests, cache, stats_batch_size, progress)
            else:
                stats = second_moments(lm, cfg.layers, corpus=corpus, n_tokens=cfg.stats_tokens,
                                       dtype=cfg.stats_dtype, cache=cache, batch_size=stats_batch_size,
                                       progress=progress)
            check_finite("E1 statistics", {f"layer {l}": stats[l] for l in cfg.layers})
            warnings = check_statistics(stats, cfg.layers, modules={l: k.module for l, k in stats.keys.items()})
        editor_obj = cls(cfg, stats, cache)
    run = editor_obj.start(lm, progress=progress)
    run.warnings.extend(warnings)
    run.timer.seconds.update(timer.seconds)
    run.stats_provenance = stats.provenance if stats is not None else None
    return run


def _adaptive_stats(lm, cls, cfg: EditorConfig, corpus, requests, cache, batch_size: int, progress: bool):
    """E1 until the editor's solve on the edit keys settles (stats_adaptive); the keys are E2's, on the
    unedited model, with the run's own context templates; the editor class says what is measured."""
    from editdecay.core.arch import arch_for, get_module, resolve_name
    from editdecay.core.devices import module_device
    from editdecay.edit.context import context_templates
    from editdecay.edit.keys import compute_keys
    from editdecay.edit.stats_adaptive import adaptive_second_moments

    if not requests:
        raise ValueError("adaptive statistics (stats_tolerance) measure on the edit keys: pass `requests`")
    templates = context_templates(lm.model, lm.tokenizer, n=cfg.n_context_templates, length=cfg.context_length,
                                  seed=cfg.seed)
    keys = compute_keys(lm.model, lm.tokenizer, list(requests)[:256], list(cfg.layers), templates)
    spec = arch_for(lm.model)
    device = module_device(get_module(lm.model, resolve_name(lm.model, spec.mlp_out_name(cfg.layers[0]))))
    probe = cls.statistics_probe(cfg, keys, device)
    return adaptive_second_moments(lm, cfg.layers, corpus=corpus, probe=probe, tolerance=cfg.stats_tolerance,
                                   max_tokens=cfg.stats_tokens, dtype=cfg.stats_dtype, cache=cache,
                                   batch_size=batch_size, progress=progress)


def edit_model(lm, editor: str, cfg: EditorConfig, requests: list[EditRequest], *, batch_size: int | None = None,
               cache: Cache | None = None, progress: bool = True, strict: bool = False,
               target_values: TargetValues | None = None) -> tuple[EditPatch, EditingRun]:
    """Edit `lm.model` in place with `requests`, in one batch or sequential batches of `batch_size`.

    Returns the total patch (relative to the model as it was) and the run (call `run.restore()`
    to undo). Requests are validated before statistics or any other heavy work (`strict`: a subject
    that does not end on a token boundary is refused, TokenBoundaryError). If the edit fails
    (StatisticsError, NonFiniteError, ...), the model is restored before the error propagates:
    no partial edit is left behind. Warnings (judgement calls) are in `run.warnings` and the patch.

    `target_values`: E3 values computed ahead for the first batch (edit/target_values.py, a grid's targets stage);
    ConfigError for an editor that computes no E3 targets, EditDecayError (from the run) if they were computed for
    other requests, templates or settings than the first batch's.
    """
    validate_inputs(lm, cfg, requests, strict=strict)
    if target_values is not None and not editor_class(editor).separate_targets:
        raise ConfigError(f"editor {editor!r} computes no E3 target values; it cannot take precomputed ones")
    run = build_run(lm, editor, cfg, cache=cache, progress=progress, requests=requests)
    run.target_values = target_values
    size = batch_size or len(requests)
    try:
        for start in range(0, len(requests), size):
            run.edit_batch(requests[start:start + size])
    except BaseException:
        run.restore()
        raise
    extra = {"stats": run.stats_provenance, "batch_size": size, "n_batches": -(-len(requests) // size)}
    patch = run.patch(extra=extra)
    if all(not bool(t.any()) for t in patch.tensors().values()):
        # An edit that changed nothing is named, never reported as a run like any other.
        w = (f"the {editor} edit changed nothing: every weight delta is zero, so M_e is M0 "
             f"(check the editor's settings, e.g. v_num_grad_steps, v_lr, mom2_update_weight)")
        run.warnings.append(w)
        patch.extra.setdefault("warnings", []).append(w)
    return patch, run
