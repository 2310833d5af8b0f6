"""The attention kernel of the training passes (recipe `attention_kernel`).

transformers runs attention through `sdpa` (torch's scaled_dot_product_attention) by default. On the CPU its
backward pass is slow for the short sequences of instruction tuning: on the embedded SmolLM2-135M, a micro-batch
of 8 sequences of 76 tokens under bfloat16 autocast, one thread, forward + backward took 4.25-4.37 s with `sdpa`
and 3.72-3.80 s with `eager` (plain matrix products and a softmax) for LoRA on all layers, 4.03-4.13 vs 3.58-3.67 s
for full fine-tuning; the float32 evaluation forward is the same speed with both (3.84 vs 3.85 s for 32 prompts
of 40 tokens). `eager` keeps each trained layer's (B, heads, L, L) attention probabilities for the backward pass,
which `sdpa`'s fused kernels do not, so `auto` uses it only on the CPU and only while those matrices stay under
`EAGER_CPU_LIMIT_BYTES` for the whole model; elsewhere (GPUs, long sequences) the model keeps its own kernel.
The memory plan counts them (core/memory_plan.py, "eager attention matrices").

Only the training passes switch kernels: `callback.evaluate` between steps measures with the model's own kernel,
so a checkpoint's measurement is the same computation as a standalone evaluation of the same weights. Both
kernels compute the same attention (their losses differ at float rounding: tests/finetune/test_attention.py).
A transformers version or model class that cannot switch at run time (no `set_attn_implementation`, or one that
leaves the kernel as it was) trains with the model's own kernel; the trainer records the kernel that ran.
"""

from __future__ import annotations

import contextlib
import warnings

from editdecay.core.arch import ConfigSizes, unwrap_peft
from editdecay.core.errors import ConfigError

# Bytes eager attention keeps per attention-matrix element for the backward pass, measured on tiny GPT-2, GPT-J,
# NeoX and Llama models in training mode: 4 (float32) or 6 (bfloat16 autocast: the float32 softmax output and
# its bfloat16 copy) without attention dropout, up to 12 with it (the dropout mask and the dropped
# probabilities). The estimate takes the larger of each case.
EAGER_BYTES_PER_ELEMENT = 8
EAGER_BYTES_PER_ELEMENT_DROPOUT = 12
# `auto` runs eager attention on the CPU while one micro-batch's matrices over all layers stay under this many
# bytes: the embedded study v3 recipe (batch 8, cutoff 160, 9 heads, 30 layers, no attention dropout) keeps
# 0.41 GiB by the estimate (0.31 GiB measured at 6 bytes).
EAGER_CPU_LIMIT_BYTES = 1 << 30


def eager_attention_bytes(heads: int, layers: int, batch_size: int, seq_len: int, dropout: float = 0.0) -> int:
    """Bytes of the attention matrices eager attention keeps for the backward pass of one micro-batch of
    `batch_size` sequences of `seq_len` tokens over `layers` trained layers of `heads` query heads."""
    per = EAGER_BYTES_PER_ELEMENT_DROPOUT if dropout > 0 else EAGER_BYTES_PER_ELEMENT
    return int(batch_size) * int(heads) * int(seq_len) ** 2 * int(layers) * per


def kernel_for(recipe, device_type: str, heads: int, layers: int, dropout: float = 0.0) -> str | None:
    """The kernel the training passes of `recipe` use on a device of `device_type` ("cpu", "cuda", ...) for a
    model of `layers` layers of `heads` query heads: the recipe's `attention_kernel` when it names one; with
    `auto`, "eager" on the CPU when `eager_attention_bytes` of one micro-batch at `recipe.cutoff_len` is at most
    EAGER_CPU_LIMIT_BYTES, else None (the model's own kernel)."""
    if recipe.attention_kernel != "auto":
        return recipe.attention_kernel
    if device_type != "cpu":
        return None
    need = eager_attention_bytes(heads, layers, recipe.batch_size, recipe.cutoff_len, dropout)
    return "eager" if need <= EAGER_CPU_LIMIT_BYTES else None


def training_kernel(model, recipe, device) -> str | None:
    """`kernel_for` for `model` (a transformers model, or a peft model around one) on `device` (a torch.device)."""
    z = ConfigSizes.of(unwrap_peft(model).config)
    return kernel_for(recipe, device.type, z.heads, z.n_layers, z.attention_dropout)


def current_kernel(model) -> str | None:
    """The attention kernel `model` (or the model inside a peft model) runs now."""
    return getattr(unwrap_peft(model).config, "_attn_implementation", None)


@contextlib.contextmanager
def attention_kernel(model, kernel: str | None):
    """Run the body with `model`'s attention through `kernel` (None: unchanged) and restore the model's own kernel
    afterwards, also on errors. Yields the kernel in effect inside: `kernel`, or the model's own where the model
    cannot switch. Raises ConfigError naming `attention_kernel` when transformers refuses `kernel` for the model."""
    base = unwrap_peft(model)
    own = current_kernel(base)
    if kernel is None or kernel == own or not hasattr(base, "set_attn_implementation"):
        yield own
        return
    try:
        _set(base, kernel)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"attention_kernel={kernel!r} is not available for this model "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]}); use 'auto'") from None
    try:
        yield current_kernel(base)
    finally:
        if current_kernel(base) != own:
            _set(base, own)


def _set(base, kernel: str) -> None:
    with warnings.catch_warnings():     # transformers 5 warns about its own deprecated checkpointing query here
        warnings.simplefilter("ignore", FutureWarning)
        base.set_attn_implementation(kernel)


__all__ = ["EAGER_CPU_LIMIT_BYTES", "attention_kernel", "current_kernel", "eager_attention_bytes", "kernel_for",
           "training_kernel"]
