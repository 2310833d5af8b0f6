"""AlphaEdit (docs/METHODS.md E5): the MEMIT machinery with a null-space-projected solve.

Sequential state (C_p, the keys of earlier batches) lives on this object, one per
editing run, never in a module or process global.
"""

from __future__ import annotations

import torch

from editdecay.edit.config import AlphaEditConfig
from editdecay.edit.memit import _dtype
from editdecay.edit.solve import alphaedit_delta, key_gram


class AlphaEdit:
    name = "alphaedit"
    config_class = AlphaEditConfig

    def __init__(self, cfg: AlphaEditConfig, projectors: dict[int, torch.Tensor]):
        self.cfg = cfg
        self.P = projectors                                                   # layer -> (d_k, d_k)
        self.C_p = {l: torch.zeros_like(P, dtype=torch.float64) for l, P in projectors.items()}

    def layer_delta(self, layer: int, K: torch.Tensor, R: torch.Tensor, *, device=None) -> torch.Tensor:
        """E5 on `device` (the edited module's; default K's): (d, d_k), see `solve` for dtypes."""
        return alphaedit_delta(K, R, self.P[layer], self.C_p[layer], self.cfg.L2, dtype=_dtype(self.cfg),
                               device=device)

    def after_batch(self, keys_after: dict[int, torch.Tensor], devices: dict | None = None) -> None:
        """C_p += K K^T with the batch's keys recomputed on the edited model (E5).

        K K^T is accumulated in float64 over column blocks of K on the layer's device (`devices[layer]`,
        default K's), then added to C_p, which stays on the CPU in float64 (one (d_k, d_k) per layer).
        """
        for l, K in keys_after.items():
            device = (devices or {}).get(l, K.device)
            self.C_p[l] += key_gram(K, dtype=torch.float64, device=device).cpu()
