"""FT-M and FT-L (docs/METHODS.md "FT-M"): edit by gradient steps on one MLP layer's output weights.

FT-M (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for Large Language Models") minimises the
teacher-forced NLL of the new target given the prompt, prompt tokens masked (edit/losses.py `target_nll`), with
Adam on the weight of the MLP output projection of the chosen layer(s), everything else frozen. FT-L (Meng et
al. 2022, ROME's fine-tuning baseline) reads every target token from the prediction at the last prompt token
(`objective: prompt_last`) and bounds each weight's change by an L-infinity ball (`norm_constraint`).

Original code: zjunlp/EasyEdit, `easyeditor/models/ft/ft_main.py` (`execute_ft`: Adam over the requests in
chunks of `batch_size`, `num_steps` passes, a step is skipped when the chunk's loss is below 1e-2, the pass
loop stops when the mean loss is, the clamp to `weights_copy +- norm_constraint` after every step),
hyperparameters in `hparams/FT/*.yaml` (`objective_optimization: target_new` is FT-M, `prompt_last` FT-L).
Differences: the targets are tokenised as the evaluation does (core/tokens.py); the L-infinity ball is
centred on the weights at the start of each edited batch (EasyEdit: at the start of its call, the same for one
batch). The patch is the weights' change, a plain weight delta (edit/deltas.py).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import Field

from editdecay.core.arch import arch_for, get_module, resolve_name
from editdecay.core.checks import check_finite
from editdecay.core.request import EditRequest
from editdecay.edit.config import EditorConfig
from editdecay.edit.deltas import WeightDeltaRun
from editdecay.edit.editor import FINE_TUNING, Editor
from editdecay.edit.losses import frozen_except, model_device, prompt_last_nll, target_batch, target_nll

log = logging.getLogger(__name__)


class FtConfig(EditorConfig):
    """FT-M / FT-L: Adam on the MLP output weights of `layers`, loss on the new target only."""

    config_name: ClassVar[str] = "ft config"

    objective: Literal["target_new", "prompt_last"] = Field(
        "target_new", description="target_new: NLL of each target token given prompt and previous target tokens "
                                  "(FT-M); prompt_last: every target token from the last prompt token (FT-L)")
    learning_rate: float = Field(5e-4, gt=0, description="Adam learning rate of the edited weights")
    num_steps: int = Field(25, ge=1, description="passes over the batch's requests (EasyEdit num_steps)")
    requests_per_step: int | None = Field(None, ge=1, description="requests per optimiser step (EasyEdit "
                                          "batch_size); None: the whole batch")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay of the edited weights")
    norm_constraint: float | None = Field(None, gt=0, description="L-infinity bound on each weight's change "
                                          "within a batch (FT-L); None: unbounded (FT-M)")
    stop_loss: float = Field(1e-2, ge=0, description="a step is skipped below this loss; the passes stop once "
                                                     "the mean loss is below it")


# EasyEdit's hparams/FT: one late layer, lr 5e-4, 25 passes, one request per step.
_STUDY = dict(objective="target_new", learning_rate=5e-4, num_steps=25, requests_per_step=1)


class FineTune(Editor):
    name = "ft"
    family = FINE_TUNING
    config_class = FtConfig
    needs_statistics = False
    presets = {
        "gpt2": dict(_STUDY, layers=(0,)),          # EasyEdit gpt2-xl.yaml: layer 0
        "gptj": dict(_STUDY, layers=(21,)),         # EasyEdit gpt-j-6B.yaml
        "gpt_neox": dict(_STUDY, layers=(21,)),
        "llama": dict(_STUDY, layers=(21,)),        # EasyEdit llama-7b.yaml (of 32 layers)
    }
    # The embedded SmolLM2-135M (benchmarks/editor_families.py, 50 worldfacts edits in one batch): 10 passes
    # reach ES 68 %, 30 passes ES 94 % (PS 49 %, NS 52 %); docs/editor-families/README.md.
    embedded_preset = dict(_STUDY, layers=(7,), learning_rate=1e-3, num_steps=30, requests_per_step=10)

    def start(self, lm, *, progress: bool = True) -> "FtRun":
        return FtRun(lm, self.cfg, self.name, progress=progress)


class FtRun(WeightDeltaRun):
    """One FT-M/FT-L editing run: each batch is fitted by Adam on the edited weights (see module docstring)."""

    def __init__(self, lm, cfg: FtConfig, name: str, *, progress: bool = True):
        spec = arch_for(lm.model)
        modules = [resolve_name(lm.model, spec.mlp_out_name(l)) for l in cfg.layers]
        super().__init__(lm, name, cfg, modules, tuple(cfg.layers), progress=progress)
        self.losses: list[dict] = []

    def edit_batch(self, requests: list[EditRequest]) -> None:
        """Fit the batch's requests; the weights' change is added to the run's deltas. Raises NonFiniteError if a
        weight becomes NaN/inf (the weights are written back as original + the deltas before that batch)."""
        cfg, model, tok = self.cfg, self.lm.model, self.lm.tokenizer
        weights = [get_module(model, n).weight for n in self.modules]
        start = [w.detach().clone() for w in weights]
        size = cfg.requests_per_step or len(requests)
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        device = model_device(model)
        batches = [target_batch(tok, [(r.rewrite_prompt, r.target_new) for r in c], device) for c in chunks]
        loss_fn = target_nll if cfg.objective == "target_new" else prompt_last_nll
        opt = torch.optim.Adam(weights, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        passes, mean = 0, float("nan")
        try:
            with self.timer("optimise"), frozen_except(model, weights):
                for passes in range(1, cfg.num_steps + 1):
                    total = 0.0
                    for batch in batches:
                        opt.zero_grad(set_to_none=True)
                        loss = loss_fn(model, batch).mean()
                        # a NaN loss would otherwise skip every step (NaN >= stop_loss is False): no edit, no error
                        check_finite(f"{self.editor_name} edit loss", loss.detach())
                        total += float(loss.detach()) * batch.size
                        if float(loss.detach()) >= cfg.stop_loss:
                            loss.backward()
                            opt.step()
                        if cfg.norm_constraint is not None:
                            with torch.no_grad():
                                for w, w0 in zip(weights, start):
                                    w.copy_(torch.clamp(w, min=w0 - cfg.norm_constraint,
                                                        max=w0 + cfg.norm_constraint))
                    mean = total / len(requests)
                    if mean < cfg.stop_loss:
                        break
            check_finite(f"{self.editor_name} weights after the batch", {n: w for n, w in zip(self.modules, weights)})
        except BaseException:
            with torch.no_grad():
                for w, w0 in zip(weights, start):
                    w.copy_(w0)
            raise
        for n in self.modules:
            self.take_weight(n)
        self.losses.append({"n": len(requests), "passes": passes, "mean_final_loss": mean})
        self.requests.extend(requests)

    def patch_extra(self) -> dict:
        return {"optimisation": self.losses}
