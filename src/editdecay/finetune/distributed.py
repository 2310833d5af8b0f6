"""Sharded fine-tuning over the devices of one node: PyTorch FSDP (`torch.distributed.fsdp.fully_shard`).

`editdecay finetune --devices N` starts N processes (torch's elastic launcher, as `torchrun` does); each
loads the model, and `shard_model` splits weights, gradients and optimiser state over them (FSDP2: every
transformer block, the body and the unembedding are one unit each, so the forward of the body and the
unembedding that `core.forward.logits_at` calls separately each gather their own weights). Data parallel:
every process builds the same micro-batch stream and takes examples rank, rank + N, ... of each
micro-batch; the loss is normalised by the labelled tokens of the whole optimiser step, so N processes take
the same steps as one (tests/finetune/test_distributed.py: losses and final weights of two CPU processes
over gloo equal one process's within 1e-5).

Backends: NCCL on CUDA (one GPU per process, `LOCAL_RANK`), gloo on the CPU. FSDP runs on both, so the
multi-process path tested on the CPU is the one that runs on GPUs. (accelerate's FSDP plugin needs a GPU
backend; its launcher adds nothing torch's does not do.) With recipe dtype bfloat16 the shards keep float32
weights and compute in bfloat16 (`MixedPrecisionPolicy`, gradients reduced in float32): FSDP's own master
weights. Decay-curve evaluations run at the same steps in every process (a sharded forward needs all of
them); process 0 writes the curve, the log and the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from editdecay.core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in a sharded run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's share of one micro-batch (every world-th item from `rank`)."""
        return items[self.rank::self.world]

    def all_sum(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())


def current() -> DistContext | None:
    """The running process group as a DistContext, or None when this process is not part of one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    rank = dist.get_rank()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    else:
        device = torch.device("cpu")
    return DistContext(rank, dist.get_world_size(), device)


def init_from_env() -> DistContext | None:
    """Join the process group the launcher describes (RANK/WORLD_SIZE/MASTER_ADDR in the environment)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("EDITDECAY_DIST_BACKEND") != "gloo" \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return current()


def check_shardable(model: nn.Module, recipe, world: int) -> None:
    """Settings a sharded run cannot honour, before training: raise ConfigError naming them."""
    if recipe.batch_size % world:
        raise ConfigError(f"batch_size={recipe.batch_size} does not split over --devices {world}; give a multiple "
                          f"of {world}")
    out = model.get_output_embeddings()
    if out is not None and out.weight is model.get_input_embeddings().weight:
        raise ConfigError("--devices > 1: this model ties its unembedding to the input embedding, which the "
                          "sharded run (one FSDP unit each for the body and the unembedding) cannot split; "
                          "train it on one device (--devices 1)")
    if getattr(recipe, "optimizer", "adamw") != "adamw" or getattr(recipe, "master_weights", None):
        raise ConfigError("--devices > 1 keeps float32 shards and computes in the recipe dtype (FSDP mixed "
                          "precision): use optimizer='adamw' and leave master_weights unset")


def shard_model(model: nn.Module, recipe, ctx: DistContext) -> nn.Module:
    """Shard `model` in place over the process group (FSDP2) and return it. Call after the trainable
    parameters are chosen and before the optimiser is built."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from editdecay.core.arch import arch_for, get_module, num_layers, resolve_name, unwrap_peft

    base = unwrap_peft(model)
    if ctx.device.type == "cuda":
        base.to(ctx.device)
    kw = {}
    if recipe.dtype == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    spec = arch_for(base)
    for layer in range(num_layers(base)):
        fully_shard(get_module(base, resolve_name(base, spec.block_name(layer))), **kw)
    fully_shard(base.base_model, **kw)
    fully_shard(base.get_output_embeddings(), **kw)
    return model


def gather_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on process 0, on the CPU ({} on the others). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def launch(n: int, argv: list[str]) -> int:
    """Run `editdecay <argv>` in `n` processes on this node (torch's elastic launcher, like torchrun).
    Returns the exit code (0 when every process succeeded)."""
    from torch.distributed.run import main as torchrun

    if n < 2:
        raise ConfigError(f"--devices {n}: a sharded run needs 2 or more devices")
    if torch.cuda.is_available() and torch.cuda.device_count() < n and os.environ.get("EDITDECAY_DIST_BACKEND") != "gloo":
        raise ConfigError(f"--devices {n}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    args = ["--standalone", f"--nproc_per_node={n}", "-m", "editdecay.cli", *argv]
    try:
        torchrun(args)
    except SystemExit as e:            # torchrun exits on failure (ChildFailedError is reported and re-raised)
        return int(e.code or 0)
    except Exception:                  # noqa: BLE001 -- a failed child: its traceback was printed by torchrun
        return 1
    return 0


__all__ = ["DistContext", "check_shardable", "current", "gather_state", "init_from_env", "launch", "shard_model"]
