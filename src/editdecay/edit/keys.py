"""Keys of the requests and block outputs at the subject's last token (ALGORITHMS.md E2, E4).

One forward pass collects every requested layer at once and stops after the last
one that is needed.
"""

from __future__ import annotations

import torch

from editdecay.core.arch import arch_for, resolve_name
from editdecay.core.hooks import StopForward, capture_inputs, capture_output, run_until_stop
from editdecay.core.request import EditRequest
from editdecay.core.tokens import encode_subject_prompt, pad_batch, pad_id
from editdecay.edit.context import ContextTemplates, mean_over_context_types


def _subject_batch(tokenizer, requests: list[EditRequest], templates: tuple[str, ...], device):
    prompts = [encode_subject_prompt(tokenizer, t.replace("{}", r.prompt), r.subject)
               for r in requests for t in templates]                     # request-major order
    batch = pad_batch([p.ids for p in prompts], pad_id(tokenizer), "right").to(device)
    idx = torch.tensor([p.index for p in prompts], device=device)
    return batch, idx


@torch.no_grad()
def compute_keys(model, tokenizer, requests: list[EditRequest], layers: list[int], templates: ContextTemplates,
                 *, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """E2: k_i at each layer = input of W_out at the subject's last token, averaged over the templates
    two-level: within each context type, then over the type means (`mean_over_context_types`,
    after memit `memit/compute_ks.py` `compute_ks`).

    Returns {layer: (d_k, n) float32}.
    """
    if not isinstance(templates, ContextTemplates):
        raise TypeError("compute_keys: templates must be a ContextTemplates (grouped by context type, E2), "
                        f"got {type(templates).__name__}")
    flat = templates.flat
    spec = arch_for(model)
    names = {l: resolve_name(model, spec.mlp_out_name(l)) for l in layers}
    device = next(model.parameters()).device
    T = len(flat)
    chunks: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    step = max(1, batch_size // T)
    for start in range(0, len(requests), step):
        part = requests[start:start + step]
        batch, idx = _subject_batch(tokenizer, part, flat, device)
        with capture_inputs(model, list(names.values()), stop_after=names[max(layers)]) as store:
            run_until_stop(model, **batch.model_inputs())
        rows = torch.arange(len(idx), device=device)
        for l, name in names.items():
            k = store[name][rows, idx].float()                                 # (len(part)*T, d_k)
            chunks[l].append(mean_over_context_types(k.view(len(part), T, -1), templates))   # (len(part), d_k)
    return {l: torch.cat(chunks[l]).T.contiguous() for l in layers}


@torch.no_grad()
def block_outputs_at_subject(model, tokenizer, requests: list[EditRequest], layer: int,
                             *, batch_size: int = 64) -> torch.Tensor:
    """Output of block `layer` at the subject's last token of the bare prompt: (d, n) float32."""
    spec = arch_for(model)
    device = next(model.parameters()).device
    outs = []
    for start in range(0, len(requests), batch_size):
        batch, idx = _subject_batch(tokenizer, requests[start:start + batch_size], ("{}",), device)
        with capture_output(model, spec.block_name(layer)) as store, \
                capture_inputs(model, [], stop_after=spec.block_name(layer)):
            run_until_stop(model, **batch.model_inputs())
        outs.append(store["out"][torch.arange(len(idx), device=device), idx].float())
    return torch.cat(outs).T.contiguous()


__all__ = ["compute_keys", "block_outputs_at_subject", "StopForward"]
