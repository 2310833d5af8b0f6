"""The embedded task on the real embedded model (SmolLM2-135M): it starts low and a few LoRA steps move it."""

from __future__ import annotations

import copy

import pytest
import torch

from editdecay.data.embedded_task import EmbeddedTask
from editdecay.data import load_source
from editdecay.data.instructions import tokenize
from editdecay.finetune.recipe import preset
from editdecay.finetune.train import collate, token_loss_sum, train
from editdecay.finetune.trainable import resolve_plan
from editdecay.measure.task import exact_match

TASK = EmbeddedTask(n_train=200, n_test=20)


@pytest.mark.slow
def test_embedded_model_starts_low_and_lora_steps_lower_the_held_out_loss(embedded):
    tok = embedded.tokenizer
    _, test = TASK.records()
    base = exact_match(embedded.model, tok, test, template="compact")
    assert base.n == 20 and base.accuracy <= 0.2          # the premise: the terse task is not solved already
    held_out = tokenize(load_source("embedded", task=EmbeddedTask(n_train=20, n_test=200, seed=1)), tok,
                        cutoff_len=64, template="compact")
    batch = collate(list(held_out.examples[:16]), tok.pad_token_id, torch.device("cpu"))
    n = int((batch["labels"][:, 1:] != -100).sum())
    model = copy.deepcopy(embedded.model)                 # the session fixture stays untouched
    with torch.no_grad():
        before = token_loss_sum(model, batch).item() / n
    recipe = preset("embedded", "lora", max_steps=8, batch_size=4, warmup_steps=0)
    data = tokenize(load_source("embedded", task=TASK), tok, cutoff_len=64, template="compact")
    out = train(model, tok, recipe, data, plan=resolve_plan(recipe, model), progress=False)
    out.model.eval()
    with torch.no_grad():
        after = token_loss_sum(out.model, batch).item() / n
    assert after < 0.7 * before, (before, after)
