"""Checks that stop a run rather than let it write damaged results (one implementation for every caller)."""

from __future__ import annotations

import math

from editdecay.core.errors import NonFiniteError


def check_finite(what: str, values) -> None:
    """Raise NonFiniteError if any number in `values` is NaN or infinite.

    `values`: a tensor, a float, or a (nested) dict / list / tuple of them. The message names
    `what` and the path of the first bad entry (e.g. "E3 targets: z contains NaN or infinite
    values (3 of 5760 elements)"). Non-numeric leaves (strings, ints, None) are ignored.
    """
    import torch

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() or x.is_complex():
                ok = torch.isfinite(x)
                if not bool(ok.all()):
                    bad = int((~ok).sum())
                    raise NonFiniteError(f"{what}: {path or 'tensor'} contains NaN or infinite values "
                                         f"({bad} of {x.numel()} elements)")
        elif isinstance(x, float):
            if not math.isfinite(x):
                raise NonFiniteError(f"{what}: {path or 'value'} is {x}")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(values, "")


__all__ = ["check_finite"]
