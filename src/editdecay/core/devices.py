"""Where tensors go: the device of the module they meet, never one global device.

A model loaded with a device map (`load_model(device="balanced")`, accelerate) has its
blocks on several GPUs. Every tensor that editdecay creates for a module (input
ids, index tensors, deltas added by hooks, solves of one layer) must sit on the
device that module computes on. These two functions are the only place that
answers the question; no other module reads `next(model.parameters()).device`
(tests/core/test_batching.py checks the source for it).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from editdecay.core.arch import unwrap_peft


def _hook_device(module: nn.Module) -> torch.device | None:
    """accelerate's execution device of a dispatched module (weights may be offloaded elsewhere)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])   # SequentialHook or one hook
    for h in hooks:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def module_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: accelerate's execution device if it is dispatched, else the device of
    its first parameter (or buffer); CPU for a module without either."""
    dev = _hook_device(module)
    if dev is not None:
        return dev
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device input ids must be on: that of the input embedding (works for peft models too)."""
    base = unwrap_peft(model)
    return module_device(base.get_input_embeddings())


__all__ = ["input_device", "module_device", "set_threads"]


def set_threads(threads: int | None) -> None:
    """Pin torch (and the BLAS libraries it starts afterwards) to `threads` CPU threads in this process;
    None or 0 leaves torch's choice. Used by every command and by grid workers."""
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
