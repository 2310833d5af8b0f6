"""Loading causal LMs: the embedded default, a local directory, or a hub id.

`load_model` returns a `LoadedModel`: the model, its tokenizer and a
`ModelIdentity` that names exactly which weights these are (a fingerprint of the
parameters), so caches and results can refer to them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from editdecay.core.arch import arch_for, num_layers
from editdecay.core.cache import Cache
from editdecay.core.devices import input_device
from editdecay.core.embedded import EMBEDDED_NAME
from editdecay.core.errors import ConfigError, EditDecayError
from editdecay.core.paths import looks_like_path
from editdecay.core.placement import DEFAULT_DEVICE, resolve_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class ModelIdentity:
    name: str             # what the user asked for
    source: str           # resolved local directory or hub id
    model_type: str
    family: str
    n_layers: int
    fingerprint: str      # sha256 over parameter names, shapes, dtypes and bytes (first 16 hex)
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def weights_fingerprint(model: nn.Module) -> str:
    """Content hash of every parameter and buffer-free state (names, shapes, dtypes, bytes).

    Identifies the weights actually in memory, so an edited model differs from its base.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    identity: ModelIdentity

    @property
    def device(self) -> torch.device:
        """Where input ids go (the input embedding's device); a spread model has more (core.devices)."""
        return input_device(self.model)


def identity_of(model: nn.Module, name: str, source: str) -> ModelIdentity:
    spec = arch_for(model)
    return ModelIdentity(
        name=name, source=source, model_type=model.config.model_type, family=spec.family,
        n_layers=num_layers(model), fingerprint=weights_fingerprint(model),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def check_same_weights(identity: ModelIdentity, recorded: dict | None, what: str) -> None:
    """Raise EditDecayError if `recorded` (a stored ModelIdentity dict) names other weights than `identity`:
    `what` (a statistics stage, a fine-tuning run, ...) was computed on another model."""
    want = (recorded or {}).get("fingerprint")
    if want and want != identity.fingerprint:
        raise EditDecayError(f"{what} was computed on model weights {want}, but {identity.source} now holds "
                             f"weights {identity.fingerprint}; the model changed: use a new output directory")


def wrap(model: nn.Module, tokenizer, name: str = "in-memory", source: str = "in-memory") -> LoadedModel:
    """Wrap an already built model (tests, notebooks) with an identity."""
    model.eval()
    return LoadedModel(model, tokenizer, identity_of(model, name, source))


def resolve_source(name: str, cache: Cache | None = None) -> str:
    """Map a model name to a local directory (embedded model: converted once into the cache)."""
    if name == EMBEDDED_NAME:
        from editdecay.core.embedded import ensure_embedded_model

        return str(ensure_embedded_model(cache or Cache.default()))
    return name


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_weight_files(name: str, local: Path, allow_pickle: bool) -> None:
    """A local directory whose weights are pickled only is refused unless `allow_pickle` (names the files)."""
    if any(local.glob("*.safetensors")) or allow_pickle:
        return
    pickled = sorted(p.name for p in local.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise ConfigError(f"model {name!r}: {local} holds pickled weights only ({', '.join(pickled[:3])}); "
                          f"unpickling can run code, so editdecay loads safetensors by default: convert the "
                          f"checkpoint (model.save_pretrained(dir, safe_serialization=True)) or pass "
                          f"--allow-pickle if you trust these files")


def load_model(
    name: str = EMBEDDED_NAME,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | dict = DEFAULT_DEVICE,
    cache: Cache | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `name`: "smollm2-135m" (embedded; no network), a local directory with a
    Hugging Face model, or a hub id (needs network or a populated HF cache).
    A name that exists on disk, or looks like a path (starts with /, ., ~ or has
    more than one /), is a local directory; any other name is read as a hub id.
    Weights load from safetensors only; pickled weights (.bin/.pt, which can run
    code when unpickled) load only with `allow_pickle=True` (CLI --allow-pickle).
    Remote code runs only with `trust_remote_code=True`.
    Raises ConfigError naming the path/id and what was tried (missing directory,
    unknown hub id, pickled weights not allowed, quantised config).
    `device`: "auto" (default: CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ... puts the
    whole model on one device; "balanced" spreads it over the visible GPUs (then CPU) with accelerate's
    device map; a dict {module name: device} is an explicit accelerate device map. With a map,
    editdecay sends every tensor to the device of the module it meets (core.devices).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    source = resolve_source(name, cache)
    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        raise ConfigError(f"model {name!r}: {local} is a file; give a directory holding config.json and weights")
    if local.is_dir() and not (local / "config.json").exists():
        raise ConfigError(f"model {name!r}: {local} has no config.json; is it a Hugging Face model directory?")
    if not local.exists() and looks_like_path(source):
        raise ConfigError(f"model {name!r}: no such directory {local.resolve()}; as a local Hugging Face directory "
                          f"it does not exist, and a path is not a hub id (hub ids are NAME or ORG/NAME)")
    if local.is_dir():
        from editdecay.core.files import MAX_RECORD_BYTES, read_json

        read_json(local / "config.json", f"model {name!r}: config", limit=MAX_RECORD_BYTES, expect=dict)
        _check_weight_files(name, local, allow_pickle)
    reading = (f"the local directory {local}" if local.is_dir() else
               f"the hub id {source!r} (there is no local directory {local.resolve()})")
    kw = dict(trust_remote_code=trust_remote_code, revision=revision)
    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except OSError as e:
        raise ConfigError(f"model {name!r}: cannot load {reading}: {_first_line(e)}; give an existing local "
                          f"directory or a hub id that is reachable or in the Hugging Face cache") from None
    except (ValueError, KeyError) as e:       # transformers' words for remote code and unknown model types
        if "trust_remote_code" in str(e):
            raise ConfigError(f"model {name!r}: {reading} needs its own Python code (auto_map in its config); "
                              f"editdecay runs a checkpoint's code only when asked: --trust-remote-code "
                              f"(grid files: trust_remote_code: true), if you trust it") from None
        raise ConfigError(f"model {name!r}: the config of {reading} cannot be read: {_first_line(e)}") from None
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        # Editing adds float deltas in place and fine-tuning casts and saves weights: a model transformers
        # treats as quantised breaks both (.half()/.float()/save_pretrained raise).
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise ConfigError(f"model {name!r}: the config of {source} declares quantization_config (quant_method "
                          f"{method!r}); editdecay edits and fine-tunes plain float weights: give an unquantised "
                          f"checkpoint (if the weights are already float, remove quantization_config from "
                          f"config.json)")
    arch_for_type = getattr(config, "model_type", "?")
    from editdecay.core.arch import arch_for_model_type

    arch_for_model_type(arch_for_type)  # fail before loading weights
    device = resolve_device(device)
    device_map = device if isinstance(device, dict) or device == "balanced" else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     use_safetensors=None if allow_pickle else True,
                                                     device_map=device_map, **kw)
    except OSError as e:
        hint = "" if allow_pickle else ("; only safetensors weights load unless pickled weights are allowed "
                                        "(--allow-pickle)")
        raise ConfigError(f"model {name!r}: cannot load {reading}: {_first_line(e)}{hint}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, identity_of(model, name, source))
