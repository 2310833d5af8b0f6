"""MEMIT (E4) and AlphaEdit (E5) on tiny random models: what an edit touches, the null-space
property, sequential state, restore/patch invariants, the closed-form solves, and that bad
input fails with a clear error before any heavy work.

Statistics come from a small text file corpus (documents shorter than the tiny GPT-2's 128
positions) and a per-module cache, so each (family, token count) is computed once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.edits import REQUESTS, small_edit_config, write_corpus
from support.models import make_tiny
from reference import reference_alphaedit, reference_keys, reference_memit

import editdecay.edit.api as editing
from editdecay.core.arch import arch_for, arch_for_model_type, as_out_in, resolve_name
from editdecay.core.cache import Cache
from editdecay.core.errors import ConfigError, DataError
from editdecay.core.request import EditRequest
from editdecay.data.corpus import parse_corpus
from editdecay.edit import make_config
from editdecay.edit.registry import editor_names
from editdecay.edit.solve import memit_delta, nullspace_delta
from editdecay.edit.stats import cached_projector, second_moments

torch.set_num_threads(1)

LAYERS = (1, 2)
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    return Cache(tmp_path_factory.mktemp("cache"))


def config(editor: str, corpus: Path, lm=None, **kw):
    fields = dict(layers=LAYERS, v_num_grad_steps=4, n_context_templates=2, context_length=4,
                  stats_corpus=str(corpus), stats_tokens=400)
    return small_edit_config(editor, lm, **{**fields, **kw})


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(model, expected: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, expected[n]), f"parameter {n} changed"


# --------------------------------------------------------------------------- what an edit touches

def logits(model, tokenizer) -> torch.Tensor:
    """Next-token logits (n, V) at the last prompt token of every request: what an edit kept as a module changes."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([tokenizer.encode(r.rewrite_prompt)])).logits[0, -1]
                            for r in REQUESTS])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("editor", editor_names())
