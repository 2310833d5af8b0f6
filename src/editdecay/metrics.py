"""Edit metrics (ALGORITHMS.md E6), computed in padded batches.

Everything reduces to one primitive, `score_continuations`: for (prompt, target)
pairs, the teacher-forced mean NLL of the target tokens and, per target token,
whether it is the argmax. CounterFact-style scores compare NLLs of the new and
true targets; zsRE-style scores are token accuracies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import mean
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .arch import unembed_module
from .request import EditRequest
from .tokens import encode_prompt, encode_target, pad_batch, pad_id


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
    model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32,
    padding_side: str = "right", progress: bool = False,
) -> list[ContinuationScore]:
    """Teacher-forced scores of `target` after `prompt` for every pair.

    Pairs are de-duplicated and sorted by length so batches waste little padding;
    results come back in input order. Positions are explicit, so the padding side
    does not change the numbers.
    """
    unique = list(dict.fromkeys(pairs))
    encoded = {}
    for prompt, target in unique:
        p, t = encode_prompt(tokenizer, prompt), encode_target(tokenizer, target)
        encoded[(prompt, target)] = (p, t)
    order = sorted(unique, key=lambda k: len(encoded[k][0]) + len(encoded[k][1]))
    if hasattr(model, "get_base_model"):       # a peft model: its adapters live inside the base model
        model = model.get_base_model()
    device = next(model.parameters()).device
    # Unembed only the scored positions: the full (B, T, V) logits would cost ~20% of the
    # forward pass of a small model for nothing.
    unembed = unembed_module(model)
    results: dict[tuple[str, str], ContinuationScore] = {}
    steps = range(0, len(order), batch_size)
    for start in tqdm(steps, desc="scoring", disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
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
        lp = torch.log_softmax(unembed(hidden[rows, cols]).float(), dim=-1)       # (G, V)
        tgt = torch.tensor(toks, device=device)
        tok_nll = (-lp.gather(1, tgt[:, None]).squeeze(1)).tolist()
        hit = (lp.argmax(-1) == tgt).tolist()
        i = 0
        for row, key in enumerate(chunk):
            n = len(encoded[key][1])
            results[key] = ContinuationScore(sum(tok_nll[i:i + n]) / n, tuple(bool(x) for x in hit[i:i + n]))
            i += n
    return [results[k] for k in pairs]


@dataclass(frozen=True)
class RequestOutcome:
    """E6 scores of one request under one model. Success values are in [0, 1]."""

    case_id: str
    style: str
    efficacy: float
    paraphrase: float | None
    neighborhood: float | None
    efficacy_acc: float           # argmax variants: every target token is the argmax
    paraphrase_acc: float | None
    neighborhood_acc: float | None
    efficacy_magnitude: float | None = None     # exp(-NLL(new)) - exp(-NLL(true)), CounterFact style
    paraphrase_magnitude: float | None = None
    neighborhood_magnitude: float | None = None  # exp(-NLL(true)) - exp(-NLL(new))
    margin: float | None = None   # NLL(true) - NLL(new) on the rewrite prompt (> 0: new preferred)
    n_paraphrase: int = 0
    n_neighborhood: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _pairs_for(r: EditRequest) -> list[tuple[str, str]]:
    """Every (prompt, target) pair request `r` needs, in a fixed order (see `_outcome`)."""
    out = [(r.rewrite_prompt, r.target_new)]
    if r.target_true:
        out.append((r.rewrite_prompt, r.target_true))
    for p in r.paraphrase_prompts:
        out.append((p, r.target_new))
        if r.metric_style == "counterfact" and r.target_true:
            out.append((p, r.target_true))
    for p, a in zip(r.neighborhood_prompts, r.neighborhood_answers):
        out.append((p, a))
        if r.metric_style == "counterfact":
            out.append((p, r.target_new))
    return out


def _outcome(r: EditRequest, s: list[ContinuationScore]) -> RequestOutcome:
    it = iter(s)
    new = next(it)
    true = next(it) if r.target_true else None
    cf = r.metric_style == "counterfact" and true is not None
    para = []
    for _ in r.paraphrase_prompts:
        para.append((next(it), next(it) if cf else None))
    neigh = []
    for _ in r.neighborhood_prompts:
        a = next(it)
        neigh.append((a, next(it) if r.metric_style == "counterfact" else None))

    def avg(xs):
        return mean(xs) if xs else None

    p = math.exp
    if cf:
        return RequestOutcome(
            case_id=r.case_id, style="counterfact",
            efficacy=float(new.nll < true.nll),
            paraphrase=avg([float(n.nll < t.nll) for n, t in para]),
            neighborhood=avg([float(a.nll < n.nll) for a, n in neigh]),
            efficacy_acc=float(new.all_correct),
            paraphrase_acc=avg([float(n.all_correct) for n, _ in para]),
            neighborhood_acc=avg([float(a.all_correct) for a, _ in neigh]),
            efficacy_magnitude=p(-new.nll) - p(-true.nll),
            paraphrase_magnitude=avg([p(-n.nll) - p(-t.nll) for n, t in para]),
            neighborhood_magnitude=avg([p(-a.nll) - p(-n.nll) for a, n in neigh]),
            margin=true.nll - new.nll, n_paraphrase=len(para), n_neighborhood=len(neigh),
        )
    return RequestOutcome(
        case_id=r.case_id, style="zsre",
        efficacy=new.token_accuracy,
        paraphrase=avg([n.token_accuracy for n, _ in para]),
        neighborhood=avg([a.token_accuracy for a, _ in neigh]),
        efficacy_acc=float(new.all_correct),
        paraphrase_acc=avg([float(n.all_correct) for n, _ in para]),
        neighborhood_acc=avg([float(a.all_correct) for a, _ in neigh]),
        margin=(true.nll - new.nll) if true is not None else None,
        n_paraphrase=len(para), n_neighborhood=len(neigh),
    )


def evaluate_requests(
    model, tokenizer, requests: Sequence[EditRequest], *, batch_size: int = 32,
    padding_side: str = "right", progress: bool = False,
) -> list[RequestOutcome]:
    """Per-request E6 outcomes; all prompts of all requests go through one batched scorer."""
    per_req = [_pairs_for(r) for r in requests]
    flat = [pair for pairs in per_req for pair in pairs]
    scores = score_continuations(model, tokenizer, flat, batch_size=batch_size,
                                 padding_side=padding_side, progress=progress)
    out, i = [], 0
    for r, pairs in zip(requests, per_req):
        out.append(_outcome(r, scores[i:i + len(pairs)]))
        i += len(pairs)
    return out


def _hmean(xs: Iterable[float]) -> float:
    xs = list(xs)
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def aggregate(outcomes: Sequence[RequestOutcome]) -> dict:
    """Stage-level metrics: means over requests as fractions in [0, 1], with n.

    This is the result contract other tools read: `efficacy`, `paraphrase`,
    `neighborhood`, `n` (+ magnitudes, argmax variants, harmonic mean, prompt counts).
    """
    def m(field):
        vals = [getattr(o, field) for o in outcomes if getattr(o, field) is not None]
        return mean(vals) if vals else None

    agg = {k: m(k) for k in ("efficacy", "paraphrase", "neighborhood", "efficacy_acc", "paraphrase_acc",
                             "neighborhood_acc", "efficacy_magnitude", "paraphrase_magnitude",
                             "neighborhood_magnitude", "margin")}
    agg["n"] = len(outcomes)
    agg["n_paraphrase_prompts"] = sum(o.n_paraphrase for o in outcomes)
    agg["n_neighborhood_prompts"] = sum(o.n_neighborhood for o in outcomes)
    parts = [agg[k] for k in ("efficacy", "paraphrase", "neighborhood") if agg[k] is not None]
    agg["harmonic_mean"] = _hmean(parts) if parts else None
    return agg
