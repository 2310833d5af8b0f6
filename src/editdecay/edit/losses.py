"""The teacher-forced edit loss the gradient-based editors share (FT-M, GRACE, MEND).

For (prompt, target) pairs, the loss of a pair is the mean negative log-likelihood of the target tokens
given the prompt and the previous target tokens; prompt tokens carry no loss (EasyEdit's FT-M objective
`target_new`, GRACE's and MEND's edit loss). Tokenisation is the evaluation's (core/tokens.py: the prompt
with the tokenizer's special tokens, the target with the leading-space convention), so an editor optimises
exactly what E6 measures. Batches are right-padded with explicit positions; only the scored positions
are unembedded (core/forward.py explains why).

`params` (optional): tensors by full parameter name that stand in for the model's own in this forward pass
(torch.func.functional_call), so a loss can be differentiated with respect to an update computed from
other tensors (MEND's hypernetwork) without writing the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from editdecay.core.arch import unembed_module, unwrap_peft
from editdecay.core.devices import input_device
from editdecay.core.tokens import encode_prompt, encode_target, pad_batch, pad_id


@dataclass(frozen=True)
class TargetBatch:
    """(prompt, target) pairs as one right-padded batch.

    `rows`, `cols`: the positions whose next-token prediction is scored (position j predicts token j + 1),
    `tokens` the target token at each, all (G,); `prompt_last`: index of each row's last prompt token (B,);
    `n_target`: target tokens per row (B,)."""

    inputs: dict[str, torch.Tensor]      # input_ids, attention_mask, position_ids: (B, T)
    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    prompt_last: torch.Tensor
    n_target: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.n_target.shape[0])


def target_batch(tokenizer, pairs: Sequence[tuple[str, str]], device=None) -> TargetBatch:
    """Tokenise (prompt, target) pairs (core/tokens.py conventions) into a `TargetBatch` on `device`."""
    encoded = [(encode_prompt(tokenizer, p), encode_target(tokenizer, t)) for p, t in pairs]
    batch = pad_batch([p + t for p, t in encoded], pad_id(tokenizer), "right")
    rows, cols, toks, last, n = [], [], [], [], []
    for i, (p, t) in enumerate(encoded):
        rows += [i] * len(t)
        cols += range(len(p) - 1, len(p) - 1 + len(t))
        toks += t
        last.append(len(p) - 1)
        n.append(len(t))
    as_long = dict(dtype=torch.long, device=device)
    return TargetBatch(inputs={k: v.to(device) for k, v in batch.model_inputs().items()},
                       rows=torch.tensor(rows, **as_long), cols=torch.tensor(cols, **as_long),
                       tokens=torch.tensor(toks, **as_long), prompt_last=torch.tensor(last, **as_long),
                       n_target=torch.tensor(n, **as_long))


def body_prefix(model: nn.Module) -> str:
    """The name of the transformer body (`model.base_model`) inside the causal LM: "model", "transformer", ..."""
    body = model.base_model
    for name, module in model.named_modules():
        if module is body:
            return name
    raise ValueError(f"{type(model).__name__}: base_model is not one of its modules")


def hidden_states(model: nn.Module, inputs: dict, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The body's last hidden states (B, T, d); with `params` (full parameter names) standing in for the model's."""
    lm = unwrap_peft(model)
    body = lm.base_model
    if not params:
        return body(**inputs, use_cache=False).last_hidden_state
    prefix = body_prefix(lm) + "."
    outside = [n for n in params if not n.startswith(prefix)]
    if outside:
        raise ValueError(f"parameter {outside[0]!r} is not inside the transformer body {prefix[:-1]!r}")
    relative = {n[len(prefix):]: t for n, t in params.items()}
    out = torch.func.functional_call(body, relative, args=(), kwargs={**inputs, "use_cache": False})
    return out.last_hidden_state


def target_log_probs(model: nn.Module, batch: TargetBatch,
                     params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Log-probabilities (G, V), float32, at the scored positions of `batch` (row-major, as `batch.rows`)."""
    hidden = hidden_states(model, batch.inputs, params)                           # (B, T, d)
    logits = unembed_module(unwrap_peft(model))(hidden[batch.rows, batch.cols])    # (G, V)
    return torch.log_softmax(logits.float(), dim=-1)


def target_nll(model: nn.Module, batch: TargetBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean NLL of each pair's target tokens, (B,) float32, differentiable."""
    lp = target_log_probs(model, batch, params)
    tok_nll = -lp.gather(1, batch.tokens.to(lp.device)[:, None]).squeeze(1)      # (G,)
    per_row = torch.zeros(batch.size, dtype=tok_nll.dtype, device=tok_nll.device)
    per_row = per_row.index_add(0, batch.rows.to(tok_nll.device), tok_nll)
    return per_row / batch.n_target.to(tok_nll.device)


def prompt_last_nll(model: nn.Module, batch: TargetBatch) -> torch.Tensor:
    """FT-L's objective (EasyEdit FT `prompt_last`, ROME's FT baseline): the mean NLL of every target token read
    from the prediction at the last prompt token only, (B,) float32."""
    hidden = hidden_states(unwrap_peft(model), batch.inputs)                           # (B, T, d)
    rows = torch.arange(batch.size, device=hidden.device)
    logits = unembed_module(unwrap_peft(model))(hidden[rows, batch.prompt_last.to(hidden.device)])   # (B, V)
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok_nll = -lp[batch.rows.to(lp.device), batch.tokens.to(lp.device)]                 # (G,)
    per_row = torch.zeros(batch.size, dtype=tok_nll.dtype, device=tok_nll.device)
    return per_row.index_add(0, batch.rows.to(tok_nll.device), tok_nll) / batch.n_target.to(tok_nll.device)


def model_device(model: nn.Module) -> torch.device:
    """Where the batches of `model` go (its input embedding's device)."""
    return input_device(unwrap_peft(model))


class frozen_except:
    """Context manager: only `params` require gradients inside (every other parameter of `model` is frozen), so a
    backward pass computes and stores no other gradient; each parameter's flag is restored on exit."""

    def __init__(self, model: nn.Module, params):
        self.model, self.params = model, list(params)

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        return False


__all__ = ["TargetBatch", "body_prefix", "frozen_except", "hidden_states", "model_device", "prompt_last_nll",
           "target_batch", "target_log_probs", "target_nll"]
