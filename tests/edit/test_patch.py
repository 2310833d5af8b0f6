"""EditPatch: apply/revert bit-exactly, save/load, integrity checks and weight layouts."""

from __future__ import annotations

import random

import pytest
import torch
from support.models import make_tiny, tiny_model
from safetensors.torch import load_file, save_file

from editdecay.core.arch import arch_for, as_out_in, get_module
from editdecay.core.cache import Cache
from editdecay.core.errors import ConfigError
from editdecay.core.request import EditRequest
from editdecay.edit import make_config
from editdecay.edit.api import edit_model
from editdecay.edit.patch import META_FILE, PATCH_FILE, EditPatch
from editdecay.measure.metrics import evaluate_requests

torch.set_num_threads(1)

LAYERS = (1, 2)
REQUESTS = (
    EditRequest("capital", "The capital of {} is", "France", "Rome", "Paris",
                paraphrase_prompts=("France's capital city is",), neighborhood_prompts=("The capital of Italy is",),
                neighborhood_answers=("Paris",), extra=(("note", "x"),)),
    EditRequest("currency", "The official currency of {} is the", "Japan", "euro", "yen",
                paraphrase_prompts=("In Japan people pay with the",),
                neighborhood_prompts=("The official currency of Korea is the",), neighborhood_answers=("yen",)),
)
WORDS = "the of and a in to is was for on that by with as from at it an were are which this be or city river".split()


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(model, expected: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, expected[n]), f"parameter {n} differs"


def random_patch(lm, layers=LAYERS, scale: float = 0.1, seed: int = 0) -> EditPatch:
    spec = arch_for(lm.model)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for l in layers:
        w = get_module(lm.model, spec.mlp_out_name(l)).weight
        deltas[spec.mlp_out_name(l)] = scale * torch.randn(w.shape, generator=g)
    return EditPatch(deltas=deltas, layers=tuple(layers), editor="memit", config={"layers": list(layers)},
                     requests=REQUESTS, model_identity=lm.identity.to_dict(), extra={"note": "random"})


