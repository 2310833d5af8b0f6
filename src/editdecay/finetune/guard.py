"""Stop a fine-tuning run that trains nothing, after its first step, instead of hours later.

Three ways a run can leave the weights as they were, each a named error:
- `NoTrainableParametersError`: the recipe reached no parameter (an empty layer/target selection);
  raised before the first step.
- `ZeroGradientsError`: every gradient of the first step is zero (no labelled token in the batch, or the
  trained parameters do not reach the loss).
- `UpdatesLostError`: gradients are non-zero and the learning rate is > 0, yet (nearly) no weight changed:
  the updates are smaller than the spacing of the weights' dtype and were rounded away (bfloat16 weights
  with plain AdamW at lr 5e-6; use master weights or 8-bit AdamW with stochastic rounding).

The check runs once, on the first optimiser step whose learning rate is > 0 (a linear warm-up starts at 0).
It compares a fixed sample of each tensor the optimiser updates (the float32 master copies when there are
master weights: their bfloat16 casts move only once the updates add up to a bfloat16 step) (its first `SAMPLE` elements, copied before the step)
with the tensor after it: among sampled elements whose gradient was non-zero, the share that changed,
weighted by tensor size. With float32 weights nearly all of them change; with bfloat16 weights at lr 5e-6 a
few percent do (those near zero). Below `MIN_CHANGED` the run stops. A stochastically rounding optimiser
changes only some elements per step by design (the rest in expectation), so for it only "nothing changed"
stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editdecay.core.errors import EditDecayError

SAMPLE = 4096            # elements sampled per tensor
MIN_CHANGED = 0.5        # share of sampled elements with a gradient that must change


class NothingTrainedError(EditDecayError):
    """A fine-tuning run that would not change the model."""


class NoTrainableParametersError(NothingTrainedError):
    pass


class ZeroGradientsError(NothingTrainedError):
    pass


class UpdatesLostError(NothingTrainedError):
    pass


def check_trainable(n_trainable: int, what: str) -> None:
    if n_trainable == 0:
        raise NoTrainableParametersError(f"{what}: no parameter is trainable, so fine-tuning would change "
                                         f"nothing; check the recipe's layers and targets")


@dataclass
class UpdateProbe:
    """Samples of the trainable tensors before the first step with lr > 0; `check` after it."""

    params: list[tuple[str, torch.nn.Parameter]]
    watched: list[torch.Tensor] | None = None     # what the optimiser updates, if not `params` (master weights)
    stochastic: bool = False                      # the optimiser rounds stochastically (8-bit AdamW on bf16)
    all_sum: object = None                        # sharded runs: sums a float over the processes (each sees its shard)
    done: bool = False
    _before: list[torch.Tensor] = field(default_factory=list)
    _grad_mask: list[torch.Tensor] = field(default_factory=list)

    def before_step(self, lr: float) -> bool:
        """Take the samples (and which sampled elements have a gradient) if this step is the one checked.
        Call after backward, before the optimiser step. Returns whether the step is checked."""
        if self.done or lr <= 0:
            return False
        self._before = [_sample(w).clone() for w in self._watched()]
        self._grad_mask = [(_sample(p.grad) != 0) if p.grad is not None else torch.zeros_like(_sample(p), dtype=torch.bool)
                           for _, p in self.params]
        return True

    def check(self, step: int, lr: float, grad_norm: float, dtype_note: str) -> dict:
        """After the optimiser step: raise a NothingTrainedError subclass or return the measured shares."""
        self.done = True
        total = self.all_sum or (lambda x: x)
        with_grad = total(float(sum(int(m.sum()) for m in self._grad_mask)))
        if grad_norm == 0 or with_grad == 0:
            raise ZeroGradientsError(f"step {step}: every gradient is zero, so the weights cannot change; is "
                                     f"any token labelled (train_on_prompt, cutoff_len) and do the trained "
                                     f"parameters reach the loss?")
        changed_w = with_grad_w = 0.0
        any_changed = False
        for (name, p), w, old, mask in zip(self.params, self._watched(), self._before, self._grad_mask):
            new = _sample(w)
            diff = (new != old.to(new.device))
            any_changed |= bool(diff.any())
            n = int(mask.sum())
            if n:
                local = p.to_local() if hasattr(p, "to_local") else p
                weight = local.numel() / mask.numel()      # a sample stands for its tensor's size
                changed_w += weight * int((diff & mask.to(diff.device)).sum())
                with_grad_w += weight * n
        changed_w, with_grad_w = total(changed_w), total(with_grad_w)
        any_changed = total(float(any_changed)) > 0
        share = changed_w / with_grad_w if with_grad_w else 0.0
        if not any_changed or (not self.stochastic and share < MIN_CHANGED):
            raise UpdatesLostError(
                f"step {step} (learning rate {lr:.3g}, gradient norm {grad_norm:.3g}): only {100 * share:.1f}% "
                f"of the sampled weights that had a gradient changed; the updates are smaller than the spacing "
                f"of the {dtype_note} weights and are rounded away, so the run would train nothing. Keep float32 "
                f"master weights (master_weights=True, the default for bfloat16 weights with adamw), use "
                f"optimizer='adamw8bit' (stochastic rounding), or load the model in float32")
        return {"step": step, "changed_share": round(share, 4)}

    def _watched(self) -> list[torch.Tensor]:
        return self.watched if self.watched is not None else [p for _, p in self.params]


def _sample(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if hasattr(t, "to_local") else t        # a sharded (DTensor) parameter: this process's shard
    flat = t.detach().reshape(-1)
    return flat[:SAMPLE]


__all__ = ["MIN_CHANGED", "NoTrainableParametersError", "NothingTrainedError", "SAMPLE", "UpdateProbe",
           "UpdatesLostError", "ZeroGradientsError", "check_trainable"]
