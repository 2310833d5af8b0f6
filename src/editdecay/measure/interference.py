"""A mechanism measure: how much fine-tuning changed an edited layer's output at the edit's key.

For an edited layer l (its MLP output module W, docs/METHODS.md E2-E5) and edit i with key k_i (the input of W
at the subject's last token), the edit changed W's output at the key by dW_edit k_i; fine-tuning changed it
by dW_ft k_i, where dW_ft is the change of the layer's effective weight from the edited model M_e to the
fine-tuned M_ef (for LoRA/DoRA the adapter's contribution, as if merged; measured through the module's own
forward pass, so merged and unmerged adapters give the same numbers). Per (layer, edit):

    ratio  = ||dW_ft k_i|| / ||dW_edit k_i||       (0: fine-tuning left the edit's output alone)
    cosine = cos(dW_ft k_i, dW_edit k_i)            (-1: fine-tuning pushes straight back; ratio 1 and cosine
                                                      -1 undo the edit exactly at the key)

and the projection ratio * cosine (the fraction of the edit's output change removed, when negative). A layer
the recipe did not train is reported as `trained: false` with no numbers: its dW_ft is zero by construction,
which is not a finding. Keys are computed on the model handed to fine-tuning with the bare edit prompt (no
context templates; edit/keys.py `compute_keys`), so they are what the edited model's layer sees.

Per request, the ratio and cosine averaged over the edited layers that were trained are related to survival
by Spearman rank correlation (scipy.stats.spearmanr) in `relate`.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn


def key_outputs(delta: torch.Tensor, keys: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """dW k for each key: delta in the weight's layout ((d, d_k), or (d_k, d) for GPT-2's Conv1D), keys
    (d_k, n) -> (n, d)."""
    d = delta.float()
    return (keys.T.float() @ d) if conv1d else (keys.T.float() @ d.T)


@torch.no_grad()
def module_outputs(module: nn.Module, keys: torch.Tensor) -> torch.Tensor:
    """The module's output for each key as input: keys (d_k, n) -> (n, d), in eval mode (no adapter dropout)."""
    was = module.training
    module.eval()
    try:
        p = next(module.parameters())
        return module(keys.T.to(device=p.device, dtype=p.dtype)).float().cpu()
    finally:
        module.train(was)


def ratios(edit_out: torch.Tensor, ft_out: torch.Tensor, eps: float = 1e-12) -> list[dict]:
    """Per row i: {ratio, cosine, projection} of ft_out[i] against edit_out[i] (both (n, d)); the cosine is None
    where either vector is zero (below `eps`)."""
    out = []
    for e, f in zip(edit_out.double(), ft_out.double()):
        ne, nf = float(e.norm()), float(f.norm())
        ratio = nf / ne if ne > eps else None
        cos = float(e @ f) / (ne * nf) if ne > eps and nf > eps else None
        out.append({"ratio": ratio, "cosine": cos,
                    "projection": ratio * cos if ratio is not None and cos is not None else
                    (0.0 if ratio == 0 else None)})
    return out


def snapshot(model: nn.Module, names: Mapping[int, str]) -> dict[int, nn.Module]:
    """Copies of the edited modules as they are now (before fine-tuning), by layer."""
    from editdecay.core.arch import get_module, unwrap_peft

    base = unwrap_peft(model)
    return {l: copy.deepcopy(get_module(base, n)) for l, n in names.items()}


def interference(model_after: nn.Module, before: Mapping[int, nn.Module], names: Mapping[int, str],
                 deltas: Mapping[int, torch.Tensor], keys: Mapping[int, torch.Tensor], case_ids: Sequence[str], *,
                 conv1d: bool, trained: Sequence[int]) -> dict:
    """{layers: {l: {trained, module, per_request: {case_id: {ratio, cosine, projection}}, mean_ratio,
    mean_cosine}}, per_request: {case_id: {ratio, cosine}} (means over trained layers)}.

    model_after: the fine-tuned model (a PeftModel or a plain one); before: `snapshot` taken before training;
    deltas: the edit's delta per layer in the weight's layout; keys: (d_k, n) per layer; trained: layers whose
    edited module the recipe trained.
    """
    from editdecay.core.arch import get_module, unwrap_peft

    base = unwrap_peft(model_after)
    layers: dict = {}
    per: dict[str, dict[str, list[float]]] = {c: {"ratio": [], "cosine": []} for c in case_ids}
    for l, name in names.items():
        if l not in trained:
            layers[l] = {"trained": False, "module": name,
                         "note": "the recipe does not train this layer's edited module: fine-tuning cannot "
                                 "change its output at the keys (not a measurement)"}
            continue
        edit_out = key_outputs(deltas[l], keys[l], conv1d)                                      # (n, d)
        ft_out = module_outputs(get_module(base, name), keys[l]) - module_outputs(before[l], keys[l])
        rows = ratios(edit_out, ft_out)
        layers[l] = {"trained": True, "module": name, "per_request": dict(zip(case_ids, rows)),
                     "mean_ratio": _mean([r["ratio"] for r in rows]), "mean_cosine": _mean([r["cosine"] for r in rows])}
        for c, r in zip(case_ids, rows):
            for k in ("ratio", "cosine"):
                if r[k] is not None:
                    per[c][k].append(r[k])
    return {"layers": layers, "keys": "bare edit prompt on the model handed to fine-tuning",
            "per_request": {c: {k: _mean(v) for k, v in d.items()} for c, d in per.items()}}


def relate(per_request: Mapping[str, Mapping], survived: Mapping[str, bool], *, key: str = "ratio") -> dict:
    """Spearman rank correlation of a per-request mechanism value with survival (1 kept, 0 flipped) over the
    requests that have both; {rho, p, n} (rho/p None with fewer than 3 requests or a constant side)."""
    pairs = [(per_request[c][key], float(s)) for c, s in survived.items()
             if c in per_request and per_request[c].get(key) is not None]
    out = {"value": key, "against": "survived (1) or flipped (0)", "n": len(pairs), "rho": None, "p": None}
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return out
    from scipy.stats import spearmanr

    res = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
    out.update(rho=float(res.statistic), p=float(res.pvalue))
    return out


def _mean(v: Sequence[float | None]) -> float | None:
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None


__all__ = ["interference", "key_outputs", "module_outputs", "ratios", "relate", "snapshot"]
