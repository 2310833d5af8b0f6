"""E6 metrics: batching and padding never change the numbers; outcomes follow the definitions."""

from __future__ import annotations

import math

import pytest
import torch
from support.models import make_tiny
from transformers import AutoTokenizer

from editdecay.core.request import EditRequest
from editdecay.core.tokens import encode_prompt, encode_target
from editdecay.measure.metrics import (
    RequestOutcome,
    aggregate,
    evaluate_requests,
    score_continuations,
)

CF = EditRequest(
    case_id="cf-1", prompt="The capital of {} is", subject="France", target_new="Tokyo", target_true="Paris",
    paraphrase_prompts=("France's capital city is", "In France, the government sits in"),
    neighborhood_prompts=("The capital of Japan is", "The capital of Italy is"),
    neighborhood_answers=("Tokyo", "Rome"), metric_style="counterfact",
)
ZS = EditRequest(
    case_id="zs-1", prompt="What university did {} attend?", subject="Watts Humphrey",
    target_new="Illinois Institute of Technology", target_true="Trinity College",
    paraphrase_prompts=("What university did Watts Humphrey take part in?",),
    neighborhood_prompts=("nq question: who played desmond doss father in hacksaw ridge",),
    neighborhood_answers=("Hugo Weaving",), metric_style="zsre",
)
REQUESTS = [CF, ZS, EditRequest(case_id="cf-2", prompt="{} speaks", subject="Ada", target_new="French",
                                target_true="English", paraphrase_prompts=("The language of Ada is",),
                                neighborhood_prompts=("Bob speaks",), neighborhood_answers=("English",))]


def reference_nll(model, tok, prompt, target):
    """Unbatched, unpadded: one forward over prompt+target."""
    p, t = encode_prompt(tok, prompt), encode_target(tok, target)
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logits = model(ids).logits[0]
    lp = torch.log_softmax(logits[len(p) - 1:len(p) + len(t) - 1], -1)
    return -lp[torch.arange(len(t)), torch.tensor(t)].mean().item()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_one_at_a_time(tiny, side):
    pairs = [(CF.rewrite_prompt, "Tokyo"), (CF.rewrite_prompt, "Paris"), (ZS.rewrite_prompt, ZS.target_new),
             ("A", "much longer target string here"), (ZS.neighborhood_prompts[0], "Hugo Weaving")]
    batched = score_continuations(tiny.model, tiny.tokenizer, pairs, batch_size=8, padding_side=side)
    for pair, s in zip(pairs, batched):
        single = score_continuations(tiny.model, tiny.tokenizer, [pair], batch_size=1)[0]
        assert abs(s.nll - single.nll) < 1e-5
        assert s.correct == single.correct
        assert abs(s.nll - reference_nll(tiny.model, tiny.tokenizer, *pair)) < 1e-5


@pytest.mark.slow
def test_outcomes_batched_equal_single_with_and_without_bos(embedded):
    for add_bos in (False, True):
        tok = AutoTokenizer.from_pretrained(embedded.identity.source, add_bos_token=add_bos)
        assert (tok.encode("The cat")[0] == tok.bos_token_id) == add_bos
        lm = make_tiny("llama", tok, seed=3)
        batched = evaluate_requests(lm.model, tok, REQUESTS, batch_size=16, padding_side="left")
        single = [evaluate_requests(lm.model, tok, [r], batch_size=1)[0] for r in REQUESTS]
        for b, s in zip(batched, single):
            for field in ("efficacy", "paraphrase", "neighborhood", "efficacy_magnitude", "margin"):
                x, y = getattr(b, field), getattr(s, field)
                assert (x is None and y is None) or abs(x - y) < 1e-5, field


def test_counterfact_outcome_follows_definition(tiny):
    out = evaluate_requests(tiny.model, tiny.tokenizer, [CF])[0]
    nll = lambda p, t: reference_nll(tiny.model, tiny.tokenizer, p, t)  # noqa: E731
    new, true = nll(CF.rewrite_prompt, "Tokyo"), nll(CF.rewrite_prompt, "Paris")
    assert out.efficacy == float(new < true)
    assert out.margin == pytest.approx(true - new, abs=1e-5)
    assert out.efficacy_magnitude == pytest.approx(math.exp(-new) - math.exp(-true), abs=1e-5)
    para = [float(nll(p, "Tokyo") < nll(p, "Paris")) for p in CF.paraphrase_prompts]
    assert out.paraphrase == pytest.approx(sum(para) / 2)
    neigh = [float(nll(p, a) < nll(p, "Tokyo")) for p, a in zip(CF.neighborhood_prompts, CF.neighborhood_answers)]
    assert out.neighborhood == pytest.approx(sum(neigh) / 2)
    assert (out.n_paraphrase, out.n_neighborhood) == (2, 2)


def test_zsre_outcome_is_token_accuracy(tiny):
    out = evaluate_requests(tiny.model, tiny.tokenizer, [ZS])[0]
    tok, model = tiny.tokenizer, tiny.model
    p, t = encode_prompt(tok, ZS.rewrite_prompt), encode_target(tok, ZS.target_new)
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0]
    hits = (logits[len(p) - 1:len(p) + len(t) - 1].argmax(-1) == torch.tensor(t)).float().mean().item()
    assert out.style == "zsre"
    assert out.efficacy == pytest.approx(hits)
    assert out.efficacy_magnitude is None


@pytest.mark.slow
def test_real_model_knows_a_fact(embedded):
    """The embedded model prefers the true capital: efficacy of a counterfactual edit is 0 before editing."""
    out = evaluate_requests(embedded.model, embedded.tokenizer, [CF])[0]
    assert out.efficacy == 0.0 and out.margin < 0
    s = score_continuations(embedded.model, embedded.tokenizer, [("The capital of France is", "Paris")])[0]
    assert s.all_correct


def test_aggregate_means_and_harmonic_mean():
    o = lambda es, ps, ns: RequestOutcome("x", "counterfact", es, ps, ns, es, ps, ns)  # noqa: E731
    agg = aggregate([o(1.0, 0.5, 1.0), o(0.0, 1.0, 0.5)])
    assert agg["n"] == 2
    assert agg["efficacy"] == 0.5 and agg["paraphrase"] == 0.75 and agg["neighborhood"] == 0.75
    assert agg["harmonic_mean"] == pytest.approx(3 / (1 / 0.5 + 2 / 0.75))
    assert aggregate([o(0.0, 1.0, 1.0)])["harmonic_mean"] == 0.0


def test_empty_target_is_rejected(tokenizer):
    from editdecay.core.errors import DataError

    with pytest.raises(DataError, match="tokenizes to nothing"):
        encode_target(tokenizer, "   ")
