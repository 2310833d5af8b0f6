"""A toy editor, added the way a plug-in adds one: this file and one `register_editor` call (tests/grid/
test_plugins.py). Nothing in editdecay names it.

Ridge: the locate-then-edit update with the identity in place of the preserved-key statistics,
Delta = R K^T (ridge I + K K^T)^-1, i.e. E4 with C = I. It needs no E1 statistics, so a grid plans no
statistics stage for it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from editdecay.edit.config import LocateThenEditConfig
from editdecay.edit.editor import LocateThenEdit
from editdecay.edit.solve import memit_delta


class RidgeConfig(LocateThenEditConfig):
    config_name: ClassVar[str] = "toy-ridge config"

    ridge: float = Field(1.0, gt=0, description="weight of the identity that keeps the update small")


class Ridge(LocateThenEdit):
    name = "toy-ridge"
    config_class = RidgeConfig
    presets = {"llama": dict(layers=(1, 2), v_num_grad_steps=10, clamp_norm_factor=4.0, n_context_templates=1,
                             context_length=5, ridge=1.0)}
    needs_statistics = False

    def layer_delta(self, layer: int, K: torch.Tensor, R: torch.Tensor, *, device=None) -> torch.Tensor:
        eye = torch.eye(K.shape[0], dtype=torch.float64)                       # (d_k, d_k) in place of C
        return memit_delta(K, R, eye, self.cfg.ridge, device=device)         # (d, d_k)
