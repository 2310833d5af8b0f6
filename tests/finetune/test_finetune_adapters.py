"""Merged LoRA/DoRA adapters give the logits of the unmerged model (float32, max abs diff < 1e-4)."""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_model, tok

from editdecay.data.embedded_task import EmbeddedTask
from editdecay.data import load_source
from editdecay.data.instructions import tokenize
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.train import train
from editdecay.finetune.trainable import merge, resolve_plan


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_adapter_gives_the_unmerged_logits(family, method):
    model = tiny_model(family)
    recipe = Recipe(method=method, max_steps=4, learning_rate=2e-2, batch_size=4, lora_r=4, lora_alpha=16.0)
    data = tokenize(load_source("embedded", task=EmbeddedTask(n_train=16, n_test=4)), tok(), cutoff_len=64,
                    template="compact")
    out = train(model, tok(), recipe, data, plan=resolve_plan(recipe, model), progress=False)
    width = min(len(e.input_ids) for e in data.examples[:3])
    ids = torch.tensor([e.input_ids[:width] for e in data.examples[:3]])          # (3, width)
    peft_model = out.model.eval()
    with torch.no_grad():
        # The adapters must have moved the model (else the comparison below proves nothing).
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        unmerged = peft_model(input_ids=ids).logits
        merged_model = merge(peft_model)
        merged = merged_model(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 1e-3
    assert (merged - unmerged).abs().max() < 1e-4
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
