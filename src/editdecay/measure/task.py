"""Exact-match scoring of instruction tasks (the embedded task's held-out split).

Scoring is token-level exact match under greedy decoding, computed with one
teacher-forced pass: the reference tokens (response + end token) are the argmax
at every position. If they are, greedy decoding reproduces exactly that response
and stops; if one is not, greedy decoding leaves the reference at that token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from editdecay.core.forward import logits_at
from editdecay.core.tokens import pad_batch, pad_id
from editdecay.data.prompts import InstructionRecord, render_prompt


@dataclass(frozen=True)
class TaskScore:
    accuracy: float          # exact match: response tokens and the end token are all greedy choices
    prefix_accuracy: float   # the response tokens are greedy choices (the model may not stop after them)
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def exact_match(model, tokenizer, records: Sequence[InstructionRecord], *, template: str = "compact",
                batch_size: int = 32) -> TaskScore:
    """Greedy exact-match accuracy of `records`, by one teacher-forced pass per batch (see module docstring).

    Uses the same prompt rendering and response tokenisation as training (`data.render_prompt`), so what is
    scored is exactly what was trained. Padding is on the right; positions are implicit (0..T-1 per row).
    """
    eos = tokenizer.eos_token_id
    seqs = []
    for r in records:
        p = tokenizer.encode(render_prompt(r, template), add_special_tokens=True)
        t = tokenizer.encode(r.output, add_special_tokens=False) + ([eos] if eos is not None else [])
        seqs.append((p, t))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = prefix_hits = 0
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            batch = pad_batch([p + t for p, t in chunk], pad_id(tokenizer), "right").to(device)
            select = torch.zeros_like(batch.input_ids, dtype=torch.bool)    # (B, T) positions predicting t
            for row, (p, t) in enumerate(chunk):
                select[row, len(p) - 1:len(p) - 1 + len(t)] = True
            pred = logits_at(model, batch.input_ids, batch.attention_mask, select).argmax(-1).cpu()  # (N,)
            i = 0
            for p, t in chunk:
                ok = pred[i:i + len(t)] == torch.tensor(t)
                i += len(t)
                n_resp = len(t) - (1 if eos is not None else 0)
                prefix_hits += bool(ok[:n_resp].all())
                hits += bool(ok.all())
    finally:
        model.train(was_training)
    n = len(seqs)
    return TaskScore(hits / n if n else 0.0, prefix_hits / n if n else 0.0, n)
