"""MEND (docs/METHODS.md "MEND"): a trained hypernetwork turns an edit's gradient into a weight update.

Mitchell et al., "Fast Model Editing at Scale" (ICLR 2022). For a batch of `edits_per_step` requests, the
teacher-forced NLL of the new targets (edit/losses.py) is differentiated with respect to the outputs of the
edited weights (the MLP linear maps of `layers`); each weight's input rows u_t and output gradients delta_t go
through the hypernetwork (edit/mend_net.py), and W += lr_scale * eta_W * sum_t delta~_t u~_t^T. The next
requests are edited on the updated model. The patch is the weights' total change (edit/deltas.py).

The hypernetwork is trained beforehand (`Mend.train`, edit/mend_train.py; `editdecay train-editor --editor
mend`) on edit requests disjoint from the ones edited later, and `hypernetwork` names its directory. An
edited request about a subject the network was trained on is a warning kept in the patch.

Original code: eric-mitchell/mend, `algs/mend.py` (`MEND.edit`), `hooks.py`; the gradient factors are taken
with `torch.autograd.grad` on the weights' outputs instead of module hooks setting `__x__`/`__delta__`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field

from editdecay.core.checks import check_finite
from editdecay.core.config import Config
from editdecay.core.errors import ConfigError
from editdecay.core.request import EditRequest
from editdecay.edit.config import EditorConfig
from editdecay.edit.deltas import WeightDeltaRun
from editdecay.edit.editor import META_LEARNING, Editor
from editdecay.edit.losses import model_device, target_batch
from editdecay.edit.mend_net import edited_weights, gradient_factors

if TYPE_CHECKING:
    from editdecay.edit.mend_net import Hypernetwork

log = logging.getLogger(__name__)


class MendConfig(EditorConfig):
    """MEND: a trained hypernetwork edits the MLP weights of `layers` from the edit's gradient."""

    config_name: ClassVar[str] = "mend config"

    hypernetwork: str | None = Field(None, description="directory of the trained MEND network (editdecay "
                                     "train-editor --editor mend --out DIR); required to edit")
    hypernetwork_sha256: str | None = Field(None, description="expected sha256 of the network's tensors (pins the "
                                            "network a grid's stage ids stand for); None: not checked")
    modules: Literal["mlp", "out"] = Field("mlp", description="edited weights of each layer: every MLP linear map "
                                           "(mlp, as the original) or the MLP output projection only (out)")
    edits_per_step: int | None = Field(1, ge=1, description="requests whose gradients make one update (the "
                                       "network's training n_edits); the next ones are edited on the updated "
                                       "model; None: the whole batch")
    lr_scale: float = Field(1.0, gt=0, description="factor on the learned step sizes at edit time (EasyEdit "
                                                   "lr_scale)")


class MendTraining(Config):
    """How MEND's hypernetwork is trained (`Mend.train`): outer Adam on the network, inner edits of
    `edits_per_example` requests, loss c_edit * NLL(new target | paraphrase) + c_loc * KL(base || edited) on
    unrelated prompts (mend config/alg/mend.yaml and config/config.yaml)."""

    config_name: ClassVar[str] = "mend training"

    steps: int = Field(1000, ge=1, description="outer optimiser steps")
    accumulate: int = Field(10, ge=1, description="edit examples whose losses make one outer step (accumulate_bs)")
    lr: float = Field(1e-6, gt=0, description="Adam learning rate of the network")
    lr_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the step sizes eta_W")
    edit_lr: float = Field(1e-4, description="initial step size eta_W of every weight")
    rank: int = Field(1920, ge=1, description="rank of the network's low-rank layers")
    n_hidden: int = Field(1, ge=0, description="hidden layers of the network (each a low-rank residual layer)")
    c_edit: float = Field(0.1, ge=0, description="weight of the edit loss (cedit)")
    c_loc: float = Field(1.0, ge=0, description="weight of the locality KL (cloc)")
    edits_per_example: int = Field(1, ge=1, description="requests edited together in one example (n_edits)")
    loc_per_example: int = Field(1, ge=1, description="unrelated (prompt, answer) pairs whose KL one example keeps")
    grad_clip: float = Field(100.0, gt=0, description="clip of the network's gradient norm")
    validation: int = Field(20, ge=0, description="training requests held back to measure the trained network")
    log_every: int = Field(50, ge=1, description="outer steps between log lines")
    seed: int = Field(0, description="seed of the network's initialisation and of the example order")


