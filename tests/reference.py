"""A deliberately straightforward implementation of E1-E4, to check the fast path against.

Used only by tests and benchmarks. Everything here trades speed for obviousness:

- target values (E3) are optimised ONE request at a time, each step a full-depth
  forward of the whole prompts + target (the request's templates and its KL prompt
  padded together) through `model(...).logits`, with a forward hook adding delta to
  block l*'s output at the subject's last token (no KV cache, no restriction to the
  scored positions);
- keys (E2) are read with one full-depth forward pass per layer (no early stop,
  no collecting several layers at once), then averaged two-level as in memit
  `memit/compute_ks.py`: a plain mean within each context type, then a plain mean of
  the type means (written out here with loops, independently of `edit.context`);
- statistics (E1) take one full-depth pass over the corpus per layer;
- the MEMIT solve (E4) goes through `torch.linalg.solve` on the symmetric system
  in float64, by a different route than `editors.solve` (A X = K R^T, Delta = X^T);
- the AlphaEdit solve (E5) is written as the paper's formula with an explicit inverse
  in float64: Delta = R K^T P ((K K^T + C_p) P + L2 I)^-1.

Tokenisation is shared with the fast path (`tokens.encode_subject_prompt`,
`tokens.encode_target`), so both see the same token positions; padding is on the
right with explicit positions, so a real token never attends to padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editdecay.core.arch import arch_for, as_out_in, check_layers, get_module
from editdecay.core.hooks import capture_inputs, capture_output, edit_output
from editdecay.core.request import EditRequest
from editdecay.core.tokens import (
    encode_subject_prompt,
    encode_target,
    pad_batch,
    pad_id,
)
from editdecay.edit.context import ContextTemplates, context_templates
from editdecay.edit.targets import TargetSettings


@dataclass(frozen=True)
class ReferenceTarget:
    """E3 result of one request."""

    z: torch.Tensor      # (d,) float32: h + delta
    h: torch.Tensor      # (d,) float32: block-l* output at the subject's last token of the bare prompt
    loss: float          # loss at the last evaluated step
    steps: int           # loss evaluations made (an early stop at step i counts i + 1)


@dataclass(frozen=True)
class ReferenceEdit:
    """Result of `reference_memit` / `reference_alphaedit`: the deltas of one batch, in (d, d_k) layout."""

    deltas: dict[int, torch.Tensor]    # layer -> (d, d_k) float64
    targets: tuple[ReferenceTarget, ...]
    templates: ContextTemplates


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, seqs: list[list[int]], tokenizer) -> torch.Tensor:
    """Full-depth forward of right-padded `seqs`; returns logits (B, T, V)."""
    batch = pad_batch(seqs, pad_id(tokenizer), "right").to(_device(model))
    return model(**batch.model_inputs(), use_cache=False).logits


@torch.no_grad()
def _block_output(model, tokenizer, request: EditRequest, layer: int) -> torch.Tensor:
    """Block `layer` output at the subject's last token of the bare prompt, (d,) float32 (full depth)."""
    sp = encode_subject_prompt(tokenizer, request.prompt, request.subject)
    with capture_output(model, arch_for(model).block_name(layer)) as store:
        _forward(model, [sp.ids], tokenizer)
    return store["out"][0, sp.index].float().clone()


