"""MEMIT (docs/METHODS.md E4): the shared E2/E3 machinery plus a lambda-weighted least-squares solve."""

from __future__ import annotations

import torch

from editdecay.edit.config import MemitConfig
from editdecay.edit.solve import memit_delta


class Memit:
    name = "memit"
    config_class = MemitConfig

    def __init__(self, cfg: MemitConfig, moments: dict[int, torch.Tensor]):
        self.cfg = cfg
        self.C = moments                       # layer -> (d_k, d_k), E1

    def layer_delta(self, layer: int, K: torch.Tensor, R: torch.Tensor, *, device=None) -> torch.Tensor:
        """E4 on `device` (the edited module's; default K's): (d, d_k), see `solve` for dtypes."""
        return memit_delta(K, R, self.C[layer], self.cfg.mom2_update_weight, dtype=_dtype(self.cfg), device=device)

    def after_batch(self, keys_after: dict[int, torch.Tensor], devices: dict | None = None) -> None:
        """MEMIT keeps no state between sequential batches."""


def _dtype(cfg) -> torch.dtype:
    return torch.float64 if cfg.solve_dtype == "float64" else torch.float32
