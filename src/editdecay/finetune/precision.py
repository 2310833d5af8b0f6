"""How the optimiser holds and updates the trained weights: float32 master weights, 8-bit AdamW state.

Why: full fine-tuning of a 7-8B model in float32 needs 16 bytes per parameter before activations (weights 4,
gradients 4, AdamW state 8), over one 80 GB card. Loading the weights in bfloat16 instead trains nothing at
the study's learning rate: a bf16 weight of magnitude 0.02 has a spacing of ~1.2e-4 between representable
values, an AdamW step at lr 5e-6 moves it by ~5e-6, and the update rounds away.

Two remedies, chosen by the recipe (`Recipe.master_weights`, `Recipe.optimizer`):

- master weights (`MasterWeights`): the model keeps bfloat16 weights for the forward and backward passes;
  the optimiser updates a float32 copy of every trainable tensor (float32 AdamW state) and the copy is cast
  back into the model after each step. The float32 gradient exists for one tensor at a time (the step runs
  tensor by tensor), so the cost is 2 (weights) + 2 (gradients) + 4 (master) + 8 (state) = 16 bytes per
  trainable parameter, as float32 training, but the weights the model computes with are bfloat16 (half the
  activations and no autocast copies).
- 8-bit AdamW (`optimizer="adamw8bit"`, torchao's `AdamW8bit`, block-wise quantised state): 2 bytes of state
  per parameter. With bfloat16 weights and no master weights, torchao rounds each updated weight
  stochastically (`bf16_stochastic_round`), so an update below the bfloat16 spacing is kept in expectation:
  2 + 2 + 2 = 6 bytes per parameter, which puts an 8B full fine-tuning on one 80 GB card
  (`core.memory_plan`). torchao is an optional dependency (`pip install editdecay[lowmem]`).

Original code followed: mixed-precision master weights as in Micikevicius et al. 2018 (apex `FP16_Optimizer`);
8-bit state and stochastic rounding from torchao (`torchao/optim/adam.py`, `_AdamBase`).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from editdecay.core.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")
LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """float32 copies of low-precision trainable tensors; the optimiser is built over `master`."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = list(params)
        # (n,) float32 leaves the optimiser owns; the model's tensors are overwritten from them after each step.
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]

    def step(self, optimizer: torch.optim.Optimizer, clip_coef: float = 1.0) -> None:
        """One optimiser step, tensor by tensor: the model's gradient (times `clip_coef`) becomes the float32
        master gradient, the master tensor is updated and cast back into the model. Only one float32
        gradient exists at a time; the model's gradients are freed."""
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                continue
            m.grad = p.grad.float()
            if clip_coef != 1.0:
                m.grad.mul_(clip_coef)
            p.grad = None
            optimizer.step()                  # updates the one master tensor that has a gradient
            m.grad = None
            with torch.no_grad():
                p.copy_(m)


def needs_master(method: str, master_weights: bool | None, optimizer: str, params: list[torch.nn.Parameter]) -> bool:
    """`master_weights` if given; by default on for low-precision trainable tensors trained with plain AdamW
    (8-bit AdamW rounds stochastically instead)."""
    if master_weights is not None:
        return master_weights
    low = any(p.dtype in LOW_PRECISION for p in params)
    return low and optimizer == "adamw"


def make_optimizer(name: str, params: list, *, lr: float, weight_decay: float, stochastic_round: bool,
                   per_tensor: bool = False):
    """AdamW over `params`: torch's (`adamw`), or torchao's 8-bit one (`adamw8bit`). `per_tensor` (master
    weights, which step one tensor at a time): torch's single-tensor loop, which needs no list-wide float32
    temporaries (foreach AdamW holds one the size of all trainable parameters during the step)."""
    if name == "adamw":
        if per_tensor:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
        # torch's fused kernel when every tensor is a plain one (not a sharded DTensor): on the CPU the default is
        # a per-tensor Python loop, 0.61 s a step for the 135M parameters of the embedded model against 0.11 s
        # fused (one thread); the same AdamW arithmetic up to float rounding.
        fused = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                    for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ConfigError("optimizer='adamw8bit' needs torchao (pip install 'editdecay[lowmem]' or "
                              "pip install torchao); or use optimizer='adamw' with master_weights") from None
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=stochastic_round)
    raise ConfigError(f"optimizer: {name!r} is not valid; use one of {', '.join(OPTIMIZERS)}")


def eager_on_cpu(name: str, device: torch.device):
    """torchao compiles its 8-bit step with torch.compile, which takes about a minute per tensor shape on the
    CPU; there it runs eagerly (the same arithmetic)."""
    if name == "adamw8bit" and device.type == "cpu":
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


__all__ = ["LOW_PRECISION", "MasterWeights", "OPTIMIZERS", "eager_on_cpu", "make_optimizer", "needs_master"]
