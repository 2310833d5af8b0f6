"""Where a model is put: one vocabulary and one default for the command line, grid files, `ModelRef.load`
and `core.models.load_model` (torch-free: grid files are validated without torch).

`auto` is the default because it is right on every machine without a flag: the GPU where there is one
(editing and fine-tuning a 7B model on a CPU is never what was meant), the CPU where there is none, so
the same command runs on a laptop and on a GPU node. One device is chosen; spreading a model over
several GPUs is asked for by name (`balanced`, accelerate's balanced device map).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from editdecay.core.config import choice_reason

DEFAULT_DEVICE = "auto"
DEVICE_WORDS = ("auto", "cpu", "cuda", "balanced", "mps")
DEVICE_HELP = ("auto (CUDA when available, else the CPU) | cpu | cuda | cuda:N | balanced (spread the model over "
               "the visible GPUs with accelerate's device map) | mps")


def _device(value: str) -> str:
    if value not in DEVICE_WORDS and not re.fullmatch(r"cuda:\d+", value):
        raise ValueError(choice_reason(value, DEVICE_WORDS, extra="or cuda:N"))
    return value


# A field type: `device: Device = DEFAULT_DEVICE` checks the word, with the wording of every other choice error.
Device = Annotated[str, AfterValidator(_device)]


def resolve_device(device, *, field: str = "device"):
    """The device a model is loaded to: "auto" -> "cuda" when CUDA is available, else "cpu"; any other value
    (cpu, cuda, cuda:N, balanced, mps, an explicit device map) unchanged once this machine is seen to have it.

    Raises ConfigError naming `field` and the value for a device this machine does not have (cuda without CUDA,
    cuda:7 with 2 GPUs, mps off Apple silicon): torch would fail later with an assertion, after the model loaded.
    The check runs where the model loads (a grid planned on a login node runs on GPU workers)."""
    import torch

    from editdecay.core.errors import ConfigError

    if not isinstance(device, str):
        return device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    # "balanced" is not checked: accelerate's balanced map spreads over the GPUs there are, or keeps the CPU.
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{field}={device!r}: {why}; use {field}='cpu' (or 'auto': CUDA when available)")
        index, count = (int(device.split(":")[1]) if ":" in device else 0), torch.cuda.device_count()
        if 0 < count <= index:
            raise ConfigError(f"{field}={device!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{field}='mps': Apple's MPS backend is not available on this machine; use {field}='cpu'")
    return device


__all__ = ["DEFAULT_DEVICE", "DEVICE_HELP", "DEVICE_WORDS", "Device", "resolve_device"]