@torch.no_grad()
def reference_block_outputs(model, tokenizer, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """Block `layer` output at the subject's last token of each bare prompt: (d, n) float32, one forward each."""
    return torch.stack([_block_output(model, tokenizer, r, layer) for r in requests], 1).cpu()


def reference_targets(model, tokenizer, request: EditRequest, templates: ContextTemplates | tuple[str, ...],
                      settings: TargetSettings) -> ReferenceTarget:
    """E3 for one request, one full forward (all templates + the KL prompt, padded) per step.

    loss = mean over ALL templates (every context type's, equal weight) of mean_tokens NLL(target_new)
           + kl_factor * KL(P_new || P_orig) at the subject's last token of `kl_prompt`
           + v_weight_decay * ||delta|| / ||h||^2
    Adam(lr=v_lr); the loss is checked before each step (stop when < early_stop_loss);
    no update after the last evaluation; ||delta|| clamped to clamp_norm_factor * ||h||.
    The model's requires_grad flags are restored afterwards.
    """
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)                 # gradients flow to delta only
    try:
        return _optimise_one(model, tokenizer, request, templates, settings)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _optimise_one(model, tokenizer, request: EditRequest, templates: ContextTemplates | tuple[str, ...],
                  settings: TargetSettings) -> ReferenceTarget:
    if isinstance(templates, ContextTemplates):
        templates = tuple(t for group in templates.groups for t in group)
    spec = arch_for(model)
    device = _device(model)
    block = spec.block_name(settings.layer)
    target = encode_target(tokenizer, request.target_new)
    prompts = [encode_subject_prompt(tokenizer, t.replace("{}", request.prompt), request.subject) for t in templates]
    kl_prompt = encode_subject_prompt(tokenizer, settings.kl_prompt, request.subject)
    seqs = [p.ids + target for p in prompts] + [kl_prompt.ids]
    edit_rows = torch.arange(len(seqs), device=device)
    edit_pos = torch.tensor([p.index for p in prompts] + [kl_prompt.index], device=device)
    target_ids = torch.tensor(target, device=device)

    h = _block_output(model, tokenizer, request, settings.layer)                          # (d,)
    with torch.no_grad():
        orig = torch.log_softmax(_forward(model, [kl_prompt.ids], tokenizer)[0, kl_prompt.index].float(), -1)  # (V,)

    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.v_lr)

    def add_delta(out):                                                                   # out: (B, T, d)
        out = out.clone()
        out[edit_rows, edit_pos] = out[edit_rows, edit_pos] + delta.to(out.dtype)
        return out

    loss_value, steps = float("nan"), 0
    for it in range(settings.v_num_grad_steps):
        with edit_output(model, block, add_delta):
            logits = _forward(model, seqs, tokenizer)                                     # (T+1, L, V)
        nlls = []
        for row, p in enumerate(prompts):
            first = len(p.ids) - 1                      # logits here predict target[0]
            logp = torch.log_softmax(logits[row, first:first + len(target)].float(), -1)   # (len(target), V)
            nlls.append(-logp.gather(1, target_ids[:, None]).mean())
        nll = torch.stack(nlls).mean()
        new = torch.log_softmax(logits[len(prompts), kl_prompt.index].float(), -1)        # (V,)
        kl = settings.kl_factor * (new.exp() * (new - orig)).sum()
        wd = settings.v_weight_decay * delta.norm() / h.norm() ** 2
        loss = nll + kl + wd
        loss_value, steps = float(loss.detach()), it + 1
        if loss_value < settings.early_stop_loss or it == settings.v_num_grad_steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = settings.clamp_norm_factor * h.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return ReferenceTarget(z=(h + delta.detach()).cpu(), h=h.cpu(), loss=loss_value, steps=steps)


@torch.no_grad()
def reference_keys(model, tokenizer, requests: list[EditRequest], layer: int,
                   templates: ContextTemplates) -> torch.Tensor:
    """E2 at one layer: W_out's input at the subject's last token; (d_k, n) float32.

    Per request: the mean of the keys within each context type, then the mean of those
    type means (memit `memit/compute_ks.py`). One full-depth forward per request and
    context type (the type's templates padded together), no early stop.
    """
    name = arch_for(model).mlp_out_name(layer)
    keys = []
    for r in requests:
        type_means = []
        for group in templates.groups:
            prompts = [encode_subject_prompt(tokenizer, t.replace("{}", r.prompt), r.subject) for t in group]
            with capture_inputs(model, [name]) as store:
                _forward(model, [p.ids for p in prompts], tokenizer)
            k = torch.stack([store[name][i, p.index] for i, p in enumerate(prompts)]).float()   # (|group|, d_k)
            type_means.append(k.mean(0))
        keys.append(torch.stack(type_means).mean(0))
    return torch.stack(keys, 1).cpu()                                                     # (d_k, n)


