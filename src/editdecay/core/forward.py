"""A forward pass that unembeds only the positions that are scored.

Training on instruction data scores a handful of response tokens per sequence,
and task scoring reads a few positions per prompt. The full (B, T, V) logits
would cost ~20% of the forward pass of a small model and, for a 128k-token
vocabulary at batch 16 x 256 tokens, 2 GB of float32 memory. So the body runs
once, and the unembedding (the architecture table's `unembed` module) is applied
to the selected hidden states only. Numbers equal those of the full forward pass
(tests compare against the model's own loss).

A PeftModel is run through its base model: peft injects the adapter layers into
that module tree, so they take part; the plain names match the architecture table.
"""

from __future__ import annotations

import torch
from torch import nn

from editdecay.core.arch import unembed_module, unwrap_peft


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              select: torch.Tensor) -> torch.Tensor:
    """Logits at the positions where `select` (B, T) is True, in row-major order: (N, V)."""
    lm = unwrap_peft(model)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state                 # (B, T, d)
    unembed = unembed_module(lm)                       # table name with alternatives, resolved in arch.py
    return unembed(hidden[select.to(hidden.device)])                          # (N, V), on the unembedding's device
