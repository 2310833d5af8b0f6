"""Teacher-forced scoring of continuations: the one primitive behind E6 metrics and fact selection.

For (prompt, target) pairs: the mean NLL of the target tokens and, per target token, whether it is
the argmax given the prompt and the previous target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from editdecay.core.arch import unembed_module, unwrap_peft
from editdecay.core.devices import input_device
from editdecay.core.memory import ModelShape, plan_batch_size, run_batched
from editdecay.core.tokens import encode_prompt, encode_target, pad_batch, pad_id

SCORING_CPU_BATCH = 32      # pairs per forward pass on the CPU (memory-aware on CUDA)


@dataclass(frozen=True)
class ContinuationScore:
    nll: float                 # mean per-token negative log-likelihood of the target
    correct: tuple[bool, ...]  # per target token: argmax given prompt + previous target tokens

    @property
    def token_accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def all_correct(self) -> bool:
        return all(self.correct)


@torch.no_grad()
def score_continuations(
    model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int | None = None,
    padding_side: str = "right", progress: bool = False,
) -> list[ContinuationScore]:
    """Teacher-forced scores of `target` after `prompt` for every pair.

    Pairs are de-duplicated and sorted by length so batches waste little padding;
    results come back in input order. Positions are explicit, so the padding side
    does not change the numbers.

    `batch_size`: pairs per forward pass; None: from the device's free memory (SCORING_CPU_BATCH on the
    CPU). An out-of-memory batch is redone at half the size; at one pair, DeviceMemoryError names the stage.
    """
    unique = list(dict.fromkeys(pairs))
    encoded = {}
    for prompt, target in unique:
        p, t = encode_prompt(tokenizer, prompt), encode_target(tokenizer, target)
        encoded[(prompt, target)] = (p, t)
    order = sorted(unique, key=lambda k: len(encoded[k][0]) + len(encoded[k][1]))
    model = unwrap_peft(model)       # a peft model: its adapters live inside the base model
    device = input_device(model)
    # Unembed only the scored positions: the full (B, T, V) logits would cost ~20% of the
    # forward pass of a small model for nothing.
    unembed = unembed_module(model)
    results: dict[tuple[str, str], ContinuationScore] = {}
    shape = ModelShape.of(model)
    longest = max((len(p) + len(t) for p, t in encoded.values()), default=1)
    most = max((len(t) for _, t in encoded.values()), default=1)
    per_pair = longest * shape.forward_token_bytes(longest) + shape.logits_bytes(most)
    size = plan_batch_size("E6 scoring", n_items=len(order), bytes_per_item=per_pair, device=device,
                           explicit=batch_size, cpu_default=SCORING_CPU_BATCH)
    bar = tqdm(total=len(order), desc="scoring", disable=not progress, leave=False)

    def one(chunk) -> None:
        seqs = [encoded[k][0] + encoded[k][1] for k in chunk]
        batch = pad_batch(seqs, pad_id(tokenizer), padding_side).to(device)
        hidden = model.base_model(**batch.model_inputs(), use_cache=False).last_hidden_state  # (B, T, d)
        rows, cols, toks, owner = [], [], [], []
        for row, key in enumerate(chunk):
            p, t = encoded[key]
            # position j predicts token j+1: target tokens are predicted from len(p)-1 .. len(p)+len(t)-2
            first = batch.offsets[row] + len(p) - 1
            rows += [row] * len(t)
            cols += range(first, first + len(t))
            toks += t
            owner += [row] * len(t)
        lp = torch.log_softmax(unembed(hidden[rows, cols]).float(), dim=-1)       # (G, V) on the unembedding's device
        tgt = torch.tensor(toks, device=lp.device)
        tok_nll = (-lp.gather(1, tgt[:, None]).squeeze(1)).tolist()
        hit = (lp.argmax(-1) == tgt).tolist()
        i = 0
        for row, key in enumerate(chunk):
            n = len(encoded[key][1])
            results[key] = ContinuationScore(sum(tok_nll[i:i + n]) / n, tuple(bool(x) for x in hit[i:i + n]))
            i += n
        bar.update(len(chunk))

    try:
        run_batched("E6 scoring", order, one, batch_size=size, bytes_per_item=per_pair, device=device)
    finally:
        bar.close()
    return [results[k] for k in pairs]