class Mend(Editor):
    name = "mend"
    family = META_LEARNING
    config_class = MendConfig
    training_class = MendTraining
    trained_field = "hypernetwork"
    needs_statistics = False
    # mend config/model/*.yaml and EasyEdit hparams/MEND: the MLP weights of the last three layers.
    presets = {
        "gpt2": dict(layers=(45, 46, 47), modules="mlp"),      # gpt2-xl (48 layers)
        "gptj": dict(layers=(25, 26, 27), modules="mlp"),
        "gpt_neox": dict(layers=(29, 30, 31), modules="mlp"),
        "llama": dict(layers=(29, 30, 31), modules="mlp"),     # llama-7b (32 layers)
    }
    # The embedded SmolLM2-135M (30 layers): its last three layers; the network is trained by the user
    # (docs/METHODS.md MEND: command, data, time).
    embedded_preset = dict(layers=(27, 28, 29), modules="mlp", edits_per_step=1)

    def __init__(self, cfg: MendConfig, statistics=None, cache=None):
        super().__init__(cfg, statistics, cache)
        if cfg.hypernetwork is None:
            raise ConfigError("mend needs a trained hypernetwork: train one with `editdecay train-editor --editor "
                              "mend --model MODEL --out DIR` and give hypernetwork=DIR (--hypernetwork DIR)")
        from editdecay.edit.mend_net import Hypernetwork

        self.net, self.record = Hypernetwork.load(Path(cfg.hypernetwork), cfg.hypernetwork_sha256)

    def start(self, lm, *, progress: bool = True) -> "MendRun":
        return MendRun(lm, self.cfg, self.name, self.net, self.record, progress=progress)

    @classmethod
    def train(cls, lm, cfg: MendConfig, settings: MendTraining, requests: list[EditRequest], out: Path, *,
              progress: bool = True) -> dict:
        """Train a hypernetwork for `cfg`'s layers and modules on `requests` (edit/mend_train.py), measure it on the
        held-back requests (each edited alone, E6) and save it into `out`; returns its record."""
        from editdecay.edit.mend_train import train_hypernetwork

        net, record, held = train_hypernetwork(lm, cfg, settings, requests, progress=progress)
        if held:
            record["training"]["validation"] = _validate(lm, cfg, net, held)
        record["tensors_sha256"] = net.save(Path(out), record)
        return record


def _validate(lm, cfg: MendConfig, net: "Hypernetwork", held: list[EditRequest]) -> dict:
    """ES / PS / NS of the held-back requests, each edited alone on the unedited model (E6)."""
    from editdecay.measure.metrics import aggregate, evaluate_requests

    record = {"model": lm.identity.to_dict(), "training": {}}
    outcomes = []
    for r in held:
        run = MendRun(lm, cfg.replace(hypernetwork="(in training)"), Mend.name, net, record, progress=False)
        try:
            run.edit_batch([r])
            outcomes += evaluate_requests(lm.model, lm.tokenizer, [r])
        finally:
            run.restore()
    agg = aggregate(outcomes)
    return {k: agg.get(k) for k in ("n", "efficacy", "paraphrase", "neighborhood")}


class MendRun(WeightDeltaRun):
    """One MEND editing run (see module docstring)."""

    def __init__(self, lm, cfg: MendConfig, name: str, net: "Hypernetwork", record: dict, *, progress: bool = True):
        weights = edited_weights(lm.model, cfg.layers, cfg.modules)
        trained_on = (record.get("model") or {}).get("fingerprint")
        if trained_on != lm.identity.fingerprint:
            raise ConfigError(f"hypernetwork {cfg.hypernetwork} was trained on weights {trained_on} "
                              f"({(record.get('model') or {}).get('name', '?')}), but the model holds weights "
                              f"{lm.identity.fingerprint} ({lm.identity.name}); train a network for this model")
        if net.weights != weights:
            raise ConfigError(f"hypernetwork {cfg.hypernetwork} edits {sorted(net.weights)}, but layers="
                              f"{list(cfg.layers)} modules={cfg.modules!r} select {sorted(weights)} of this model; "
                              f"give the layers and modules it was trained for ({record.get('layers')}, "
                              f"{record.get('modules')!r})")
        super().__init__(lm, name, cfg, list(weights), tuple(cfg.layers), progress=progress)
        self.net = net.to(model_device(lm.model)).eval()
        self.trained_subjects = set((record.get("training") or {}).get("subjects", []))
        self.record = record
        self.losses: list[float] = []

    def edit_batch(self, requests: list[EditRequest]) -> None:
        """MEND updates of `edits_per_step` requests at a time. Raises NonFiniteError before a non-finite update
        reaches the model."""
        cfg, model, tok = self.cfg, self.lm.model, self.lm.tokenizer
        seen = sorted({r.subject for r in requests} & self.trained_subjects)
        if seen:
            w = (f"mend: {len(seen)} edited subject(s) were in the hypernetwork's training requests "
                 f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}): these edits are not held out")
            log.warning(w)
            self.warnings.append(w)
        size = cfg.edits_per_step or len(requests)
        device = model_device(model)
        for start in range(0, len(requests), size):
            chunk = requests[start:start + size]
            batch = target_batch(tok, [(r.rewrite_prompt, r.target_new) for r in chunk], device)
            with self.timer("gradients"):
                loss, factors = gradient_factors(model, list(self.modules), batch)
            self.losses.append(loss)
            with self.timer("hypernetwork"), torch.no_grad():
                updates = {n: self.net.update(n, u, v, lr_scale=cfg.lr_scale) for n, (u, v) in factors.items()}
            check_finite(f"{self.editor_name} update", updates)
            for n, upd in updates.items():
                self.add_delta(n, upd)
        self.requests.extend(requests)

    def patch_extra(self) -> dict:
        return {"hypernetwork": {"dir": self.cfg.hypernetwork, "sha256": self.record.get("tensors_sha256"),
                                 "trained_on": (self.record.get("training") or {}).get("data")},
                "edit_losses": self.losses}
