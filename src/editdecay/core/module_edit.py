"""Edits kept in a module of their own, beside a host module of the model instead of in its weights.

Most editors write weight deltas (a patch adds them to the weights). A memory-based editor such as GRACE
(edit/grace.py) keeps its edits in a separate state, e.g. a codebook of keys and values that replaces the
host module's output where an input falls near a key. Such a state is a `ModuleEdit`: an `nn.Module`
attached to its host as the child `module_edit`, with a forward hook on the host that hands the host's
input and output to `ModuleEdit.edit_output`.

Why a child plus a hook, not a wrapper module: the host keeps its name, type and parameters, so the
architecture table's module paths, peft's target matching (a LoRA/DoRA layer wraps the host and calls it
as its base layer, hook included) and the names of the trained weights are the same with and without the
edit. Consequences that results record (finetune/trainable.py):
- the edit acts on the host's own output; adapters that peft puts on the host add to that output;
- fine-tuning trains the edit's parameters only when the edit says so (`trains`); its other tensors are
  buffers, never trained, and are not part of the weights fine-tuning saves.

This module is below every step (core): fine-tuning finds attached edits with `attached_edits` without
knowing which editor made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from editdecay.core.devices import module_device
from editdecay.core.errors import ConfigError

ATTRIBUTE = "module_edit"      # the child name of an attached edit inside its host


class ModuleEdit(nn.Module):
    """Base class of an edit stored as a module (see module docstring).

    A subclass implements `edit_output` and, for patches (edit/patch.py), `state`/`from_state`; `trains` says
    whether later fine-tuning trains its parameters (default False: it is not part of the base model).
    """

    trains: bool = False

    def edit_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The host's edited output, from its first input (B, T, d_in) and its output (B, T, d_out)."""
        raise NotImplementedError(f"{type(self).__name__}.edit_output")

    def check_host(self, host: nn.Module, name: str) -> None:
        """Raise ConfigError if `host` (module `name`) cannot carry this edit (e.g. other dimensions)."""

    def _hook(self, module: nn.Module, args: tuple, output):
        # A bound method, not a closure: a deep copy of the model copies the hook together with this module.
        return self.edit_output(args[0], output)


@dataclass
class Attached:
    """Handle of one attached edit; `detach()` removes the hook and the child (idempotent)."""

    host: nn.Module
    edit: ModuleEdit
    handle: object
    detached: bool = False

    def detach(self) -> None:
        if self.detached:
            return
        self.handle.remove()
        if getattr(self.host, ATTRIBUTE, None) is self.edit:
            delattr(self.host, ATTRIBUTE)
        self.detached = True


def attach(host: nn.Module, edit: ModuleEdit, name: str = "module") -> Attached:
    """Attach `edit` to `host` (named `name` in messages). Raises ConfigError if the host carries an edit already
    or `edit.check_host` refuses it; the model is unchanged then."""
    if isinstance(getattr(host, ATTRIBUTE, None), ModuleEdit):
        raise ConfigError(f"{name} carries a module edit already ({type(getattr(host, ATTRIBUTE)).__name__}); "
                          f"revert that patch before applying another one to the same module")
    edit.check_host(host, name)
    edit.to(module_device(host))
    host.add_module(ATTRIBUTE, edit)
    return Attached(host, edit, host.register_forward_hook(edit._hook))


def attached_edits(model: nn.Module) -> Iterator[tuple[str, ModuleEdit]]:
    """(name, edit) of every module edit inside `model` (peft wrappers included), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ModuleEdit):
            yield name, module


__all__ = ["ATTRIBUTE", "Attached", "ModuleEdit", "attach", "attached_edits"]
