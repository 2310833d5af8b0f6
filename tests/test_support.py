"""The shared test support (tests/support): the tiny-model factory builds what the tests assume."""

from __future__ import annotations

import pytest
import torch
from support.models import FAMILIES, make_tiny, save_tiny_model, snapshot, tiny_model, tok

from editdecay.core.arch import arch_for, num_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_match_the_architecture_table(family):
    m = tiny_model(family)
    assert arch_for(m).conv1d is (family == "gpt2")
    assert num_layers(m) == 4 and not m.training and m.dtype == torch.float32
    assert m.get_input_embeddings().weight.shape[0] == len(tok())
    assert num_layers(tiny_model(family, n_layers=2)) == 2


def test_tiny_models_are_seeded():
    a, b = snapshot(tiny_model("llama", seed=3)), snapshot(tiny_model("llama", seed=3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = snapshot(tiny_model("llama", seed=4))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_scale_multiplies_the_matrices_only():
    base, scaled = snapshot(tiny_model("gpt2")), snapshot(tiny_model("gpt2", scale=4.0))
    for name, p in base.items():
        torch.testing.assert_close(scaled[name], p * 4.0 if p.dim() == 2 else p, rtol=0, atol=0)
    lm = make_tiny("gpt2", tok())
    assert all(torch.equal(v, scaled[k]) for k, v in snapshot(lm.model).items())


def test_saved_tiny_model_loads_as_the_same_model(tmp_path):
    from editdecay.core.models import load_model

    save_tiny_model(tmp_path / "tiny")
    lm = load_model(str(tmp_path / "tiny"))
    want = snapshot(tiny_model("llama", positions=256, scale=4.0))
    assert all(torch.equal(p, want[n]) for n, p in lm.model.named_parameters())
    assert lm.tokenizer.get_vocab() == tok().get_vocab()


def test_config_fields_override_and_unknown_family_is_named():
    m = tiny_model("llama", vocab_size=128, intermediate_size=48)
    assert m.config.vocab_size == 128 and m.model.layers[0].mlp.down_proj.weight.shape == (32, 48)
    with pytest.raises(ValueError, match="'bert'"):
        tiny_model("bert")
