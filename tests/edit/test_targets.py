"""E2 keys and E3 target values: the fast batched code against `editdecay.reference`.

The fast path (`targets.compute_targets`) optimises many requests in one batch on
top of a KV cache of the prompt prefixes; the reference optimises one request at a
time with full-sequence forwards. They must follow the same trajectory: same z
(up to float32 round-off) and the same number of steps per request.
"""

from __future__ import annotations

from dataclasses import replace
from statistics import mean

import pytest
import torch
from support.models import FAMILIES, make_tiny
from reference import reference_block_outputs, reference_keys, reference_targets

from editdecay.core.arch import arch_for, unembed_module
from editdecay.core.request import EditRequest
from editdecay.edit.context import (
    ContextTemplates,
    context_templates,
    mean_over_context_types,
)
from editdecay.edit.keys import block_outputs_at_subject, compute_keys
from editdecay.edit.targets import TargetSettings, compute_targets

torch.set_num_threads(1)

# Prompts of different lengths, single- and multi-token subjects and targets: the batch is ragged.
# "Paris" opens its prompt as one token, so its rows have an empty prefix (nothing to cache).
REQUESTS = [
    EditRequest("capital", "The capital of {} is", "France", "Rome", "Paris"),
    EditRequest("sport", "{} plays the sport of", "Lionel Messi", "basketball player", "football"),
    EditRequest("currency", "The official currency of {} is the", "Japan", "euro", "yen"),
    EditRequest("located", "{} is located in", "Paris", "Italy", "France"),
]


