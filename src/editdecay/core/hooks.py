"""Forward hooks, only ever inside context managers that always remove them."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from editdecay.core.arch import get_module


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after the module is needed)."""


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str], stop_after: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of each named module (for W_out: the keys k).

    With `stop_after`, the forward pass raises `StopForward` right after that module
    has run; wrap the call in `run_until_stop`.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            def pre(mod, args, name=name):
                store[name] = args[0]
            handles.append(get_module(model, name).register_forward_pre_hook(pre))
        if stop_after is not None:
            def post(mod, args, out):
                raise StopForward
            handles.append(get_module(model, stop_after).register_forward_hook(post))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's (first) output by fn(output). Blocks return tuples; the hidden
    state is element 0."""
    def post(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)
    handle = get_module(model, name).register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_output(model: nn.Module, name: str) -> Iterator[dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}
    def post(mod, args, out):
        store["out"] = out[0] if isinstance(out, tuple) else out
    handle = get_module(model, name).register_forward_hook(post)
    try:
        yield store
    finally:
        handle.remove()


def run_until_stop(model: nn.Module, **inputs) -> None:
    """Run a forward pass that a `capture_inputs(stop_after=...)` hook cuts short."""
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass
