"""Tiny random GPT-2 (Conv1D) and Llama models for the fine-tuning tests, plus checks of the builders.

The other test_finetune_* files import `tiny_model`, `tok` and `snapshot` from here (names
that do not shadow the fixtures of conftest.py). The tokenizer is the
embedded model's (SmolLM2), loaded from its converted directory; the tiny configs use vocab_size=len(tok).
"""

from __future__ import annotations

import functools

import torch

from editdecay.core.arch import arch_for, num_layers


@functools.lru_cache(maxsize=1)
def tok():
    from transformers import AutoTokenizer

    from editdecay.core.models import EMBEDDED_NAME, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(EMBEDDED_NAME))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_model(family: str, n_layers: int = 4, seed: int = 0):
    """A small random causal LM of `family` ("gpt2" or "llama") in float32, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(tok())
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=n_layers, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    """Clones of every parameter, by name (bit-exact comparisons later)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tiny_models_match_the_architecture_table():
    for family, conv in (("gpt2", True), ("llama", False)):
        m = tiny_model(family)
        assert arch_for(m).conv1d is conv
        assert num_layers(m) == 4
        assert m.get_input_embeddings().weight.shape[0] == len(tok())


def test_tiny_models_are_seeded():
    a, b = snapshot(tiny_model("llama", seed=3)), snapshot(tiny_model("llama", seed=3))
    assert all(torch.equal(a[k], b[k]) for k in a)
