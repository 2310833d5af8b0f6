"""MEND's hypernetwork (docs/METHODS.md "MEND"): rank-one gradient factors in, a weight update out.

The gradient of a loss with respect to a linear layer's weight W (d_out, d_in) over a sequence is a sum of
rank-one terms, one per position t: grad W = sum_t delta_t u_t^T, with u_t the layer's input (d_in) and
delta_t the gradient of the loss with respect to its output (d_out). MEND edits the pair instead of the
(d_out x d_in) matrix: a network g maps each (u_t, delta_t) to (u~_t, delta~_t), and the update is

    W' = W + eta_W * sum_t delta~_t u~_t^T          (Linear; GPT-2's Conv1D stores the transpose)

with a learned step size eta_W per edited weight. g normalises u and delta with running statistics of the
training gradients, then runs one residual low-rank MLP on their concatenation (`combine`), shared by every
weight of the same shape, with a learned scale and shift per weight (`mode`).

Original code: eric-mitchell/mend, `algs/mend.py` (`GradientTransform`: normalisation with `update_counter`,
the combined network; `MEND.edit`: the pseudo-gradient `einsum("bi,bj->ji", x, delta)` and `p + lr * g`),
`nn.py` (`IDMLP`, `LRLinear`: u zero-initialised, v standard normal, `clamp(min=0)` and the identity skip),
`hooks.py` (the layer inputs and output gradients), `config/alg/mend.yaml` (rank 1920, one hidden layer,
edit_lr 1e-4, init id, norm, combine, shared).

On disk a trained network is a directory: `hypernetwork.safetensors` (every tensor, running statistics
included) and `hypernetwork.json` (structure, the model it was trained on, the training record).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editdecay.core.arch import arch_for, get_module, resolve_name
from editdecay.core.cache import atomic_write_json, sha256_file
from editdecay.core.errors import ConfigError
from editdecay.edit.losses import TargetBatch, frozen_except, target_nll

WEIGHTS_FILE = "hypernetwork.safetensors"
META_FILE = "hypernetwork.json"
FORMAT = "editdecay.mend.hypernetwork/1"


class LowRankResidual(nn.Module):
    """One layer of the IDMLP: y = clamp((U V x + b) * scale[mode] + shift[mode], min=0) + x, with U (dim, r)
    zero-initialised so the layer starts as the identity (mend nn.py `LRLinear`, init "id")."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator | None = None):
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:        # x: (N, dim)
        pre = (self.u @ (self.v @ x.T)).T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return pre.clamp(min=0) + x


class GradientTransform(nn.Module):
    """g for every weight of one shape (d_in, d_out): normalisation + `n_layers` low-rank residual layers on
    [u; delta] (mend algs/mend.py `GradientTransform` with combine=True, mlp_class IDMLP)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_modes: int, n_hidden: int = 1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.layers = nn.ModuleList(LowRankResidual(dim, rank, n_modes, generator) for _ in range(n_hidden + 1))
        for name, size in (("u_mean", d_in), ("v_mean", d_out), ("u_s", d_in), ("v_s", d_out)):
            self.register_buffer(name, torch.zeros(size))
        self.register_buffer("k", torch.zeros(()))           # samples seen by the running statistics

    def observe(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Welford updates of the running means and sums of squares, one row at a time (mend `update_counter`)."""
        with torch.no_grad():
            for i in range(u.shape[0]):
                if float(self.k) == 0:
                    self.u_mean.copy_(u[i])
                    self.v_mean.copy_(v[i])
                    self.u_s.zero_()
                    self.v_s.zero_()
                    self.k.fill_(1)
                    continue
                self.k += 1
                for x, mean, s in ((u[i], self.u_mean, self.u_s), (v[i], self.v_mean, self.v_s)):
                    new = mean + (x - mean) / self.k
                    s += (x - mean) * (x - new)
                    mean.copy_(new)

    def forward(self, u: torch.Tensor, v: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        """u (N, d_in), v (N, d_out) -> (u~, v~) of the same shapes, float32."""
        if float(self.k) < 2:
            raise ConfigError(f"MEND hypernetwork: normalisation statistics rest on {int(self.k)} gradient rows; "
                              f"train the network first (editdecay train-editor --editor mend)")
        u_std = (self.u_s / (self.k - 1)).sqrt()
        v_std = (self.v_s / (self.k - 1)).sqrt()
        x = torch.cat([(u - self.u_mean) / (u_std + 1e-7), (v - self.v_mean) / (v_std + 1e-7)], dim=-1)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, :self.d_in], x[:, self.d_in:]


