"""A run whose edit is a set of weight deltas: the bookkeeping every weight-editing run shares.

MEMIT and AlphaEdit (edit/run.py), FT-M (edit/ft.py) and MEND (edit/mend.py) all end in per-module weight
deltas. This class keeps, for each edited module, its original weight and the accumulated delta, and holds
one invariant: at any time the module's weight equals original + accumulated delta (cast once to the
weight's dtype), so the live model and `patch()` applied to a fresh copy of the base are bit-identical;
`restore()` copies the originals back.

Memory: the accumulated delta is float64 on the CPU (exact accumulation without a float64 copy of a
weight on an accelerator); the patch stores it in float32.
"""

from __future__ import annotations

import torch

from editdecay.core.arch import get_module
from editdecay.core.request import EditRequest
from editdecay.core.results import Timer
from editdecay.edit.config import EditorConfig
from editdecay.edit.patch import EditPatch


class WeightDeltaRun:
    """Edits `modules` (real module paths) of `lm.model` in place; a subclass computes the deltas (`edit_batch`).

    Shared attributes every run has (edit/api.py and the workflow read them): `timer`, `warnings` (judgement
    calls, kept in the patch), `requests` (edited so far), `stats_provenance` (set by `api.build_run`).
    """

    def __init__(self, lm, editor: str, cfg: EditorConfig, modules: list[str], layers: tuple[int, ...], *,
                 progress: bool = True):
        self.lm, self.editor_name, self.cfg = lm, editor, cfg
        self.layers = tuple(layers)
        self.modules = tuple(modules)
        self.originals = {n: get_module(lm.model, n).weight.detach().clone() for n in self.modules}
        self.accum = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in self.originals.items()}
        self.requests: list[EditRequest] = []
        self.timer = Timer()
        self.progress = progress
        self.warnings: list[str] = []
        self.stats_provenance: dict | None = None

    def edit_batch(self, requests: list[EditRequest]) -> None:
        raise NotImplementedError(f"{type(self).__name__}.edit_batch")

    def add_delta(self, name: str, delta: torch.Tensor) -> None:
        """Add `delta` (the weight's own layout and shape) to module `name`'s accumulated delta and write the
        weight as original + delta."""
        self.accum[name] += delta.to(device="cpu", dtype=torch.float64)
        self._write(name)

    def take_weight(self, name: str) -> None:
        """Make the accumulated delta of `name` what its weight now holds minus the original (after an optimiser
        changed the weight in place), then write the weight back as original + the stored delta."""
        w = get_module(self.lm.model, name).weight
        self.accum[name] = (w.detach().to("cpu", torch.float64) - self.originals[name].to("cpu", torch.float64))
        self._write(name)

    def _write(self, name: str) -> None:
        w = get_module(self.lm.model, name).weight
        with torch.no_grad():
            w.copy_(self.originals[name] + self.stored_delta(name).to(device=w.device, dtype=w.dtype))

    def stored_delta(self, name: str) -> torch.Tensor:
        """The delta as the patch stores it (float32); applied exactly as `EditPatch.apply` does."""
        return self.accum[name].to(torch.float32)

    def patch_extra(self) -> dict:
        """What a subclass adds to the patch's `extra` (default: nothing)."""
        return {}

    def patch(self, extra: dict | None = None) -> EditPatch:
        return EditPatch(
            deltas={n: self.stored_delta(n).cpu() for n in self.modules},
            layers=self.layers, editor=self.editor_name, config=self.cfg.model_dump(mode="json"),
            requests=tuple(self.requests), model_identity=self.lm.identity.to_dict(),
            extra={"timings": dict(self.timer.seconds), "warnings": list(self.warnings), **self.patch_extra(),
                   **(extra or {})},
        )

    def provenance(self) -> dict:
        """What results record about this run: the statistics' provenance and what `patch_extra` adds."""
        return {"statistics": self.stats_provenance, **self.patch_extra()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, w in self.originals.items():
                get_module(self.lm.model, n).weight.copy_(w)


__all__ = ["WeightDeltaRun"]
