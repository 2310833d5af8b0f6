"""Keys of the requests and block outputs at the subject's last token (docs/METHODS.md E2, E4).

One forward pass collects every requested layer at once and stops after the last
one that is needed.
"""

from __future__ import annotations

import torch

from editdecay.core.arch import arch_for, resolve_name
from editdecay.core.devices import input_device
from editdecay.core.hooks import (
    StopForward,
    capture_inputs,
    capture_output,
    run_until_stop,
)
from editdecay.core.memory import ModelShape, plan_batch_size, run_batched
from editdecay.core.request import EditRequest
from editdecay.core.tokens import encode_subject_prompt, pad_batch, pad_id
from editdecay.edit.context import ContextTemplates, mean_over_context_types

KEYS_CPU_ROWS = 64        # prompts per forward pass on the CPU (memory-aware on CUDA: `_rows_per_batch`)


def _subject_batch(tokenizer, requests: list[EditRequest], templates: tuple[str, ...], device):
    prompts = [encode_subject_prompt(tokenizer, t.replace("{}", r.prompt), r.subject)
               for r in requests for t in templates]                     # request-major order
    batch = pad_batch([p.ids for p in prompts], pad_id(tokenizer), "right").to(device)
    idx = torch.tensor([p.index for p in prompts], device=device)
    return batch, idx


def _rows_per_batch(stage: str, model, tokenizer, requests, templates, n_captured: int, explicit: int | None):
    """Prompts per forward pass: `explicit`, else from free memory (CUDA) or KEYS_CPU_ROWS; and the bytes one
    prompt is estimated to cost (activations of a truncated no-grad forward plus the captured inputs)."""
    shape = ModelShape.of(model)
    longest = max((len(encode_subject_prompt(tokenizer, t.replace("{}", r.prompt), r.subject).ids)
                   for r in requests[:256] for t in templates), default=1)  # a sample bounds the width
    per_row = int(1.5 * longest) * (shape.forward_token_bytes(longest) + n_captured * shape.d_ff * shape.elt)
    rows = plan_batch_size(stage, n_items=len(requests) * len(templates), bytes_per_item=per_row,
                           device=input_device(model), explicit=explicit, cpu_default=KEYS_CPU_ROWS)
    return rows, per_row


@torch.no_grad()
def compute_keys(model, tokenizer, requests: list[EditRequest], layers: list[int], templates: ContextTemplates,
                 *, batch_size: int | None = None) -> dict[int, torch.Tensor]:
    """E2: k_i at each layer = input of W_out at the subject's last token, averaged over the templates
    two-level: within each context type, then over the type means (`mean_over_context_types`,
    after memit `memit/compute_ks.py` `compute_ks`).

    `batch_size`: prompts (requests x templates) per forward pass; None: from the device's free memory
    (64 on the CPU). An out-of-memory batch is redone at half the size (core.memory.run_batched).
    Returns {layer: (d_k, n) float32 on the CPU} (host bookkeeping: device memory does not grow with n).
    """
    if not isinstance(templates, ContextTemplates):
        raise TypeError("compute_keys: templates must be a ContextTemplates (grouped by context type, E2), "
                        f"got {type(templates).__name__}")
    flat = templates.flat
    spec = arch_for(model)
    names = {l: resolve_name(model, spec.mlp_out_name(l)) for l in layers}
    device = input_device(model)
    T = len(flat)
    rows, per_row = _rows_per_batch("E2 keys", model, tokenizer, requests, flat, len(names), batch_size)

    def one(part: list[EditRequest]) -> dict[int, torch.Tensor]:
        batch, idx = _subject_batch(tokenizer, part, flat, device)
        with capture_inputs(model, list(names.values()), stop_after=names[max(layers)]) as store:
            run_until_stop(model, **batch.model_inputs())
        out = {}
        for l, name in names.items():
            x = store[name]                                                    # on the device of W_out(l)
            k = x[torch.arange(len(idx), device=x.device), idx.to(x.device)].float()   # (len(part)*T, d_k)
            out[l] = mean_over_context_types(k.view(len(part), T, -1), templates).cpu()  # (len(part), d_k)
        return out

    chunks = run_batched("E2 keys", requests, one, batch_size=max(1, rows // T), bytes_per_item=T * per_row,
                         device=device)
    return {l: torch.cat([c[l] for c in chunks]).T.contiguous() for l in layers}


@torch.no_grad()
def block_outputs_at_subject(model, tokenizer, requests: list[EditRequest], layer: int,
                             *, batch_size: int | None = None) -> torch.Tensor:
    """Output of block `layer` at the subject's last token of the bare prompt: (d, n) float32 on the CPU.

    `batch_size`: prompts per forward pass; None: from the device's free memory (64 on the CPU).
    """
    spec = arch_for(model)
    device = input_device(model)
    rows, per_row = _rows_per_batch("E2 block outputs", model, tokenizer, requests, ("{}",), 0, batch_size)

    def one(part: list[EditRequest]) -> torch.Tensor:
        batch, idx = _subject_batch(tokenizer, part, ("{}",), device)
        with capture_output(model, spec.block_name(layer)) as store, \
                capture_inputs(model, [], stop_after=spec.block_name(layer)):
            run_until_stop(model, **batch.model_inputs())
        h = store["out"]                                                       # on the device of block `layer`
        return h[torch.arange(len(idx), device=h.device), idx.to(h.device)].float().cpu()

    outs = run_batched("E2 block outputs", requests, one, batch_size=rows, bytes_per_item=per_row, device=device)
    return torch.cat(outs).T.contiguous()


__all__ = ["compute_keys", "block_outputs_at_subject", "StopForward"]
