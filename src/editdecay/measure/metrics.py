"""Edit metrics (docs/METHODS.md E6), computed in padded batches.

Everything reduces to one primitive, `core.scoring.score_continuations`: for (prompt, target)
pairs, the teacher-forced mean NLL of the target tokens and, per target token,
whether it is the argmax. CounterFact-style scores compare NLLs of the new and
true targets; zsRE-style scores are token accuracies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import mean
from typing import Iterable, Sequence

from editdecay.core.request import EditRequest
from editdecay.core.scoring import ContinuationScore, score_continuations


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
    model, tokenizer, requests: Sequence[EditRequest], *, batch_size: int | None = None,
    padding_side: str = "right", progress: bool = False,
) -> list[RequestOutcome]:
    """Per-request E6 outcomes; all prompts of all requests go through one batched scorer.

    `batch_size`: (prompt, target) pairs per forward pass; None: from the device's free memory (32 on the
    CPU), so device memory does not grow with the number of requests (core.memory).
    """
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
