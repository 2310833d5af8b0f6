"""The attention kernel of the training passes (recipe `attention_kernel`).

transformers runs attention through `sdpa` (torch's scaled_dot_product_attention) by default. On the CPU its
backward pass is slow for the short sequences of instruction tuning: on the embedded SmolLM2-135M, a micro-batch
of 8 sequences of 76 tokens under bfloat16 autocast, one thread, forward + backward took 4.25-4.37 s with `sdpa`
and 3.72-3.80 s with `eager` (plain matrix products and a softmax) for LoRA on all layers, 4.03-4.13 vs 3.58-3.67 s
for full fine-tuning; the float32 evaluation forward is the same speed with both (3.84 vs 3.85 s for 32 prompts
of 40 tokens). `eager` keeps each layer's (B, heads, L, L) attention probabilities for the backward pass, which
`sdpa`'s fused kernels do not, so `auto` uses it only on the CPU and only while those matrices stay under
`EAGER_CPU_LIMIT_BYTES` for the whole model; elsewhere (GPUs, long sequences) the model keeps its own kernel.

Only the training passes switch kernels: `callback.evaluate` between steps measures with the model's own kernel,
so a checkpoint's measurement is the same computation as a standalone evaluation of the same weights. Both
kernels compute the same attention (their losses differ at float rounding: tests/finetune/test_attention.py).
transformers before 4.48 fixes the kernel when the model is built; there nothing switches, and the trainer's
record says which kernel trained.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from editdecay.core.arch import unwrap_peft
from editdecay.core.errors import ConfigError

# Eager attention keeps about 8 bytes per attention-matrix element for the backward pass (the float32 softmax
# output and its bfloat16 copy, or float32 probabilities): at most this many bytes over all layers of one
# micro-batch on the CPU. The embedded study v3 recipe (batch 8, cutoff 160, 9 heads, 30 layers) needs 0.44 GiB.
EAGER_CPU_LIMIT_BYTES = 1 << 30
EAGER_BYTES_PER_ELEMENT = 8


def eager_attention_bytes(config, batch_size: int, seq_len: int) -> int | None:
    """Bytes of the attention probabilities eager attention keeps for one micro-batch of `batch_size` sequences of
    `seq_len` tokens (all layers), or None when `config` does not say its heads and layers."""
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    return int(batch_size) * int(heads) * int(seq_len) ** 2 * int(layers) * EAGER_BYTES_PER_ELEMENT


def training_kernel(model, recipe, device: torch.device) -> str | None:
    """The attention kernel the training passes of `recipe` use on `model` at `device`: the recipe's
    `attention_kernel` when it names one; with `auto`, "eager" on the CPU when `eager_attention_bytes` of one
    micro-batch at `recipe.cutoff_len` is at most EAGER_CPU_LIMIT_BYTES, else None (the model's own kernel)."""
    if recipe.attention_kernel != "auto":
        return recipe.attention_kernel
    if device.type != "cpu":
        return None
    need = eager_attention_bytes(unwrap_peft(model).config, recipe.batch_size, recipe.cutoff_len)
    return "eager" if need is not None and need <= EAGER_CPU_LIMIT_BYTES else None


def current_kernel(model) -> str | None:
    """The attention kernel `model` (or the model inside a peft model) runs now."""
    return getattr(unwrap_peft(model).config, "_attn_implementation", None)


def effective_kernel(model, kernel: str | None) -> str | None:
    """The kernel `attention_kernel(model, kernel)` runs the training passes with: `kernel` where the model can
    switch (transformers >= 4.48), else the model's own."""
    return kernel if kernel is not None and hasattr(unwrap_peft(model), "set_attn_implementation") \
        else current_kernel(model)


@contextlib.contextmanager
def attention_kernel(model, kernel: str | None):
    """Run the body with `model`'s attention through `kernel` (None: unchanged) and restore the model's own kernel
    afterwards, also on errors. Raises ConfigError naming `attention_kernel` when the model cannot use `kernel`."""
    base = unwrap_peft(model)
    own = current_kernel(base)
    if kernel is None or kernel == own or not hasattr(base, "set_attn_implementation"):
        yield
        return
    try:
        _set(base, kernel)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"attention_kernel={kernel!r} is not available for this model "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]}); use 'auto'") from None
    try:
        yield
    finally:
        _set(base, own)


def _set(base, kernel: str) -> None:
    with warnings.catch_warnings():     # transformers 5 warns about its own deprecated checkpointing query here
        warnings.simplefilter("ignore", FutureWarning)
        base.set_attn_implementation(kernel)


__all__ = ["EAGER_CPU_LIMIT_BYTES", "attention_kernel", "current_kernel", "eager_attention_bytes", "effective_kernel", "training_kernel"]
