"""Shared fixtures: tiny random models of every supported family, and the embedded model.

Torch uses one thread in tests: on 2 cores, several threaded torch processes slow each other badly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
ZSRE_SAMPLE = (SHARED / "data" / "zsre_sample.json").resolve()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M), loaded once per test session."""
    from editdecay.core.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(embedded):
    """A real BPE tokenizer (no BOS added) for tiny models; a fresh copy, safe to modify padding side."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.identity.source)


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=128, vocab_size=vocab_size)
    if family == "gptj":
        return GPTJConfig(n_layer=4, n_embd=32, n_head=2, rotary_dim=8, n_positions=128, vocab_size=vocab_size)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=128, vocab_size=vocab_size)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, max_position_embeddings=128, vocab_size=vocab_size)
    raise ValueError(family)


from editdecay.core.arch import FAMILIES  # noqa: E402  (the architecture table's families: one tiny config each)


def small_edit_config(editor: str, **fields):
    """A config of a registered editor for the tiny models: the given fields, plus a small E4 lambda where the
    editor's config has one (at the study's lambda the tiny models' edits would be negligible)."""
    from editdecay.edit.registry import editor_class

    config_class = editor_class(editor).config_class
    if "mom2_update_weight" in config_class.model_fields:
        fields.setdefault("mom2_update_weight", 100.0)
    return config_class(**fields)


def make_tiny(family: str, tokenizer, seed: int = 0):
    """A tiny random model of `family` wrapped as a LoadedModel (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    from editdecay.core.models import wrap

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    # Random init gives near-uniform predictions; scale up so argmax/NLL comparisons are not all ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return wrap(model.eval(), tokenizer, name=f"tiny-{family}", source="config")


@pytest.fixture(params=FAMILIES)
def tiny(request, tokenizer):
    return make_tiny(request.param, tokenizer)


def save_tiny_llama(path: Path) -> Path:
    """A random 4-layer Llama (d=32) with the embedded model's tokenizer, saved as a model directory (for grids)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from editdecay.core.models import EMBEDDED_NAME, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(EMBEDDED_NAME))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256, tie_word_embeddings=False))
    with torch.no_grad():                 # larger weights: predictions far from uniform, so edits move margins
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
