"""Seeding every random number generator a stage uses, in one place."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) generators, at the start of every stage or run."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = ["seed_everything"]
