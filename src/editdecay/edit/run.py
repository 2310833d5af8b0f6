"""A locate-then-edit run: validated requests in, weight deltas out (docs/METHODS.md E2-E5).

Invariant (edit/deltas.py): at any time the model's edited weights equal original + accumulated
delta (cast once to the weight dtype), so the live model and `patch()` applied to
a fresh copy of the base are bit-identical; `restore()` puts the originals back.

Memory and devices: the targets z, the residuals R and the keys K of a batch are
float32 tensors on the CPU (O(n) host bookkeeping); each layer's solve runs on the
device of that layer's W_out (`core.devices.module_device`), reading K and R in
column blocks (edit/solve.py). The accumulated delta is float64 on the CPU, so no
float64 copy of a weight matrix sits on an accelerator.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from tqdm.auto import tqdm

from editdecay.core.arch import arch_for, as_out_in, get_module, resolve_name
from editdecay.core.checks import check_finite
from editdecay.core.devices import module_device
from editdecay.core.errors import DataError, TokenBoundaryError
from editdecay.core.request import EditRequest, slot_problem
from editdecay.core.tokens import boundary_problem, encode_target
from editdecay.edit.config import LocateThenEditConfig, TargetValuesConfig
from editdecay.edit.context import ContextTemplates, context_templates
from editdecay.edit.keys import block_outputs_at_subject, compute_keys
from editdecay.edit.deltas import WeightDeltaRun
from editdecay.edit.targets import compute_targets

log = logging.getLogger(__name__)


class Solver(Protocol):
    """The per-layer solve of a locate-then-edit editor (edit/editor.py `LocateThenEdit`)."""

    name: str
    cfg: LocateThenEditConfig

    def layer_delta(self, layer: int, K: torch.Tensor, R: torch.Tensor, *, device=None) -> torch.Tensor: ...
    def after_batch(self, keys_after: dict[int, torch.Tensor], devices: dict | None = None) -> None: ...


def validate_requests(tokenizer, requests: list[EditRequest], templates: ContextTemplates | None = None, *,
                      strict: bool = False) -> list[str]:
    """Cheap checks before any heavy work: subject in prompt, targets that tokenize, and the token-boundary
    rule (`core.tokens.encode_subject_prompt`) for the bare prompt and, when given, every context template.

    A subject that does not end on a token boundary of its prompt (e.g. "{}ese cuisine" with "Japan")
    is edited at the prompt's token that spans the subject's end, the token evaluation sees (as the
    original MEMIT code does); that is returned as a warning, or with `strict` raised as
    TokenBoundaryError. Raises DataError naming the request's index and case_id.
    """
    if not requests:
        raise DataError("no edit requests given")
    rendered = templates.flat if templates is not None else ("{}",)
    warnings = []
    for i, r in enumerate(requests):
        where = f"request {i} ({r.case_id})"
        slots = slot_problem(r.prompt, r.subject)
        if slots is not None:
            raise DataError(f"{where}: field 'prompt': {slots}")
        if not r.subject.strip():
            raise DataError(f"{where}: field 'subject' is empty")
        try:
            encode_target(tokenizer, r.target_new)
            problems = [p for t in rendered if (p := boundary_problem(tokenizer, t.replace("{}", r.prompt), r.subject))]
        except DataError as e:
            raise type(e)(f"{where}: {e}") from None
        if problems:
            text = f"{where}: {problems[0]}" + (f" (in {len(problems)} of {len(rendered)} context templates)"
                                                 if len(rendered) > 1 else "")
            if strict:
                raise TokenBoundaryError(f"{text}. Refused (strict): write the template so that the subject is a "
                                         f"whole word followed by a space or punctuation, e.g. "
                                         f"'The cuisine of {{}} is famous for'")
            warnings.append(text)
    return warnings


class EditingRun(WeightDeltaRun):
    """Edits one model in place, batch after batch (locate-then-edit: deltas on W_out of the edited layers), and
    can hand back the total patch (edit/deltas.py holds the weight bookkeeping and its invariant)."""

    def __init__(self, lm, solver: Solver, *, progress: bool = True):
        model = lm.model
        spec = arch_for(model)
        layers = tuple(solver.cfg.layers)          # sorted, unique (EditorConfig); checked against the model by
                                                   # build_run before statistics
        names = {l: resolve_name(model, spec.mlp_out_name(l)) for l in layers}   # patch keys
        super().__init__(lm, solver.name, solver.cfg, list(names.values()), layers, progress=progress)
        self.solver, self.spec, self.names = solver, spec, names
        self.devices = {l: module_device(get_module(model, n)) for l, n in names.items()}
        self.target_log: list[dict] = []
        # E3 values computed ahead for the first batch (an edit/target_values.py `TargetValues`, from a grid's targets
        # stage), or None. (Not imported here: target_values checks requests with this module's validate_requests.)
        self.target_values = None
        with self.timer("context"):
            # Grouped by context type (E2): [("{}",), (<sampled prefixes>)]; recorded in the patch.
            self.templates = context_templates(model, lm.tokenizer, n=self.cfg.n_context_templates,
                                               length=self.cfg.context_length, seed=self.cfg.seed)

    def edit_batch(self, requests: list[EditRequest]) -> None:
        """E3 targets at l*, then E4/E5 layer by layer under the partly edited model.

        Raises NonFiniteError (core.checks.check_finite) as soon as a target value, key, block
        output or delta is NaN or infinite, before that delta reaches the model; layers edited
        earlier in the failing batch stay edited (`restore()` undoes the run; `api.edit_model`
        does so itself). Raises DataError for requests that `validate_requests` rejects.
        """
        model, tok, cfg = self.lm.model, self.lm.tokenizer, self.cfg
        for w in validate_requests(tok, requests, self.templates):
            if w not in self.warnings:
                log.warning(w)
                self.warnings.append(w)
        ids = [r.case_id for r in requests]
        top = self.layers[-1]
        values, self.target_values = self.target_values, None           # precomputed: the first batch's only
        if values is not None:
            values.check(TargetValuesConfig.of(cfg), requests, self.lm.identity.fingerprint)
            if values.templates != self.templates:
                # Same settings and weights, other sampled prefixes: another device, dtype or library version.
                w = (f"precomputed E3 target values used other context templates ({list(values.templates.flat)}) "
                     f"than this edit samples ({list(self.templates.flat)}): another device, dtype or library "
                     f"version; E3 is computed here instead")
                log.warning(w)
                self.warnings.append(w)
                values = None
        if values is not None:
            tr = values.result
        else:
            with self.timer("targets"):
                settings = TargetValuesConfig.of(cfg).settings()
                tr = compute_targets(model, tok, requests, self.templates, settings, progress=self.progress)
        self.target_log.append({"n": len(requests), "mean_final_loss": sum(tr.loss) / len(tr.loss),
                                "mean_steps": sum(tr.steps) / len(tr.steps),
                                **({"precomputed": True} if values is not None else {})})
        z = tr.z.T.cpu()                                                        # (d, n) float32, host
        check_finite("E3 target values z", {f"case_id {i}": z[:, c] for c, i in enumerate(ids)})
        m = len(self.layers)
        for j, layer in enumerate(tqdm(self.layers, desc=f"{self.solver.name} layers", disable=not self.progress,
                                       leave=False)):
            with self.timer("keys"):
                K = compute_keys(model, tok, requests, [layer], self.templates)[layer]      # (d_k, n)
                h_now = block_outputs_at_subject(model, tok, requests, top)               # (d, n)
            check_finite(f"E2 keys at layer {layer}", {f"case_id {i}": K[:, c] for c, i in enumerate(ids)})
            check_finite(f"block {top} outputs", {f"case_id {i}": h_now[:, c] for c, i in enumerate(ids)})
            R = (z - h_now) / (m - j)                                                     # E4: spread residual
            with self.timer("solve"):
                delta = self.solver.layer_delta(layer, K, R, device=self.devices[layer])  # (d, d_k)
            check_finite(f"{self.solver.name} delta at layer {layer}", delta)
            self.add_delta(self.names[layer], as_out_in(delta, self.spec))
        with self.timer("keys"):
            keys_after = compute_keys(model, tok, requests, list(self.layers), self.templates)
        check_finite("E2 keys after the edit", {f"layer {l}": K for l, K in keys_after.items()})
        self.solver.after_batch(keys_after, self.devices)
        self.requests.extend(requests)

    def patch_extra(self) -> dict:
        """E3 target logs per batch and the E2 context templates."""
        return {"context_templates": self.templates.to_dict(), "targets": self.target_log}
