"""GRACE, the editor that keeps its edit as a module state, reaches ES >= 90 % on the embedded model with the embedded
preset, on the first 10 of the 50 worldfacts requests a grid's `n_edits: [50]`, `seeds: [0]` edits, in one batch
(about 40 s of CPU). The acceptance figures at 50 edits of every editor (FT-M's too), with PS, NS, MEND (whose
network is trained first), edit time and memory, are measured by benchmarks/editor_families.py;
docs/editor-families/README.md has them."""

from __future__ import annotations

import pytest
import torch

from editdecay.data import load_edit_data
from editdecay.edit.api import edit_model
from editdecay.edit.workflow import edit_config
from editdecay.measure.metrics import aggregate, evaluate_requests

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("editor", ["grace"])
def test_embedded_preset_reaches_90_percent_efficacy(editor, embedded):
    requests = list(load_edit_data("worldfacts", limit=50, seed=0).requests)[:10]
    before = {n: p.detach().clone() for n, p in embedded.model.named_parameters()}
    patch, run = edit_model(embedded, editor, edit_config(editor, embedded, {}), requests, progress=False)
    try:
        after = aggregate(evaluate_requests(embedded.model, embedded.tokenizer, requests))
    finally:
        run.restore()
    assert after["n"] == 10 and after["efficacy"] >= 0.9, after
    for n, p in embedded.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n}: restore() left the shared embedded model changed"
