"""GRACE (docs/METHODS.md "GRACE"): edits kept in a codebook beside one layer, not in the weights.

Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors" (NeurIPS 2023).
The codebook sits at the MLP output projection of one layer (its host, the architecture table's `mlp_out`):
keys k_i are the host's inputs (d_k) at the last prompt token of edited requests, each with a deferral radius
eps_i, and values v_i (d) replace the host's output. At every position whose input x is within eps of its
nearest key (Euclidean), the host's output becomes that key's value:

    i* = argmin_i ||x - k_i||,   out = v_i*  if ||x - k_i*|| <= eps_i*,  else the host's own output.

Editing a request: its key is added (or, when the nearest key is close, GRACE's conflict rules apply: a
different label splits both radii at half the distance, the same label widens the nearest radius to the
distance (`epsilon_expand: coverage`) or also moves that key halfway (`moving_average`)); then the values of
the batch's keys are optimised with Adam on the teacher-forced NLL of the new targets (edit/losses.py),
everything else frozen. Values start as uniform noise in [0, 1) (`value_init: cold`) or as the host's
output there (`warm`).

Original code: thartvigsen/grace (`grace/editors/grace.py`), as ported to zjunlp/EasyEdit
`easyeditor/models/grace/GRACE.py` (`GRACEAdapter.forward`: key insertion at iteration 0, conflict handling,
`split_epsilons_in_half`, replacement; `GRACE.edit`: Adam with lr `edit_lr` over `n_iter` iterations),
hyperparameters in `hparams/GRACE/*.yaml`. Differences, each because the rest of editdecay needs it:
- the deferral test runs at every position (EasyEdit's `replace_last` tests one position, the last prompt
  token while editing and afterwards whichever position its state points to), so teacher-forced scoring of
  padded batches (E6) and fine-tuning see the codebook wherever an input matches;
- a batch of requests is edited at once (keys inserted in order, then their values optimised together on the
  mean loss); sequential batches grow one codebook;
- labels are the new targets' text (EasyEdit compares the mean of the label token ids).

The patch is module state (edit/patch.py, core/module_edit.py): keys, values, radii and labels. Fine-tuning
leaves it frozen (it is not part of the base model; its keys still move because the layers below train)
unless `finetune_values` makes its values trainable parameters.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from editdecay.core.arch import arch_for, get_module, resolve_name
from editdecay.core.checks import check_finite
from editdecay.core.errors import ConfigError
from editdecay.core.hooks import capture_inputs, run_until_stop
from editdecay.core.module_edit import ModuleEdit, attach
from editdecay.core.request import EditRequest
from editdecay.core.results import Timer
from editdecay.edit.config import EditorConfig
from editdecay.edit.editor import MEMORY, Editor
from editdecay.edit.losses import frozen_except, model_device, target_batch, target_nll
from editdecay.edit.patch import EditPatch, ModuleState

log = logging.getLogger(__name__)


class GraceConfig(EditorConfig):
    """GRACE: a codebook of (key, radius, value) at the MLP output projection of one layer."""

    config_name: ClassVar[str] = "grace config"

    epsilon: float = Field(1.0, gt=0, description="initial deferral radius of a new key (Euclidean distance of "
                                                  "the host's inputs)")
    value_steps: int = Field(50, ge=1, description="Adam steps on the values of each batch (EasyEdit n_iter)")
    value_lr: float = Field(1.0, gt=0, description="Adam learning rate of the values (EasyEdit edit_lr)")
    value_init: Literal["cold", "warm"] = Field("cold", description="a new value starts as uniform noise in [0, 1) "
                                                "(cold) or as the host's output at the key (warm)")
    epsilon_expand: Literal["coverage", "moving_average"] = Field(
        "coverage", description="a request near a key with the same label widens its radius to the distance "
                                "(coverage) and also moves the key halfway (moving_average)")
    finetune_values: bool = Field(False, description="later fine-tuning trains the codebook's values (default: "
                                                     "the codebook is frozen, not part of the base model)")

    @field_validator("layers")
    @classmethod
    def _one_layer(cls, v):
        if len(v) != 1:
            raise ValueError(f"GRACE keeps its codebook at one layer; got {len(v)} layers {list(v)}")
        return v


# EasyEdit hparams/GRACE: one late MLP output projection, eps 1, cold values, 50 (llama) to 200 (gpt) steps.
_STUDY = dict(epsilon=1.0, value_lr=1.0, value_init="cold", epsilon_expand="coverage")


class GraceCodebook(ModuleEdit):
    """The codebook attached to one host module (core/module_edit.py). keys (m, d_in), radii (m,), values
    (m, d_out): float32 buffers (values a parameter when `trains`); `labels[i]`, `case_ids[i]` name key i."""

    def __init__(self, d_in: int, d_out: int, *, trains: bool = False):
        super().__init__()
        self.d_in, self.d_out, self.trains = d_in, d_out, trains
        self.register_buffer("keys", torch.zeros(0, d_in))
        self.register_buffer("epsilons", torch.zeros(0))
        self._set_values(torch.zeros(0, d_out))
        self.labels: list[str] = []
        self.case_ids: list[str] = []
        self.trained: tuple[torch.Tensor, torch.Tensor] | None = None   # (rows, values) being optimised

    def _set_values(self, values: torch.Tensor) -> None:
        # A copy: the values of a codebook rebuilt from a patch must not share memory with the patch's tensors,
        # which fine-tuning (finetune_values) would otherwise change in place.
        values = values.detach().to(torch.float32, copy=True)
        if "values" in self._parameters or "values" in self._buffers:
            delattr(self, "values")
        if self.trains:
            self.values = nn.Parameter(values)
        else:
            self.register_buffer("values", values)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def current_values(self) -> torch.Tensor:
        """(m, d_out): the values, with the rows being optimised taken from their leaf tensor (differentiable)."""
        if self.trained is None:
            return self.values
        rows, v = self.trained
        return self.values.index_put((rows,), v)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key of each query row (N, d_in), float32; requires a key."""
        d = torch.cdist(queries.float(), self.keys)                 # (N, m)
        return d.min(dim=1)

    def edit_output(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if len(self) == 0:
            return output
        q = inputs.reshape(-1, inputs.shape[-1])                       # (B*T, d_in)
        dist, idx = self.nearest(q)
        hit = dist <= self.epsilons[idx]                              # (B*T,)
        if not bool(hit.any()):
            return output
        flat = output.reshape(-1, output.shape[-1])                    # (B*T, d_out)
        replaced = torch.where(hit[:, None], self.current_values()[idx].to(flat.dtype), flat)
        return replaced.reshape(output.shape)

    def add(self, key: torch.Tensor, value: torch.Tensor, epsilon: float, label: str, case_id: str) -> int:
        """Append key (d_in,), value (d_out,) and radius; returns the new index."""
        self.keys = torch.cat([self.keys, key.detach().float().reshape(1, -1).to(self.keys.device)])
        self.epsilons = torch.cat([self.epsilons, torch.tensor([epsilon], device=self.epsilons.device)])
        self._set_values(torch.cat([self.values.detach(), value.detach().float().reshape(1, -1)
                                    .to(self.values.device)]))
        self.labels.append(label)
        self.case_ids.append(case_id)
        return len(self) - 1

    def check_host(self, host: nn.Module, name: str) -> None:
        d_in, d_out = host_dims(host)
        if (d_in, d_out) != (self.d_in, self.d_out):
            raise ConfigError(f"GRACE codebook for {name} maps inputs of width {self.d_in} to outputs of width "
                              f"{self.d_out}, but the model's {name} maps {d_in} -> {d_out}: the patch was made "
                              f"for another model")

    def state(self) -> ModuleState:
        config = {"d_in": self.d_in, "d_out": self.d_out, "trains": self.trains, "labels": list(self.labels),
                  "case_ids": list(self.case_ids)}
        tensors = {"keys": self.keys.detach().cpu().clone(), "values": self.current_values().detach().cpu().clone(),
                   "epsilons": self.epsilons.detach().cpu().clone()}
        return ModuleState(config=config, tensors=tensors)

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "GraceCodebook":
        """Rebuild from a patch (`state()`). Raises ConfigError when the state is inconsistent."""
        try:
            book = cls(int(config["d_in"]), int(config["d_out"]), trains=bool(config.get("trains", False)))
            keys, values, eps = tensors["keys"], tensors["values"], tensors["epsilons"]
            labels, case_ids = list(config["labels"]), list(config["case_ids"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"GRACE codebook state lacks or mangles {e}; recompute the patch") from None
        m = keys.shape[0]
        if keys.shape != (m, book.d_in) or values.shape != (m, book.d_out) or eps.shape != (m,) \
                or len(labels) != m or len(case_ids) != m:
            raise ConfigError(f"GRACE codebook state is inconsistent: keys {tuple(keys.shape)}, values "
                              f"{tuple(values.shape)}, epsilons {tuple(eps.shape)}, {len(labels)} labels for "
                              f"d_in {book.d_in}, d_out {book.d_out}; recompute the patch")
        book.keys, book.epsilons = keys.float().clone(), eps.float().clone()
        book._set_values(values)
        book.labels, book.case_ids = labels, case_ids
        return book


def host_dims(host: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear host: nn.Linear weights are (out, in), GPT-2's Conv1D (in, out)."""
    w = host.weight
    return (int(w.shape[1]), int(w.shape[0])) if isinstance(host, nn.Linear) else (int(w.shape[0]), int(w.shape[1]))


class Grace(Editor):
    name = "grace"
    family = MEMORY
    config_class = GraceConfig
    needs_statistics = False
    module_edit = GraceCodebook
    presets = {
        "gpt2": dict(_STUDY, layers=(35,), value_steps=200),      # EasyEdit gpt2-xl.yaml (h[35])
        "gptj": dict(_STUDY, layers=(25,), value_steps=200),      # EasyEdit gpt-j-6b.yaml (h[25].mlp.fc_out)
        "gpt_neox": dict(_STUDY, layers=(25,), value_steps=200),
        "llama": dict(_STUDY, layers=(27,), value_steps=50),      # EasyEdit llama-7b.yaml (layers[27], of 32)
    }
    # The embedded SmolLM2-135M (30 layers): layer 25 (EasyEdit's llama layer 27 of 32, scaled); 50 worldfacts
    # edits in one batch: ES 100 %, PS 15 % (= unedited), NS 100 % (benchmarks/editor_families.py).
    embedded_preset = dict(_STUDY, layers=(25,), value_steps=50)

    def start(self, lm, *, progress: bool = True) -> "GraceRun":
        return GraceRun(lm, self.cfg, self.name, progress=progress)


class GraceRun:
    """One GRACE editing run: a codebook attached to the live model, grown batch by batch."""

    def __init__(self, lm, cfg: GraceConfig, name: str, *, progress: bool = True):
        self.lm, self.cfg, self.editor_name, self.progress = lm, cfg, name, progress
        self.layer = cfg.layers[0]
        self.host_name = resolve_name(lm.model, arch_for(lm.model).mlp_out_name(self.layer))
        host = get_module(lm.model, self.host_name)
        d_in, d_out = host_dims(host)
        self.codebook = GraceCodebook(d_in, d_out, trains=cfg.finetune_values)
        self.attached = attach(host, self.codebook, self.host_name)
        self.generator = torch.Generator().manual_seed(cfg.seed)     # cold values, drawn in edit order
        self.requests: list[EditRequest] = []
        self.timer = Timer()
        self.warnings: list[str] = []
        self.stats_provenance: dict | None = None
        self.log: list[dict] = []

    def _queries(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's input (n, d_in) and its own output (n, d_out, the codebook bypassed) at each request's last
        prompt token; the forward pass stops at the host."""
        model = self.lm.model
        host = get_module(model, self.host_name)
        with torch.no_grad(), capture_inputs(model, [self.host_name], stop_after=self.host_name) as ins:
            run_until_stop(model, **batch.inputs)
            rows = torch.arange(batch.size, device=ins[self.host_name].device)
            x = ins[self.host_name][rows, batch.prompt_last.to(rows.device)]            # (n, d_in)
            own = host.forward(x)                                                       # forward(): no hooks
        return x.float().cpu(), own.float().cpu()

    def edit_batch(self, requests: list[EditRequest]) -> None:
        """Insert the batch's keys (GRACE's conflict rules), then optimise their values together.
        Raises NonFiniteError (the codebook keeps the keys and values of earlier batches only)."""
        cfg, book, model = self.cfg, self.codebook, self.lm.model
        batch = target_batch(self.lm.tokenizer, [(r.rewrite_prompt, r.target_new) for r in requests],
                             model_device(model))
        kept = book.state()
        with self.timer("keys"):
            queries, outputs = self._queries(batch)
            check_finite("GRACE keys", {r.case_id: q for r, q in zip(requests, queries)})
            rows = [self._insert(r, q, o) for r, q, o in zip(requests, queries, outputs)]
        chosen = torch.tensor(sorted(set(rows)), device=book.values.device)
        values = nn.Parameter(book.values.detach()[chosen].clone())                  # (k, d_out)
        opt = torch.optim.Adam([values], lr=cfg.value_lr)
        book.trained = (chosen, values)
        losses = []
        try:
            with self.timer("values"), frozen_except(model, []):
                for _ in range(cfg.value_steps):
                    opt.zero_grad(set_to_none=True)
                    loss = target_nll(model, batch).mean()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
            check_finite("GRACE values", values)
        except BaseException:
            book.trained = None
            self._reset(kept)
            raise
        book.trained = None
        with torch.no_grad():
            updated = book.values.detach().clone()
            updated[chosen] = values.detach()
        book._set_values(updated)
        self.log.append({"n": len(requests), "n_keys": len(book), "new_keys": len(book) - len(kept.config["labels"]),
                         "first_loss": losses[0], "final_loss": losses[-1]})
        self.requests.extend(requests)

    def _insert(self, r: EditRequest, query: torch.Tensor, output: torch.Tensor) -> int:
        """GRACE's key insertion for one request (EasyEdit `GRACEAdapter.forward` at iteration 0); returns the row
        whose value the request trains."""
        cfg, book = self.cfg, self.codebook
        if cfg.value_init == "cold":
            value = torch.rand(book.d_out, generator=self.generator)
        else:
            value = output
        if len(book) == 0:
            return book.add(query, value, cfg.epsilon, r.target_new, r.case_id)
        dist, idx = book.nearest(query[None].to(book.keys.device))
        dist, j = float(dist[0]), int(idx[0])
        if dist > cfg.epsilon + float(book.epsilons[j]):
            return book.add(query, value, cfg.epsilon, r.target_new, r.case_id)
        if book.labels[j] != r.target_new:
            new = book.add(query, value, cfg.epsilon, r.target_new, r.case_id)
            book.epsilons[j] = dist / 2 - 1e-5
            book.epsilons[new] = dist / 2
            return new
        if dist > float(book.epsilons[j]):
            if cfg.epsilon_expand == "moving_average":
                book.keys[j] = 0.5 * book.keys[j] + 0.5 * query.to(book.keys.device)
            book.epsilons[j] = dist
        return j

    def _reset(self, state: ModuleState) -> None:
        fresh = GraceCodebook.from_state(state.config, state.tensors)
        book = self.codebook
        book.keys, book.epsilons = fresh.keys.to(book.keys.device), fresh.epsilons.to(book.keys.device)
        book._set_values(fresh.values.to(book.keys.device))
        book.labels, book.case_ids = fresh.labels, fresh.case_ids

    def patch(self, extra: dict | None = None) -> EditPatch:
        return EditPatch(
            deltas={}, states={self.host_name: self.codebook.state()}, module_edit=GraceCodebook,
            layers=(self.layer,), editor=self.editor_name,
            config=self.cfg.model_dump(mode="json"), requests=tuple(self.requests),
            model_identity=self.lm.identity.to_dict(),
            extra={"timings": dict(self.timer.seconds), "warnings": list(self.warnings), "codebook": self.log,
                   **(extra or {})})

    def provenance(self) -> dict:
        return {"statistics": None, "codebook": self.log}

    def restore(self) -> None:
        self.attached.detach()