@pytest.fixture(scope="module")
def edited(tokenizer, tmp_path_factory):
    """A real MEMIT edit of a tiny Llama: (live edited model, patch, weights before the edit)."""
    tmp = tmp_path_factory.mktemp("patch")
    rng = random.Random(0)
    corpus = tmp / "text.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(30)))
    lm = make_tiny("llama", tokenizer)
    before = params(lm.model)
    cfg = make_config("memit", layers=LAYERS, v_num_grad_steps=4, n_context_templates=1, context_length=4,
                      stats_corpus=str(corpus), stats_tokens=300, mom2_update_weight=10.0)
    patch, _ = edit_model(lm, "memit", cfg, list(REQUESTS), cache=Cache(tmp / "cache"), progress=False)
    return lm, patch, before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_apply_revert_bit_exact(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    before = params(lm.model)
    patch = random_patch(lm)
    handle = patch.apply(lm.model)
    for name, delta in patch.deltas.items():
        w = get_module(lm.model, name).weight
        assert torch.equal(w, before[f"{name}.weight"] + delta)
    handle.revert()
    assert_same_params(lm.model, before)
    handle.revert()                                    # a second revert is a no-op
    assert_same_params(lm.model, before)
    with pytest.raises(RuntimeError, match="boom"):
        with patch.applied(lm.model):
            assert not torch.equal(get_module(lm.model, patch.module_names[0]).weight,
                                   before[f"{patch.module_names[0]}.weight"])
            raise RuntimeError("boom")
    assert_same_params(lm.model, before)               # reverted although the block raised


def test_save_load_round_trip(tokenizer, tmp_path):
    lm = make_tiny("gpt2", tokenizer)
    patch = random_patch(lm)
    patch.save(tmp_path / "p")
    loaded = EditPatch.load(tmp_path / "p")
    assert loaded.module_names == patch.module_names
    for name in patch.deltas:
        assert torch.equal(loaded.deltas[name], patch.deltas[name])
    assert loaded.layers == patch.layers and loaded.editor == patch.editor and loaded.config == patch.config
    assert loaded.model_identity == patch.model_identity and loaded.extra == patch.extra
    assert loaded.requests == patch.requests             # frozen dataclasses, tuples included


def test_saved_patch_on_fresh_model_gives_identical_metrics(edited, tokenizer, tmp_path):
    lm, patch, before = edited
    patch.save(tmp_path / "p")
    fresh = make_tiny("llama", tokenizer)
    assert_same_params(fresh.model, before)
    base = evaluate_requests(fresh.model, tokenizer, REQUESTS)
    with EditPatch.load(tmp_path / "p").applied(fresh.model):
        for n, p in lm.model.named_parameters():
            assert torch.equal(dict(fresh.model.named_parameters())[n], p), n
        from_patch = evaluate_requests(fresh.model, tokenizer, REQUESTS)
    live = evaluate_requests(lm.model, tokenizer, REQUESTS)
    assert from_patch == live
    assert [o.margin for o in live] != [o.margin for o in base], "the edit should move the margins"


def test_corrupted_patch_dir_is_rejected(tokenizer, tmp_path):
    lm = make_tiny("llama", tokenizer)
    patch = random_patch(lm)
    directory = patch.save(tmp_path / "p")
    tensors = load_file(str(directory / PATCH_FILE))
    save_file({k: v * 2 for k, v in tensors.items()}, str(directory / PATCH_FILE))   # valid file, other contents
    with pytest.raises(ConfigError, match="does not match"):
        EditPatch.load(directory)
    (directory / PATCH_FILE).unlink()
    with pytest.raises(ConfigError, match=PATCH_FILE):
        EditPatch.load(directory)
    with pytest.raises(ConfigError, match=META_FILE):
        EditPatch.load(tmp_path / "nowhere")


def test_patch_for_another_shape_fails_clearly(tokenizer):
    from editdecay.core.models import wrap

    lm = make_tiny("llama", tokenizer)
    patch = random_patch(lm)
    wider = wrap(tiny_model("llama", vocab_size=len(tokenizer), intermediate_size=48), tokenizer)
    before = params(wider.model)
    with pytest.raises(ConfigError) as e:
        patch.apply(wider.model)
    assert "(32, 64)" in str(e.value) and "(32, 48)" in str(e.value) and "another model" in str(e.value)
    assert_same_params(wider.model, before)
    # A patch for a GPT-2 names modules a Llama does not have.
    with pytest.raises(ConfigError, match="has no such module.*another architecture"):
        random_patch(make_tiny("gpt2", tokenizer)).apply(lm.model)


def test_failed_apply_leaves_model_untouched(tokenizer):
    """A patch that fits only some modules must not be half applied: the caller gets no handle to revert.

    Case: a patch computed on a deeper model of the same width (layers 1 and 5) applied to a 4-layer model.
    """
    lm = make_tiny("llama", tokenizer)
    spec = arch_for(lm.model)
    patch = random_patch(lm, layers=(1,))
    patch.deltas[spec.mlp_out_name(5)] = patch.deltas[spec.mlp_out_name(1)].clone()
    before = params(lm.model)
    with pytest.raises(ConfigError, match="layers.5"):
        patch.apply(lm.model)
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert not changed, (f"EditPatch.apply raised but left {changed} modified: it must resolve every module and "
                         f"check every shape before adding any delta (editdecay/edit/patch.py, EditPatch.apply)")


def test_gpt2_conv1d_layout(tokenizer, tmp_path):
    """GPT-2 stores W_out transposed (Conv1D, (d_k, d)); the patch stores deltas in that layout."""
    lm = make_tiny("gpt2", tokenizer)
    spec = arch_for(lm.model)
    assert spec.conv1d
    rng = random.Random(1)
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(30)))
    cfg = make_config("memit", layers=(2,), v_num_grad_steps=3, n_context_templates=0, stats_corpus=str(corpus),
                      stats_tokens=300, mom2_update_weight=10.0)
    module = get_module(lm.model, spec.mlp_out_name(2))
    k = torch.randn(3, module.weight.shape[0])                          # (3, d_k) keys
    with torch.no_grad():
        out_before = module(k)                                          # (3, d)
    patch, run = edit_model(lm, "memit", cfg, list(REQUESTS), cache=Cache(tmp_path / "cache"), progress=False)
    delta = patch.deltas[spec.mlp_out_name(2)]
    d, d_k = lm.model.config.n_embd, 4 * lm.model.config.n_embd
    assert delta.shape == module.weight.shape == (d_k, d)
    with torch.no_grad():
        out_after = module(k)
    # v = W_out k: the change of the output is Delta k with Delta in (d, d_k) layout.
    torch.testing.assert_close(out_after - out_before, k @ as_out_in(delta, spec).T, rtol=1e-4, atol=1e-5)
    run.restore()