def test_edit_touches_only_edited_weights_restores_and_patch_reproduces(editor, family, tokenizer, corpus, cache):
    lm = make_tiny(family, tokenizer)
    spec = arch_for(lm.model)
    mlp = {resolve_name(lm.model, spec.in_block(l, r)) for l in LAYERS for r in spec.mlp}   # MLP modules, edited layers
    before, out_before = params(lm.model), logits(lm.model, tokenizer)
    cfg = config(editor, corpus, lm=lm)
    patch, run = editing.edit_model(lm, editor, cfg, REQUESTS, cache=cache, progress=False)

    # Weight deltas change exactly their weights; module states (GRACE) change no parameter. Either way only
    # MLP modules of the edited layers, and the edit changes the model's predictions.
    assert patch.module_names and set(patch.module_names) <= mlp, (editor, patch.module_names)
    edited = {f"{m}.weight" for m in patch.deltas}
    after, out_after = params(lm.model), logits(lm.model, tokenizer)
    for n in before:
        if n in edited:
            assert not torch.equal(after[n], before[n]), f"{editor}: edited weight {n} did not change"
        else:
            assert torch.equal(after[n], before[n]), f"{editor}: {n} is not an edited weight but changed"
    assert not torch.allclose(out_after, out_before), f"{editor}: the edit changed no prediction"
    assert set(patch.layers) <= set(LAYERS) and patch.editor == editor and len(patch.requests) == len(REQUESTS)

    # The live model equals the patch applied to a fresh copy of the base, bit for bit.
    fresh = make_tiny(family, tokenizer)
    assert_same_params(fresh.model, before)
    patch.apply(fresh.model)
    assert_same_params(fresh.model, after)
    assert torch.equal(logits(fresh.model, tokenizer), out_after)

    # restore() puts the originals back exactly.
    run.restore()
    assert_same_params(lm.model, before)
    assert torch.equal(logits(lm.model, tokenizer), out_before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_alphaedit_update_lies_in_null_space(family, tokenizer, corpus, cache):
    """E5: Delta (I - P) = 0 on every edited layer, with P the cached projector of C_l."""
    lm = make_tiny(family, tokenizer)
    spec = arch_for(lm.model)
    cfg = config("alphaedit", corpus)
    patch, run = editing.edit_model(lm, "alphaedit", cfg, REQUESTS, cache=cache, progress=False)
    run.restore()
    stats = second_moments(lm, LAYERS, corpus=parse_corpus(cfg.stats_corpus), n_tokens=cfg.stats_tokens,
                           cache=cache, progress=False)
    for layer in LAYERS:
        P = cached_projector(stats, layer, cfg.nullspace_threshold, cache).double()        # (d_k, d_k)
        d_k = P.shape[0]
        rank = round(float(P.diagonal().sum()))
        assert 0 < rank < d_k, f"layer {layer}: projector rank {rank} of {d_k}: the test would be trivial"
        delta = as_out_in(patch.deltas[spec.mlp_out_name(layer)], spec).double()          # (d, d_k)
        assert delta.shape == (lm.model.config.hidden_size, d_k)
        assert delta.norm() > 0
        leak = (delta @ (torch.eye(d_k, dtype=torch.float64) - P)).norm() / delta.norm()
        assert leak < 1e-4, f"layer {layer}: ||Delta (I - P)|| / ||Delta|| = {leak:.2e}"


def test_alphaedit_sequential_state(tokenizer, corpus, cache):
    """C_p accumulates K K^T of each batch (keys recomputed after the edit) and belongs to one run."""
    lm = make_tiny("llama", tokenizer)
    before = params(lm.model)
    cfg = config("alphaedit", corpus)
    run = editing.build_run(lm, "alphaedit", cfg, cache=cache, progress=False)
    other = editing.build_run(lm, "alphaedit", cfg, cache=cache, progress=False)
    assert run.solver.C_p is not other.solver.C_p
    first, second = REQUESTS[:2], REQUESTS[2:]

    run.edit_batch(first)
    K1 = {l: reference_keys(lm.model, tokenizer, first, l, run.templates).double() for l in LAYERS}
    for l in LAYERS:
        torch.testing.assert_close(run.solver.C_p[l], K1[l] @ K1[l].T, rtol=1e-5, atol=1e-6)
    run.edit_batch(second)
    K2 = {l: reference_keys(lm.model, tokenizer, second, l, run.templates).double() for l in LAYERS}
    for l in LAYERS:
        expected = K1[l] @ K1[l].T + K2[l] @ K2[l].T
        torch.testing.assert_close(run.solver.C_p[l], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, K1[l] @ K1[l].T), "the second batch must add to C_p"
        # The other run never saw these edits.
        assert torch.count_nonzero(other.solver.C_p[l]) == 0
    assert len(run.requests) == 4 and other.requests == []
    run.restore()
    assert_same_params(lm.model, before)


# --------------------------------------------------------------------------- fast path vs reference

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memit_matches_reference(family, tokenizer, corpus, cache):
    """The whole MEMIT batch (E2-E4) against the one-request-at-a-time, full-depth reference."""
    lm = make_tiny(family, tokenizer)
    spec = arch_for(lm.model)
    cfg = config("memit", corpus)
    before = params(lm.model)
    stats = second_moments(lm, LAYERS, corpus=parse_corpus(cfg.stats_corpus), n_tokens=cfg.stats_tokens,
                           cache=cache, progress=False)
    ref = reference_memit(lm, cfg, REQUESTS, {l: stats[l] for l in LAYERS})
    assert_same_params(lm.model, before)                   # the reference leaves the model as it found it
    patch, run = editing.edit_model(lm, "memit", cfg, REQUESTS, cache=cache, progress=False)
    run.restore()
    # The patch records the E2 grouping: the bare prompt is a context type of its own (weight 1/2),
    # the 2 sampled prefixes share the other half.
    recorded = patch.extra["context_templates"]
    assert recorded["groups"] == [list(g) for g in ref.templates.groups] and len(recorded["groups"]) == 2
    assert recorded["groups"][0] == ["{}"] and recorded["key_weights"] == [0.5, 0.25, 0.25]
    for layer in LAYERS:
        fast = as_out_in(patch.deltas[spec.mlp_out_name(layer)], spec).double()
        rel = float((fast - ref.deltas[layer]).norm() / ref.deltas[layer].norm())
        assert rel < 1e-3, f"layer {layer}: relative difference {rel:.2e} between fast and reference MEMIT deltas"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_alphaedit_matches_reference(family, tokenizer, corpus, cache):
    """The whole AlphaEdit batch (E2, E3, E5) against the reference (paper formula, explicit inverse),
    once from a fresh run and once as the second batch of a sequential run (C_p from the first)."""
    lm = make_tiny(family, tokenizer)
    spec = arch_for(lm.model)
    cfg = config("alphaedit", corpus)
    stats = second_moments(lm, LAYERS, corpus=parse_corpus(cfg.stats_corpus), n_tokens=cfg.stats_tokens,
                           cache=cache, progress=False)
    P = {l: cached_projector(stats, l, cfg.nullspace_threshold, cache) for l in LAYERS}
    first, second = REQUESTS[:2], REQUESTS[2:]
    ref = reference_alphaedit(lm, cfg, REQUESTS, P)
    patch, run = editing.edit_model(lm, "alphaedit", cfg, REQUESTS, cache=cache, progress=False)
    run.restore()
    for layer in LAYERS:
        fast = as_out_in(patch.deltas[spec.mlp_out_name(layer)], spec).double()
        rel = float((fast - ref.deltas[layer]).norm() / ref.deltas[layer].norm())
        assert rel < 1e-3, f"layer {layer}: relative difference {rel:.2e} between fast and reference AlphaEdit deltas"

    run = editing.build_run(lm, "alphaedit", cfg, cache=cache, progress=False)
    run.edit_batch(first)
    after_first = {n: d.clone() for n, d in run.accum.items()}
    # On the model edited by the first batch, with the run's templates (sampled from the unedited model).
    ref2 = reference_alphaedit(lm, cfg, second, P, run.solver.C_p, templates=run.templates)
    run.edit_batch(second)
    run.restore()
    for layer in LAYERS:
        name = spec.mlp_out_name(layer)
        fast = as_out_in(run.accum[name] - after_first[name], spec).double()
        rel = float((fast - ref2.deltas[layer]).norm() / ref2.deltas[layer].norm())
        assert rel < 1e-3, f"layer {layer}: second batch differs from the reference by {rel:.2e} (relative)"


# --------------------------------------------------------------------------- closed-form solves

def _random_problem(d: int = 8, d_k: int = 12, n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(d_k, n, generator=g, dtype=torch.float64)
    R = torch.randn(d, n, generator=g, dtype=torch.float64)
    A = torch.randn(d_k, 3 * d_k, generator=g, dtype=torch.float64)
    C = A @ A.T / (3 * d_k)                                                    # SPD (d_k, d_k)
    return K, R, C


def test_memit_solve_matches_explicit_formula():
    K, R, C = _random_problem()
    lam = 3.0
    delta = memit_delta(K, R, C, lam)
    explicit = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
    assert delta.shape == (R.shape[0], K.shape[0]) and delta.dtype == torch.float64
    torch.testing.assert_close(delta, explicit, rtol=0, atol=1e-8)
    # float32 inputs are solved in float64 by default.
    torch.testing.assert_close(memit_delta(K.float(), R.float(), C.float(), lam), explicit, rtol=0, atol=1e-5)


def test_alphaedit_solve_satisfies_normal_equation():
    K, R, C = _random_problem(seed=1)
    d_k = K.shape[0]
    eigvals, U = torch.linalg.eigh(C)
    P = U[:, :5] @ U[:, :5].T                                                  # rank-5 projector
    g = torch.Generator().manual_seed(2)
    B = torch.randn(d_k, 4, generator=g, dtype=torch.float64)
    C_p = B @ B.T                                                              # earlier batches' keys
    L2 = 10.0
    delta = nullspace_delta(K, R, P, C_p, L2)
    X = delta.T                                                                # (d_k, d)
    eye = torch.eye(d_k, dtype=torch.float64)
    lhs = (P @ (K @ K.T + C_p) + L2 * eye) @ X
    torch.testing.assert_close(lhs, P @ K @ R.T, rtol=0, atol=1e-10)
    assert float((delta @ (eye - P)).norm()) < 1e-10 * float(delta.norm())
    # E5 written as in the paper: Delta = R K^T P ((K K^T + C_p) P + L2 I)^-1.
    paper = R @ K.T @ P @ torch.linalg.inv((K @ K.T + C_p) @ P + L2 * eye)
    torch.testing.assert_close(delta, paper, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- errors before heavy work

@pytest.fixture
def no_heavy_work(monkeypatch):
    """Make the statistics pass fail loudly if reached; tests that expect `edit_model` itself to
    reject the input also forbid `build_run` (the whole run construction)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the input was validated")

    monkeypatch.setattr(editing, "second_moments", forbidden)
    return forbidden


def test_layer_out_of_range(tokenizer, corpus, no_heavy_work, monkeypatch):
    monkeypatch.setattr(editing, "build_run", no_heavy_work)
    lm = make_tiny("llama", tokenizer)
    with pytest.raises(ConfigError) as e:
        editing.edit_model(lm, "memit", config("memit", corpus, layers=(1, 7)), REQUESTS, progress=False)
    msg = str(e.value)
    assert "layers" in msg and "7" in msg and "4 layers" in msg, msg


def test_unknown_editor_name(tokenizer, corpus, no_heavy_work):
    lm = make_tiny("llama", tokenizer)
    with pytest.raises(ConfigError, match="did you mean 'memit'"):
        editing.edit_model(lm, "memitt", config("memit", corpus), REQUESTS, progress=False)
    with pytest.raises(ConfigError, match="did you mean 'alphaedit'"):
        make_config("alpha_edit", layers=(1,))


@pytest.mark.parametrize("bad, field", [
    (EditRequest("no-slot", "The capital of France is", "France", "Rome"), "prompt"),
    (EditRequest("two-slots", "{} and {} are", "France", "Rome"), "prompt"),
    (EditRequest("empty-subject", "The capital of {} is", "  ", "Rome"), "subject"),
    (EditRequest("empty-target", "The capital of {} is", "France", "   "), "tokenizes to nothing"),
])
def test_bad_request_fails_before_statistics(bad, field, tokenizer, corpus, no_heavy_work, monkeypatch):
    monkeypatch.setattr(editing, "build_run", no_heavy_work)
    lm = make_tiny("llama", tokenizer)
    with pytest.raises(DataError) as e:
        editing.edit_model(lm, "memit", config("memit", corpus), [*REQUESTS[:2], bad], progress=False)
    msg = str(e.value)
    assert field in msg and "request 2" in msg and bad.case_id in msg, msg


def test_unknown_architecture(tokenizer, corpus, no_heavy_work, monkeypatch):
    monkeypatch.setattr(editing, "build_run", no_heavy_work)
    with pytest.raises(ConfigError) as e:
        arch_for_model_type("mamba")
    assert "'mamba'" in str(e.value) and "editdecay/core/arch.py" in str(e.value)
    lm = make_tiny("llama", tokenizer)
    lm.model.config.model_type = "mamba"
    with pytest.raises(ConfigError, match="editdecay/core/arch.py"):
        editing.edit_model(lm, "memit", config("memit", corpus), REQUESTS, progress=False)


@pytest.mark.parametrize("editor, fields, named", [
    ("memit", dict(layers=(3, 3)), "layers"),
    ("memit", dict(layers=()), "layers"),
    ("memit", dict(layers=(3,), v_lr=-1.0), "v_lr"),
    ("memit", dict(layers=(3,), stats_dtype="float64", solve_dtype="float32"), "solve_dtype"),
    ("memit", dict(layers=(3,), stats_dtype="bfloat16"), "stats_dtype"),
    ("memit", dict(layers=(3,), n_context_templates=0, context_length=4), "context_length"),
    ("memit", dict(layers=(3,), nullspace_threshold=0.1), "nullspace_threshold"),   # an AlphaEdit field
    ("alphaedit", dict(layers=(3,), mom2_update_weight=1.0), "mom2_update_weight"),  # a MEMIT field
    ("alphaedit", dict(layers=(3,), L2=0.0), "L2"),
])
def test_config_conflicts_name_the_field(editor, fields, named):
    with pytest.raises(ConfigError) as e:
        make_config(editor, **fields)
    assert named in str(e.value), str(e.value)
