"""E3 batches on the CPU are sized from the memory plan and the memory this process may use (edit/targets.py
`cpu_batch_size`), and a grid worker's share of the host divides it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from support import ZSRE_SAMPLE
from support.models import make_tiny, tok

from editdecay.core import memory
from editdecay.core.memory_plan import EditSetting, ModelDims, stage_memory
from editdecay.data.sources import EditSelection
from editdecay.edit.context import ContextTemplates
from editdecay.edit.targets import TARGETS_CPU_BATCH, TARGETS_CPU_BUDGET, TargetSettings, cpu_batch_size

TEMPLATES = ContextTemplates((("{}",), ("One two three. {}", "Four five six. {}")))


@pytest.fixture(scope="module")
def case():
    lm = make_tiny("llama", tok())
    requests = list(EditSelection(data=f"zsre:{ZSRE_SAMPLE}", n=40).load().requests)
    cfg = TargetSettings(layer=2)
    dims = ModelDims.of_model(lm.model)
    setting = EditSetting.from_requests(lm.tokenizer, requests, TEMPLATES, layers=(2,))

    def peak(n):
        return stage_memory(dims, "targets", edit=replace(setting, n_requests=n, target_batch=n)).peak

    return lm, requests, cfg, peak(2) - peak(1)


def test_the_batch_is_what_the_memory_plan_fits_in_the_budget(case):
    lm, requests, cfg, per_request = case
    for k in (1, 3, 7):
        available = int((k + 0.5) * per_request / memory.MEMORY_FRACTION)
        assert cpu_batch_size(lm.model, lm.tokenizer, requests, TEMPLATES, cfg, available=available) == k
    # at least one request, at most the requests there are (and TARGETS_CPU_BATCH)
    assert cpu_batch_size(lm.model, lm.tokenizer, requests, TEMPLATES, cfg, available=1) == 1
    big = cpu_batch_size(lm.model, lm.tokenizer, requests, TEMPLATES, cfg, available=10 ** 15)
    assert big == min(len(requests), TARGETS_CPU_BATCH, TARGETS_CPU_BUDGET // per_request)


def test_a_worker_share_of_the_host_divides_the_batch(case, monkeypatch):
    lm, requests, cfg, per_request = case
    import psutil

    class Host:
        available = int(8.5 * per_request / memory.MEMORY_FRACTION)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Host)
    monkeypatch.delenv(memory.HOST_SHARE_ENV, raising=False)
    whole = cpu_batch_size(lm.model, lm.tokenizer, requests, TEMPLATES, cfg)
    memory.set_host_memory_share(0.5)
    try:
        half = cpu_batch_size(lm.model, lm.tokenizer, requests, TEMPLATES, cfg)
    finally:
        memory.set_host_memory_share(None)
    assert (whole, half) == (8, 4)
    with pytest.raises(ValueError, match="share 0 is not valid"):
        memory.set_host_memory_share(0)
