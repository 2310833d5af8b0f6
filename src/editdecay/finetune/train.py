"""The training loop: plain PyTorch, AdamW + a transformers schedule, seeded.

Why not the HF Trainer: the decay curve needs evaluations at exact optimiser
steps on the live model, the loss must stop the run the moment it is not
finite, and the log must be on disk line by line; a 100-line loop states all of
that directly. Nothing assumes a device: batches go to wherever the model's
parameters are, and autocast uses that device's type.

Loss: token-level cross entropy over the labelled tokens of one optimiser step
(all its micro-batches), i.e. sum of token losses / number of labelled tokens,
so gradient accumulation gives the same update as one large batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from editdecay.core.arch import unwrap_peft
from editdecay.core.cache import dumps_json
from editdecay.core.devices import input_device
from editdecay.core.errors import EditDecayError
from editdecay.core.forward import logits_at
from editdecay.data.instructions import IGNORE_INDEX, Example, TrainingSet
from editdecay.finetune.attention import attention_kernel, training_kernel
from editdecay.finetune.callback import DecayCallback
from editdecay.finetune.distributed import DistContext, shard_model
from editdecay.finetune.guard import UpdateProbe, check_trainable
from editdecay.finetune.precision import MasterWeights, eager_on_cpu, make_optimizer, needs_master
from editdecay.finetune.recipe import Recipe
from editdecay.finetune.trainable import (
    TrainingPlan,
    prepare_model,
    trainable_parameter_names,
)


class DivergedError(EditDecayError):
    """The training loss (or gradient norm) stopped being finite; the log up to that step is kept."""


@dataclass
class TrainOutcome:
    model: nn.Module                 # the trained model: a PeftModel for LoRA/DoRA (unmerged), else the model itself
    plan: TrainingPlan
    trainable_parameters: list[str]
    n_trainable: int                 # trainable parameter count (elements)
    steps: int                       # optimiser steps taken
    total_steps: int
    epochs_seen: float               # examples seen / examples in the set
    tokens: int                      # non-padding input tokens processed
    loss_tokens: int                 # tokens that carried a loss
    train_seconds: float             # forward/backward/step time, evaluations excluded
    final_loss: float | None
    precision: dict | None = None    # weights dtype, master weights, optimiser, devices, the update check

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def total_optimizer_steps(recipe: Recipe, n_examples: int) -> int:
    if recipe.max_steps is not None:
        return recipe.max_steps
    micro_per_epoch = math.ceil(n_examples / recipe.batch_size)
    return max(1, math.ceil(recipe.epochs * micro_per_epoch / recipe.grad_accum))


def warmup_steps(recipe: Recipe, total: int) -> int:
    if recipe.warmup_steps is not None:
        return recipe.warmup_steps
    return int(math.ceil((recipe.warmup_ratio or 0.0) * total))


def _micro_batches(examples: tuple[Example, ...], batch_size: int, seed: int,
                   group_by_length: bool = False) -> Iterator[list[Example]]:
    """Endless stream of micro-batches; a fresh seeded permutation every epoch.

    `group_by_length`: the permutation of transformers' length-grouped sampler (`trainer_pt_utils.
    get_length_grouped_indices`, the Trainer's `train_sampling_strategy="group_by_length"`): shuffled
    mega-batches of 50 micro-batches, each sorted by length, so a micro-batch pads to similar lengths; the
    longest micro-batch comes first (an out-of-memory error shows at step 1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [len(e.input_ids) for e in examples]
    while True:
        if group_by_length:
            from transformers.trainer_pt_utils import get_length_grouped_indices
            order = list(get_length_grouped_indices(lengths, batch_size, generator=gen))
        else:
            order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def collate(batch: list[Example], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Padding gets attention 0 and label IGNORE_INDEX (never the pad id test: the pad
    token may equal the end token, which is a real label)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross entropies over labelled positions, in float32.

    Logits at position t predict token t+1, so position t is scored where labels[t+1] is set; only those
    positions are unembedded (`forward.logits_at`).
    """
    target = batch["labels"][:, 1:]                                   # (B, T-1) the token each position predicts
    scored = target != IGNORE_INDEX                                   # (B, T-1)
    select = torch.zeros_like(batch["labels"], dtype=torch.bool)      # (B, T)
    select[:, :-1] = scored
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], select).float()   # (N, V)
    # labels sit on the input device; the logits on the unembedding's (a model spread over devices)
    return nn.functional.cross_entropy(logits, target[scored].to(logits.device), reduction="sum")


def train(
    model: nn.Module, tokenizer, recipe: Recipe, data: TrainingSet, *, plan: TrainingPlan,
    callback: DecayCallback | None = None, log_path: Path | None = None, progress: bool = True,
    dist: DistContext | None = None,
) -> TrainOutcome:
    """Fine-tune `model` with `recipe` on `data`; returns the trained model and counts.

    The callback (if any) measures step 0 on the untouched model before adapters are attached, then every
    `callback.every` steps and at the last step. `log_path` receives one JSON line per optimiser step,
    flushed as written. A non-finite loss or gradient norm raises `DivergedError` after logging that step.
    A run that would train nothing raises a `guard.NothingTrainedError` after its first step with lr > 0
    (no trainable parameter: before it).

    Precision (`finetune.precision`): with low-precision trainable weights and plain AdamW the optimiser
    updates float32 master weights by default (`recipe.master_weights`); `recipe.optimizer='adamw8bit'`
    keeps 8-bit state. The training passes run attention through `finetune.attention.training_kernel`
    (eager on the CPU for short sequences); evaluations between steps keep the model's own kernel.
    `dist` (`finetune.distributed`): this process's share of a sharded run; the model is sharded here, each
    process trains on its share of every micro-batch, and only process 0 writes the log.
    """
    from transformers import get_scheduler

    from editdecay.core.tokens import pad_id

    device = dist.device if dist is not None else input_device(model)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    total = total_optimizer_steps(recipe, len(data.examples))
    if callback is not None:
        callback.evaluate(model, tokenizer, step=0, epoch=0.0)

    model = prepare_model(model, recipe, plan)
    if recipe.gradient_checkpointing:
        base = unwrap_peft(model)
        # Non-reentrant checkpointing needs no requires_grad on the (frozen) embedding output.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = trainable_parameter_names(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_trainable(n_trainable, f"{recipe.method} fine-tuning of layers {list(plan.layers)}")
    if dist is not None:
        model = shard_model(model, recipe, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    master = MasterWeights(params) if dist is None and needs_master(
        recipe.method, recipe.master_weights, recipe.optimizer, params) else None
    weight_dtype = str(params[0].dtype).removeprefix("torch.")
    stochastic = recipe.optimizer == "adamw8bit" and master is None and params[0].dtype == torch.bfloat16
    optimizer = make_optimizer(recipe.optimizer, master.master if master else params, lr=recipe.learning_rate,
                               weight_decay=recipe.weight_decay, stochastic_round=stochastic,
                               per_tensor=master is not None)
    scheduler = get_scheduler(recipe.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(recipe, total),
                              num_training_steps=total)
    # A sharded run's mixed-precision policy casts the weights itself.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if recipe.dtype == "bfloat16" and dist is None \
        else contextlib.nullcontext()
    # the training passes' attention kernel (finetune/attention.py); evaluations keep the model's own
    kernel = training_kernel(model, recipe, device)
    trained_kernel = None
    probe = UpdateProbe(list(zip(names, params)), watched=master.master if master else None, stochastic=stochastic,
                        all_sum=dist.all_sum if dist else None)
    stream = _micro_batches(data.examples, recipe.batch_size, recipe.seed, recipe.group_by_length)
    pad = pad_id(tokenizer)
    tokens = loss_tokens = seen = 0
    train_seconds, loss_value = 0.0, None
    main = dist is None or dist.main
    log = open(log_path, "a", encoding="utf-8") if log_path is not None and main else None
    bar = tqdm(total=total, desc=f"{recipe.method} fine-tuning", disable=not progress or not main, leave=False)
    guard_record = None
    try:
        model.train()
        for step in range(1, total + 1):
            t0 = time.perf_counter()
            full = [next(stream) for _ in range(recipe.grad_accum)]
            # Every process sees the whole step's labelled-token count: the loss is normalised by it.
            n_labels = sum(sum(1 for e in mb for x in e.labels[1:] if x != IGNORE_INDEX) for mb in full)
            group = [collate(dist.shard(mb) if dist else mb, pad, device) for mb in full]
            step_loss = 0.0
            # forward and backward (which recomputes the forward under gradient checkpointing) on one kernel
            with attention_kernel(model, kernel) as trained_kernel:
                for b in group:
                    with autocast:
                        loss = token_loss_sum(model, b) / max(n_labels, 1)
                    if not torch.isfinite(loss):
                        bad = float(loss.detach())
                        _write(log, {"step": step, "loss": bad, "event": "diverged"})
                        raise DivergedError(f"loss became {bad} at step {step} of {total} "
                                            f"(learning_rate={recipe.learning_rate}); the log up to this step is in "
                                            f"{log_path}. Lower learning_rate or use dtype='float32'.")
                    # FSDP averages gradients over processes; each holds a partial sum of the step's loss.
                    (loss * dist.world if dist else loss).backward()
                    step_loss += float(loss.detach())
            if trained_kernel != kernel:
                kernel = None        # the model cannot switch kernels: stop asking (transformers warns each time)
            tokens += sum(len(e.input_ids) for mb in full for e in mb)       # the whole step's, in every process
            seen += sum(len(mb) for mb in full)
            if dist is not None:
                step_loss = dist.all_sum(step_loss)
            lr = scheduler.get_last_lr()[0]
            if master is not None:
                grad_norm = _grad_norm(params)
                coef = min(1.0, recipe.max_grad_norm / (float(grad_norm) + 1e-6)) if recipe.max_grad_norm else 1.0
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or float("inf"))
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(torch.as_tensor(grad_norm)):
                _write(log, {"step": step, "loss": step_loss, "grad_norm": float(grad_norm), "event": "diverged"})
                raise DivergedError(f"gradient norm became {float(grad_norm)} at step {step} of {total} "
                                    f"(learning_rate={recipe.learning_rate}); the log up to this step is in "
                                    f"{log_path}. Lower learning_rate.")
            checked = probe.before_step(lr)
            with eager_on_cpu(recipe.optimizer, device):
                if master is not None:
                    master.step(optimizer, coef)
                else:
                    optimizer.step()
            if checked:
                guard_record = probe.check(step, lr, float(grad_norm), weight_dtype)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_tokens += n_labels
            train_seconds += time.perf_counter() - t0
            loss_value = step_loss
            _write(log, {"step": step, "loss": round(step_loss, 6), "lr": scheduler.get_last_lr()[0],
                         "grad_norm": round(float(grad_norm), 6), "tokens": tokens, "loss_tokens": loss_tokens,
                         "train_seconds": round(train_seconds, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if callback is not None and callback.due(step, total):
                point = callback.evaluate(model, tokenizer, step=step, epoch=seen / len(data.examples))
                _write(log, {"event": "eval", **point})
    finally:
        bar.close()
        if log is not None:
            log.close()
    return TrainOutcome(
        model=model, plan=plan, trainable_parameters=names, n_trainable=n_trainable,
        steps=total, total_steps=total, epochs_seen=seen / len(data.examples),
        tokens=tokens, loss_tokens=loss_tokens, train_seconds=round(train_seconds, 3), final_loss=loss_value,
        precision={"weights": weight_dtype, "master_weights": master is not None, "optimizer": recipe.optimizer,
                   "stochastic_rounding": stochastic, "devices": dist.world if dist else 1,
                   "attention_kernel": trained_kernel,
                   "update_check": guard_record},
    )


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, accumulated in float32."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def _write(log, record: dict) -> None:
    if log is not None:
        log.write(dumps_json(record) + "\n")           # a NaN loss -> null + status, never bare NaN
        log.flush()
