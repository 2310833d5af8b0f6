"""The tiny case the two-process FSDP test trains: an untied Llama, random token data, full fine-tuning."""

from __future__ import annotations

import torch


def build_case():
    from support.models import tiny_config
    from transformers import LlamaForCausalLM

    from editdecay.data.instructions import IGNORE_INDEX, Example, TrainingSet
    from editdecay.finetune.recipe import Recipe

    torch.manual_seed(0)
    cfg = tiny_config("llama", 97, n_layers=2, positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    examples = []
    for i in range(16):
        n = 8 + i % 5                                   # unequal lengths: padding and label counts differ
        ids = torch.randint(3, 97, (n,), generator=gen).tolist()
        examples.append(Example(tuple(ids), tuple([IGNORE_INDEX] * 3 + ids[3:])))
    data = TrainingSet(tuple(examples), {"name": "random"})
    recipe = Recipe(method="full", targets="all", max_steps=4, batch_size=4, grad_accum=2, learning_rate=1e-3,
                    warmup_steps=1, cutoff_len=16, max_grad_norm=1.0)

    class Tok:                                          # collate needs only the pad id
        pad_token_id = 0
        eos_token_id = 2

    return model, Tok(), recipe, data