def _delta(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (z - h).double()


def _compare(fast, refs, min_cos: float) -> None:
    for i, ref in enumerate(refs):
        torch.testing.assert_close(fast.h[i], ref.h, rtol=1e-5, atol=1e-5)
        d_fast, d_ref = _delta(fast.z[i], fast.h[i]), _delta(ref.z, ref.h)
        assert d_ref.norm() > 0, f"request {i}: the reference did not move delta at all"
        cos = float(torch.nn.functional.cosine_similarity(d_fast, d_ref, dim=0))
        assert cos > min_cos, f"request {i} ({REQUESTS[i].case_id}): cosine {cos:.6f} of fast vs reference delta"
        rel = float((d_fast.norm() - d_ref.norm()).abs() / d_ref.norm())
        assert rel < 1e-2, f"request {i}: delta norms differ by {rel:.2e} (relative)"


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_targets_match_reference_tiny(family, tokenizer):
    """All three loss terms and the clamp matter; every request runs all steps.

    On a random model the KL term barely moves delta at the study's weight (0.0625), so it is
    raised here until leaving it out would drop the cosine far below the threshold; the clamp
    is tightened until it binds.
    """
    lm = make_tiny(family, tokenizer)
    templates = context_templates(lm.model, tokenizer, n=2, length=4, seed=0)
    settings = TargetSettings(layer=2, v_num_grad_steps=6, clamp_norm_factor=0.1, kl_factor=4.0)
    fast = compute_targets(lm.model, tokenizer, REQUESTS, templates, settings, progress=False)
    refs = [reference_targets(lm.model, tokenizer, r, templates, settings) for r in REQUESTS]
    assert fast.z.shape == fast.h.shape == (len(REQUESTS), lm.model.config.hidden_size)
    _compare(fast, refs, min_cos=0.9999)
    assert fast.steps == [r.steps for r in refs]
    assert fast.loss == pytest.approx([r.loss for r in refs], rel=1e-4)
    # The clamp is exercised: some delta sits on the sphere ||delta|| = clamp_norm_factor * ||h||.
    ratios = [float((r.z - r.h).norm() / r.h.norm()) for r in refs]
    assert any(abs(x - settings.clamp_norm_factor) < 1e-4 for x in ratios), ratios


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_targets_early_stop_per_request(family, tokenizer):
    """A request that reaches the early-stop loss stops (its delta frozen) while the others go on."""
    lm = make_tiny(family, tokenizer)
    templates = ("{}", "Here is a fact. {}")
    base = TargetSettings(layer=2, v_lr=0.2, v_weight_decay=0.0, clamp_norm_factor=4.0, v_num_grad_steps=8)
    # Threshold between the requests' initial losses: some stop at once, some later or never.
    first = [reference_targets(lm.model, tokenizer, r, templates, replace(base, v_num_grad_steps=1)).loss
             for r in REQUESTS]
    settings = replace(base, early_stop_loss=mean(first))
    fast = compute_targets(lm.model, tokenizer, REQUESTS, templates, settings, progress=False)
    refs = [reference_targets(lm.model, tokenizer, r, templates, settings) for r in REQUESTS]
    steps = [r.steps for r in refs]
    # Some request froze while another was still being updated.
    assert len(set(steps)) > 1 and max(steps) > 1, f"test needs mixed stopping, got steps {steps}"
    assert fast.steps == steps
    for i, ref in enumerate(refs):
        torch.testing.assert_close(fast.h[i], ref.h, rtol=1e-5, atol=1e-5)
        if ref.steps == 1:                     # stopped before any update: delta stays exactly zero
            assert torch.equal(fast.z[i], fast.h[i]) and torch.equal(ref.z, ref.h)
            continue
        d_fast, d_ref = _delta(fast.z[i], fast.h[i]), _delta(ref.z, ref.h)
        cos = float(torch.nn.functional.cosine_similarity(d_fast, d_ref, dim=0))
        assert cos > 0.999, f"request {i} ({REQUESTS[i].case_id}): cosine {cos:.6f} of fast vs reference delta"


@pytest.mark.slow
def test_batched_targets_match_one_at_a_time_on_embedded(embedded):
    """The acceptance check on the real model: batched deltas vs one-at-a-time, cosine > 0.99."""
    model, tok = embedded.model, embedded.tokenizer
    requests = REQUESTS
    templates = context_templates(model, tok, n=2, length=5, seed=0)
    assert len(templates) == 3
    settings = TargetSettings(layer=7, v_num_grad_steps=8)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        start = compute_targets(model, tok, requests, templates, replace(settings, v_num_grad_steps=1),
                                progress=False).loss
        fast = compute_targets(model, tok, requests, templates, settings, progress=False)
        refs = [reference_targets(model, tok, r, templates, settings) for r in requests]
    finally:                                   # the session-wide model: leave its flags as they were
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    assert fast.steps == [r.steps for r in refs]
    for i, ref in enumerate(refs):
        d_fast, d_ref = _delta(fast.z[i], fast.h[i]), _delta(ref.z, ref.h)
        cos = float(torch.nn.functional.cosine_similarity(d_fast, d_ref, dim=0))
        assert cos > 0.99, f"{requests[i].case_id}: cosine {cos:.5f} between batched and one-at-a-time delta"
    # The optimisation does its job on the real model: every request's loss falls well below its start.
    assert all(f < 0.6 * s for f, s in zip(fast.loss, start)), (start, fast.loss)


def test_context_templates_deterministic_per_seed(tokenizer):
    lm = make_tiny("llama", tokenizer)
    a = context_templates(lm.model, tokenizer, n=3, length=5, seed=0)
    b = context_templates(lm.model, tokenizer, n=3, length=5, seed=0)
    c = context_templates(lm.model, tokenizer, n=3, length=5, seed=1)
    assert a == b
    assert a != c
    # Two context types (E2): the bare prompt alone, then the 3 sampled prefixes.
    assert a.groups[0] == c.groups[0] == ("{}",) and a.group_sizes == c.group_sizes == (1, 3)
    assert len(a) == len(c) == 4 and a.flat[0] == "{}"
    for t in a.flat[1:] + c.flat[1:]:
        assert t.count("{}") == 1 and t.endswith(". {}"), t
    assert context_templates(lm.model, tokenizer, n=0) == ContextTemplates.of(["{}"])


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_and_block_outputs_match_reference(family, tokenizer):
    """E2 keys (one early-stopped pass for all layers, padded batches) vs one full-depth pass per layer."""
    lm = make_tiny(family, tokenizer)
    templates = ContextTemplates.of(["{}"], ["A short prefix. {}", "Another, somewhat longer, context prefix here. {}"])
    layers = [1, 3]
    keys = compute_keys(lm.model, tokenizer, REQUESTS, layers, templates, batch_size=5)   # uneven chunks
    for layer in layers:
        ref = reference_keys(lm.model, tokenizer, REQUESTS, layer, templates)
        assert keys[layer].shape == ref.shape == (ref.shape[0], len(REQUESTS))
        torch.testing.assert_close(keys[layer], ref, rtol=1e-5, atol=1e-5)
    # Templates matter: the mean over templates differs from the bare-prompt key.
    bare = reference_keys(lm.model, tokenizer, REQUESTS, 1, ContextTemplates.of(["{}"]))
    assert not torch.allclose(bare, keys[1], atol=1e-3)
    h = block_outputs_at_subject(lm.model, tokenizer, REQUESTS, 2)
    torch.testing.assert_close(h, reference_block_outputs(lm.model, tokenizer, REQUESTS, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_arch_unembedding_is_the_output_embedding(family, tokenizer):
    """E3 reads targets out through the unembedding named in arch.py; it must be the model's output embedding."""
    import transformers

    lm = make_tiny(family, tokenizer)
    spec = arch_for(lm.model)
    assert unembed_module(lm.model) is lm.model.get_output_embeddings(), (
        f"editdecay/core/arch.py: family {spec.family!r} unembed {spec.unembed!r} does not resolve to the output "
        f"embedding of {type(lm.model).__name__} (transformers {transformers.__version__})")


# --------------------------------------------------------------------------- E2: the two-level key average

def test_e2_weights_hand_worked():
    """Two context types, known keys: type means, then their mean (memit compute_ks.py), not a flat mean.

    Request 0, d_k = 2. Type 1 (bare): (6, 0). Type 2 (three prefixes): (0, 0), (3, 3), (0, 6),
    whose mean is (1, 3). E2 key = ((6, 0) + (1, 3)) / 2 = (3.5, 1.5); the flat mean of all four
    would be (2.25, 2.25). Request 1 is request 0 doubled (the average is linear).
    """
    templates = ContextTemplates.of(["{}"], ["A. {}", "B. {}", "C. {}"])
    assert templates.flat == ("{}", "A. {}", "B. {}", "C. {}")
    assert templates.key_weights == (0.5, 1 / 6, 1 / 6, 1 / 6)
    k0 = torch.tensor([[6.0, 0.0], [0.0, 0.0], [3.0, 3.0], [0.0, 6.0]])        # (T=4, d_k=2)
    k = torch.stack([k0, 2 * k0])                                                 # (n=2, T, d_k)
    got = mean_over_context_types(k, templates)
    torch.testing.assert_close(got, torch.tensor([[3.5, 1.5], [7.0, 3.0]]), rtol=0, atol=1e-6)
    # The recorded weights give the same average.
    w = torch.tensor(templates.key_weights)
    torch.testing.assert_close((k * w[None, :, None]).sum(1), got, rtol=0, atol=1e-6)
    # With the bare prompt and 5 prefixes (the default): 1/2 and 1/10 each.
    five = ContextTemplates.of(["{}"], [f"P{i}. {{}}" for i in range(5)])
    assert five.key_weights == (0.5, 0.1, 0.1, 0.1, 0.1, 0.1) and abs(sum(five.key_weights) - 1) < 1e-12
    record = five.to_dict()
    assert record["groups"] == [["{}"], [f"P{i}. {{}}" for i in range(5)]] and record["key_weights"][0] == 0.5


@pytest.mark.parametrize("bad", [(), (("{}",), ()), (("no slot",),), (("{} and {}",),)])
def test_context_templates_reject_bad_groups(bad):
    from editdecay.core.errors import ConfigError

    with pytest.raises(ConfigError, match="context t"):
        ContextTemplates(bad)


def _weights_from_single_template_keys(model, tok, templates: ContextTemplates, layer: int):
    """(E2 key, keys of each template on its own) at `layer`, for REQUESTS."""
    keys = compute_keys(model, tok, REQUESTS, [layer], templates)[layer]                       # (d_k, n)
    singles = [compute_keys(model, tok, REQUESTS, [layer], ContextTemplates.of([t]))[layer] for t in templates.flat]
    return keys, torch.stack(singles)                                                           # (T, d_k, n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_e2_weights_on_tiny_models(family, tokenizer):
    """The fast keys are 1/2 * bare key + 1/10 * each prefixed key (5 sampled prefixes), not the flat mean."""
    lm = make_tiny(family, tokenizer)
    templates = context_templates(lm.model, tokenizer, n=5, length=4, seed=0)
    assert templates.group_sizes == (1, 5)
    keys, singles = _weights_from_single_template_keys(lm.model, tokenizer, templates, 1)
    expected = 0.5 * singles[0] + 0.1 * singles[1:].sum(0)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-5)
    flat = singles.mean(0)
    assert float((keys - flat).norm()) > 1e-2 * float(keys.norm()), "flat and two-level means must differ here"


@pytest.mark.slow
def test_e2_weights_on_embedded(embedded):
    """The same on the real model with its default templates (bare prompt + 5 prefixes of 10 tokens)."""
    model, tok = embedded.model, embedded.tokenizer
    templates = context_templates(model, tok, n=5, length=10, seed=0)
    assert templates.key_weights == (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
    keys, singles = _weights_from_single_template_keys(model, tok, templates, 5)
    torch.testing.assert_close(keys, 0.5 * singles[0] + 0.1 * singles[1:].sum(0), rtol=1e-4, atol=1e-4)
    flat = singles.mean(0)
    assert float((keys - flat).norm()) > 1e-2 * float(keys.norm()), "flat and two-level means must differ here"
