"""The acceptance figure of the editors that need no training, on the embedded model: ES >= 90 % after editing 50
worldfacts requests (the seeded sample a grid's `n_edits: [50]`, `seeds: [0]` edits) in one batch with the
embedded preset. PS and NS are measured by benchmarks/editor_families.py (with MEND, whose network is trained
first, and edit time and memory); docs/editor-families/README.md has the figures."""

from __future__ import annotations

import pytest
import torch

from editdecay.data import load_edit_data
from editdecay.edit.api import edit_model
from editdecay.edit.workflow import edit_config
from editdecay.measure.metrics import aggregate, evaluate_requests

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("editor", ["ft", "grace"])
def test_embedded_preset_reaches_90_percent_efficacy_at_50_edits(editor, embedded):
    requests = list(load_edit_data("worldfacts", limit=50, seed=0).requests)
    before = {n: p.detach().clone() for n, p in embedded.model.named_parameters()}
    patch, run = edit_model(embedded, editor, edit_config(editor, embedded, {}), requests, progress=False)
    try:
        after = aggregate(evaluate_requests(embedded.model, embedded.tokenizer, requests))
    finally:
        run.restore()
    assert after["n"] == 50 and after["efficacy"] >= 0.9, after
    for n, p in embedded.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n}: restore() left the shared embedded model changed"