def reference_memit(lm, cfg, requests: list[EditRequest], C: dict[int, torch.Tensor]) -> ReferenceEdit:
    """E4 for one batch, the slow way; the model is left as it was (edits are undone at the end).

    `cfg` is a `MemitConfig`; `C` maps each edited layer to its (d_k, d_k) second moment (E1).
    """
    def solve(layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        A = cfg.mom2_update_weight * C[layer].double() + K @ K.T                         # (d_k, d_k), symmetric
        return torch.linalg.solve(A, K @ R.T).T                                          # (d, d_k) = R K^T A^-1

    return _reference_edit(lm, cfg, requests, solve)


def reference_alphaedit(lm, cfg, requests: list[EditRequest], P: dict[int, torch.Tensor],
                        C_p: dict[int, torch.Tensor] | None = None, *,
                        templates: ContextTemplates | None = None) -> ReferenceEdit:
    """E5 for one batch, the slow way, as the paper writes it (explicit inverse, float64):
    Delta = R K^T P ((K K^T + C_p) P + L2 I)^-1. `P` maps each layer to its null-space projector,
    `C_p` to the K_p K_p^T of earlier batches (zero if omitted). `templates` default to those
    sampled from the model as it is now (a sequential run keeps the ones of its first batch).
    The model is left as it was.
    """
    def solve(layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        P_l = P[layer].double()
        Cp = torch.zeros_like(P_l) if C_p is None else C_p[layer].double()
        eye = torch.eye(K.shape[0], dtype=torch.float64)
        return R @ K.T @ P_l @ torch.linalg.inv((K @ K.T + Cp) @ P_l + cfg.L2 * eye)   # (d, d_k)

    return _reference_edit(lm, cfg, requests, solve, templates)


def _reference_edit(lm, cfg, requests: list[EditRequest], solve,
                    templates: ContextTemplates | None = None) -> ReferenceEdit:
    """E2-E3 plus the layer loop of E4/E5 (R spread over the remaining layers), one layer's delta
    from `solve(layer, K (d_k, n) float64, R (d, n) float64)`; every edit is undone at the end."""
    model, tok = lm.model, lm.tokenizer
    spec = arch_for(model)
    layers = check_layers(model, list(cfg.layers))
    top = layers[-1]
    if templates is None:
        templates = context_templates(model, tok, n=cfg.n_context_templates, length=cfg.context_length,
                                      seed=cfg.seed)
    settings = TargetSettings(layer=top, v_lr=cfg.v_lr, v_num_grad_steps=cfg.v_num_grad_steps,
                              kl_factor=cfg.kl_factor, v_weight_decay=cfg.v_weight_decay,
                              clamp_norm_factor=cfg.clamp_norm_factor, early_stop_loss=cfg.early_stop_loss)
    targets = tuple(reference_targets(model, tok, r, templates, settings) for r in requests)
    z = torch.stack([t.z for t in targets], 1).double()                                  # (d, n)
    originals = {l: get_module(model, spec.mlp_out_name(l)).weight.detach().clone() for l in layers}
    deltas = {}
    try:
        for j, layer in enumerate(layers):
            K = reference_keys(model, tok, requests, layer, templates).double()          # (d_k, n)
            h_now = reference_block_outputs(model, tok, requests, top).double()          # (d, n)
            R = (z - h_now) / (len(layers) - j)                                          # (d, n)
            delta = solve(layer, K.cpu(), R.cpu())                                       # (d, d_k)
            deltas[layer] = delta
            w = get_module(model, spec.mlp_out_name(layer)).weight
            with torch.no_grad():
                w.add_(as_out_in(delta, spec).to(device=w.device, dtype=w.dtype))
    finally:
        with torch.no_grad():
            for l, w0 in originals.items():
                get_module(model, spec.mlp_out_name(l)).weight.copy_(w0)
    return ReferenceEdit(deltas=deltas, targets=targets, templates=templates)


@torch.no_grad()
def reference_second_moments(lm, layer: int, chunks: list[list[int]], *, batch_size: int = 16,
                             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """E1 for one layer: full-depth forward passes (logits included) over `chunks`, padding masked.

    Returns (C_l (d_k, d_k) on the CPU, N tokens). A straightforward pass per layer, to time
    and check `stats.accumulate_second_moments` (one pass for all layers, cut short) against.
    """
    model = lm.model
    name = arch_for(model).mlp_out_name(layer)
    total, n = None, 0
    for start in range(0, len(chunks), batch_size):
        batch = pad_batch(chunks[start:start + batch_size], pad_id(lm.tokenizer), "right").to(_device(model))
        with capture_inputs(model, [name]) as store:
            model(**batch.model_inputs(), use_cache=False)
        k = store[name][batch.attention_mask.bool()].to(dtype)                            # (n_b, d_k)
        total = k.T @ k if total is None else total + k.T @ k
        n += k.shape[0]
    return (total / n).cpu(), n


__all__ = ["ReferenceEdit", "ReferenceTarget", "reference_alphaedit", "reference_block_outputs", "reference_keys",
           "reference_memit", "reference_second_moments", "reference_targets"]
