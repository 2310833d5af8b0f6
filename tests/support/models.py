"""The tokenizer and the one tiny-model factory every test uses, and a stand-in model.

Tiny models are random and small (hidden size 32, 2 heads, 4 layers by default) so that a test runs in
seconds on one CPU thread; they take the embedded model's real tokenizer (SmolLM2 BPE, 49,152 tokens),
read from its converted directory without loading its weights.

- `tiny_model(family, ...)`: a Hugging Face causal LM (float32, eval mode);
- `make_tiny(family, tokenizer)`: the same wrapped as a `LoadedModel`, weights scaled x4;
- `save_tiny_model(path)`: a tiny Llama saved as a model directory (for the CLI and grids).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from editdecay.core.arch import FAMILIES  # noqa: F401  (the architecture table's families: one tiny config each)


def load_tokenizer():
    """A fresh copy of the embedded model's tokenizer (no BOS added; pad token = <|im_end|>)."""
    from transformers import AutoTokenizer

    from editdecay.core.models import EMBEDDED_NAME, resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(EMBEDDED_NAME))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=1)
def tok():
    """The embedded model's tokenizer, loaded once per test process and shared: do not modify it
    (the `tokenizer` fixture of conftest.py is the one to change padding side on)."""
    return load_tokenizer()


def tiny_config(family: str, vocab_size: int, *, n_layers: int = 4, positions: int = 128, **fields):
    """The config of a tiny `family` model: hidden size 32, 2 heads, dropout off; `fields` override any key.

    MLP widths (d_k of the edited module): GPT-2 and GPT-J 128 (4 x hidden), GPT-NeoX and Llama 64.
    `positions` is the longest sequence (GPT-2/GPT-J: the size of the learned position table).
    """
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "gpt2":
        cfg = dict(n_layer=n_layers, n_embd=32, n_head=2, n_positions=positions, **no_dropout)
        return GPT2Config(vocab_size=vocab_size, **{**cfg, **fields})
    if family == "gptj":
        cfg = dict(n_layer=n_layers, n_embd=32, n_head=2, rotary_dim=8, n_positions=positions, **no_dropout)
        return GPTJConfig(vocab_size=vocab_size, **{**cfg, **fields})
    if family == "gpt_neox":
        cfg = dict(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=positions)
        return GPTNeoXConfig(vocab_size=vocab_size, **{**cfg, **fields})
    if family == "llama":
        cfg = dict(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=64, max_position_embeddings=positions, tie_word_embeddings=False)
        return LlamaConfig(vocab_size=vocab_size, **{**cfg, **fields})
    raise ValueError(f"tiny model family {family!r}: choose one of {FAMILIES}")


def tiny_model(family: str, n_layers: int = 4, seed: int = 0, *, vocab_size: int | None = None,
               positions: int = 128, scale: float = 1.0, **fields):
    """A random tiny causal LM of `family` (float32, eval mode), the same for the same arguments.

    `vocab_size` defaults to the embedded tokenizer's. `scale` multiplies every matrix: random init gives
    near-uniform predictions, so tests that compare argmaxes or NLLs (edits, metrics) use scale=4 to
    keep them from being all ties. `fields` override config keys (see `tiny_config`).
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, len(tok()) if vocab_size is None else vocab_size, n_layers=n_layers,
                      positions=positions, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(scale)
    return model.float().eval()


def make_tiny(family: str, tokenizer, seed: int = 0):
    """`tiny_model(family)` with weights scaled x4, wrapped with `tokenizer` as a LoadedModel."""
    from editdecay.core.models import wrap

    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), scale=4.0)
    return wrap(model, tokenizer, name=f"tiny-{family}", source="config")


def save_tiny_model(path: Path, family: str = "llama") -> Path:
    """A tiny model (weights scaled x4, 256 positions) and the tokenizer saved as a model directory."""
    model = tiny_model(family, positions=256, scale=4.0)
    model.save_pretrained(path)
    tok().save_pretrained(path)
    return path


def snapshot(model) -> dict[str, torch.Tensor]:
    """Clones of every parameter, by name (bit-exact comparisons later)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Oracle(nn.Module):
    """A stand-in Llama whose prediction at position t is the true token t+1 (it peeks at the input), except
    where that token is in `blind`: there it predicts token 0. Hidden states are one-hot over the vocabulary
    and the unembedding is the identity, so it runs through the same body/unembed split as real models."""

    def __init__(self, vocab: int, blind: set[int]):
        super().__init__()
        self.config = SimpleNamespace(model_type="llama")
        self.model = _PeekingBody(vocab, blind)
        self.lm_head = nn.Identity()

    @property
    def base_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model        # where input ids go (core.devices.input_device): the body's device


class _PeekingBody(nn.Module):
    def __init__(self, vocab: int, blind: set[int]):
        super().__init__()
        self.vocab, self.blind = vocab, blind
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)          # (B, T) token t+1
        for b in self.blind:
            nxt = torch.where(nxt == b, torch.zeros_like(nxt), nxt)
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(nxt, self.vocab).float())  # (B, T, V)