def nonzero_rows(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (B, T, .) to rows and keep those where both factors are non-zero (mend's `nz_mask`): padding
    positions after a sequence have a zero output gradient and carry nothing."""
    u, v = u.reshape(-1, u.shape[-1]).float(), v.reshape(-1, v.shape[-1]).float()
    keep = (u != 0).any(-1) & (v != 0).any(-1)
    return u[keep], v[keep]


class Hypernetwork(nn.Module):
    """MEND's networks for a set of weights: one `GradientTransform` per weight shape, a step size per weight.

    `weights`: module name -> (d_in, d_out, conv1d) of each edited weight, in a fixed order; the weights of one
    shape share a transform, each with its own mode (its index among them)."""

    def __init__(self, weights: dict[str, tuple[int, int, bool]], *, rank: int, n_hidden: int = 1,
                 edit_lr: float = 1e-4, seed: int = 0):
        super().__init__()
        self.weights = dict(weights)
        self.rank, self.n_hidden = rank, n_hidden
        shapes: dict[tuple[int, int], list[str]] = {}
        for name, (d_in, d_out, _) in self.weights.items():
            shapes.setdefault((d_in, d_out), []).append(name)
        self.shapes = shapes
        g = torch.Generator().manual_seed(seed)
        self.transforms = nn.ModuleDict({
            f"{d_in}x{d_out}": GradientTransform(d_in, d_out, rank, len(names), n_hidden, generator=g)
            for (d_in, d_out), names in shapes.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.weights),), float(edit_lr)))

    def transform_of(self, name: str) -> tuple[GradientTransform, int]:
        d_in, d_out, _ = self.weights[name]
        return self.transforms[f"{d_in}x{d_out}"], self.shapes[(d_in, d_out)].index(name)

    def update(self, name: str, u: torch.Tensor, v: torch.Tensor, *, observe: bool = False,
               lr_scale: float = 1.0) -> torch.Tensor:
        """The update of weight `name` in its own layout from its inputs u (B, T, d_in) and output gradients
        v (B, T, d_out): eta * sum_t v~_t u~_t^T ((d_out, d_in); (d_in, d_out) for Conv1D). `observe`: add the
        rows to the normalisation statistics first (training)."""
        d_in, d_out, conv1d = self.weights[name]
        u, v = nonzero_rows(u, v)
        transform, mode = self.transform_of(name)
        if observe:
            transform.observe(u, v)
        ut, vt = transform(u, v, mode)
        grad = ut.T @ vt if conv1d else vt.T @ ut                     # (d_in, d_out) or (d_out, d_in)
        return lr_scale * self.edit_lrs[list(self.weights).index(name)] * grad

    def save(self, directory: Path, record: dict) -> str:
        """Write the network and `record` (model identity, structure, training) into `directory`; returns the
        tensors' sha256."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp)
            digest = sha256_file(tmp)
            os.replace(tmp, directory / WEIGHTS_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {"format": FORMAT, "weights": {n: list(w) for n, w in self.weights.items()}, "rank": self.rank,
                "n_hidden": self.n_hidden, "tensors_sha256": digest, **record}
        atomic_write_json(directory / META_FILE, meta)
        return digest

    @classmethod
    def load(cls, directory: Path, sha256: str | None = None) -> tuple["Hypernetwork", dict]:
        """(network, its record). Raises ConfigError naming the directory when it is not a trained network, its
        tensors do not match the record, or `sha256` is given and differs."""
        directory = Path(directory).expanduser()
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise ConfigError(f"hypernetwork={str(directory)!r}: no {META_FILE} and {WEIGHTS_FILE} there; train one "
                              f"with `editdecay train-editor --editor mend --out {directory}`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"hypernetwork {directory}: {META_FILE} is not readable JSON ({e})") from None
        if meta.get("format") != FORMAT:
            raise ConfigError(f"hypernetwork {directory}: format {meta.get('format')!r}, expected {FORMAT!r}")
        digest = sha256_file(weights_path)
        if digest != meta.get("tensors_sha256"):
            raise ConfigError(f"hypernetwork {directory}: {WEIGHTS_FILE} does not match {META_FILE} (interrupted "
                              f"save?); train it again")
        if sha256 is not None and digest != sha256:
            raise ConfigError(f"hypernetwork_sha256={sha256!r}, but {weights_path} has sha256 {digest}: the network "
                              f"changed since the configuration was written")
        weights = {n: (int(w[0]), int(w[1]), bool(w[2])) for n, w in meta["weights"].items()}
        net = cls(weights, rank=int(meta["rank"]), n_hidden=int(meta["n_hidden"]))
        try:
            net.load_state_dict(load_file(str(weights_path)))
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"hypernetwork {directory}: tensors do not fit the recorded structure ({e})") from None
        return net, meta


def edited_weights(model, layers, modules: str) -> dict[str, tuple[int, int, bool]]:
    """module name -> (d_in, d_out, conv1d) of the weights MEND edits in `layers` (architecture table)."""
    spec = arch_for(model)
    relative = spec.mlp if modules == "mlp" else None
    out = {}
    for layer in layers:
        names = ([spec.in_block(layer, r) for r in relative] if relative is not None else [spec.mlp_out_name(layer)])
        for table_name in names:
            name = resolve_name(model, table_name)
            w = get_module(model, name).weight
            d_out, d_in = (w.shape[1], w.shape[0]) if spec.conv1d else (w.shape[0], w.shape[1])
            out[name] = (int(d_in), int(d_out), spec.conv1d)
    return out


@contextlib.contextmanager
def recording(model, names: list[str]) -> Iterator[tuple[dict, dict]]:
    """Record each named module's first input (detached) and output (in the graph) of the next forward pass;
    the hooks live only inside this context."""
    inputs, outputs, handles = {}, {}, []
    try:
        for name in names:
            def hook(module, args, out, name=name):
                inputs[name] = args[0].detach()
                outputs[name] = out
            handles.append(get_module(model, name).register_forward_hook(hook))
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def gradient_factors(model, names: list[str], batch: TargetBatch) -> tuple[float, dict]:
    """The edit loss (mean over the batch's pairs of the target NLL) and, for each named weight, its input rows
    u (B, T, d_in) and the loss gradient at its output delta (B, T, d_out)."""
    weights = [get_module(model, n).weight for n in names]
    with frozen_except(model, weights), recording(model, names) as (ins, outs):
        loss = target_nll(model, batch).mean()
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
    return float(loss.detach()), {n: (ins[n], g.detach()) for n, g in zip(names, grads)}


__all__ = ["GradientTransform", "edited_weights", "gradient_factors", "recording", "Hypernetwork", "LowRankResidual", "META_FILE", "WEIGHTS_FILE", "nonzero_rows"]
