"""Scoring of instruction tasks' held-out splits (the embedded task, the chatterbot corpus).

All scores come from one teacher-forced pass over prompt + reference response + end token:
- `accuracy` (exact match under greedy decoding): the reference tokens are the argmax at every
  position. If they are, greedy decoding reproduces exactly that response and stops; if one is not,
  greedy decoding leaves the reference at that token.
- `prefix_accuracy`: the response tokens are all greedy choices (the model may not stop after them).
- `token_accuracy`: the fraction of all reference tokens (response + end token, pooled over records)
  that are the argmax given the reference before them.
- `nll`: the mean negative log-likelihood of those tokens, in nats per token.

Why more than exact match: the embedded task's answers are one or two tokens, so exact match is the
natural score. Free-text answers written by people (chatterbot: "Oh, no.  It has plenty of RAM.") are
almost never reproduced word for word by any model, before or after fine-tuning, so exact match sits near
0 and cannot show a change; token accuracy moves with every token the model learns to predict and stays
a percentage (comparable across checkpoints and with the edit scores); NLL is the unbounded, smooth
counterpart (the training loss on held-out data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from editdecay.core.devices import input_device
from editdecay.core.forward import logits_at
from editdecay.core.tokens import pad_batch, pad_id
from editdecay.data.prompts import InstructionRecord, render_prompt


@dataclass(frozen=True)
class TaskScore:
    accuracy: float          # exact match: response tokens and the end token are all greedy choices
    prefix_accuracy: float   # the response tokens are greedy choices (the model may not stop after them)
    n: int
    token_accuracy: float | None = None   # greedy-choice fraction of all reference tokens (pooled)
    nll: float | None = None              # mean NLL of the reference tokens, nats per token

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def exact_match(model, tokenizer, records: Sequence[InstructionRecord], *, template: str = "compact",
                batch_size: int = 32) -> TaskScore:
    """Exact match, prefix match, token accuracy and NLL of `records`, by one teacher-forced pass per batch
    (see module docstring).

    Uses the same prompt rendering and response tokenisation as training (`data.render_prompt`), so what is
    scored is exactly what was trained. Padding is on the right; positions are implicit (0..T-1 per row).
    """
    eos = tokenizer.eos_token_id
    seqs = []
    for r in records:
        p = tokenizer.encode(render_prompt(r, template), add_special_tokens=True)
        t = tokenizer.encode(r.output, add_special_tokens=False) + ([eos] if eos is not None else [])
        seqs.append((p, t))
    # Sorted by length so a batch pads little (the sums below do not depend on the order): 1.3x fewer
    # token positions on the embedded study's 94 held-out records at batch 32 (benchmarks/stage_times.py).
    seqs.sort(key=lambda pt: len(pt[0]) + len(pt[1]))
    was_training = model.training
    model.eval()
    device = input_device(model)
    hits = prefix_hits = token_hits = n_tokens = 0
    nll_sum = 0.0
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            batch = pad_batch([p + t for p, t in chunk], pad_id(tokenizer), "right").to(device)
            select = torch.zeros_like(batch.input_ids, dtype=torch.bool)    # (B, T) positions predicting t
            for row, (p, t) in enumerate(chunk):
                select[row, len(p) - 1:len(p) - 1 + len(t)] = True
            logits = logits_at(model, batch.input_ids, batch.attention_mask, select).float()    # (N, V)
            targets = torch.tensor([x for _, t in chunk for x in t], device=logits.device)     # (N,)
            nll_sum += float(-torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum())
            pred = logits.argmax(-1).cpu()                                                     # (N,)
            i = 0
            for p, t in chunk:
                ok = pred[i:i + len(t)] == torch.tensor(t)
                token_hits += int(ok.sum())
                n_tokens += len(t)
                i += len(t)
                n_resp = len(t) - (1 if eos is not None else 0)
                prefix_hits += bool(ok[:n_resp].all())
                hits += bool(ok.all())
    finally:
        model.train(was_training)
    n = len(seqs)
    return TaskScore(hits / n if n else 0.0, prefix_hits / n if n else 0.0, n,
                     token_hits / n_tokens if n_tokens else None, nll_sum / n_tokens if n_tokens else None)
