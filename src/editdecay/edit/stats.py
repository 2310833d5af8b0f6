"""Key second-moment statistics (docs/METHODS.md E1) and AlphaEdit null-space projectors (E5).

Shared by MEMIT (lambda * C_l in E4) and AlphaEdit (P_l built from C_l in E5):

    C_l = (1/N) sum_t k_t k_t^T        k_t = input of W_out at layer l, t over N non-padding tokens

One forward pass collects every requested layer at once and is cut short right
after the last requested layer's W_out (`hooks.capture_inputs(stop_after=...)`):
nothing later in the network is needed. Each C_l is cached on disk, one
safetensors file per (model fingerprint, layer, module, corpus identity, token
count, dtype), written atomically; a later call with the same arguments reads
the files and runs no forward pass. When only some layers are cached, the pass
runs over the missing ones only and stops after the last missing layer.

Accumulation dtype: `dtype="float32"` (the default, as in the reference code)
or `"float64"` (fine on CPU; on a GPU it is slower and the accumulator takes
twice the memory). Keys are cast to that dtype before the k^T k product, so a
bf16/fp16 model still accumulates in float32. Padding positions are dropped by
boolean indexing with the attention mask (not by multiplying with it, which
would let a NaN at a padded position poison the sum).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from editdecay.core.arch import arch_for, check_layers, resolve_name
from editdecay.core.cache import Cache, atomic_write_bytes, stable_hash
from editdecay.core.devices import input_device
from editdecay.core.errors import ConfigError, DataError
from editdecay.core.hooks import capture_inputs, run_until_stop
from editdecay.core.memory import memory_guard
from editdecay.core.models import LoadedModel
from editdecay.core.tokens import pad_batch, pad_id
from editdecay.data.corpus import CorpusSpec, iter_token_chunks

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1
ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class StatsKey:
    """Everything that determines one C_l: the cache key of one statistics file."""

    model: str          # weight fingerprint of the model (ModelIdentity.fingerprint)
    family: str         # architecture family, for readable paths
    layer: int
    module: str         # full name of W_out, e.g. "model.layers.3.mlp.down_proj"
    corpus: str         # stable_hash of CorpusSpec.identity(...)
    n_tokens: int       # tokens requested
    dtype: str          # accumulation dtype
    version: int = STATS_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def parts(self) -> tuple[str, ...]:
        """Relative cache path of the statistics file."""
        return ("stats", f"{self.family}-{self.model}", f"corpus-{self.corpus}",
                f"{self.module}.n{self.n_tokens}.{self.dtype}.v{self.version}.safetensors")

    def projector_parts(self, threshold: float) -> tuple[str, ...]:
        """Relative cache path of the E5 projector built from this C_l with `threshold`."""
        *head, name = self.parts()
        return (*head, name.removesuffix(".safetensors") + f".nullspace-{float(threshold)!r}.safetensors")


@dataclass(frozen=True)
class LayerStats:
    """C_l per layer (CPU tensors, (d_k, d_k), accumulation dtype) and where they came from."""

    moments: dict[int, torch.Tensor]   # layer -> C_l
    n_tokens_used: int                 # N: non-padding tokens actually averaged over
    keys: dict[int, StatsKey]          # layer -> cache key (also keys the E5 projector)
    provenance: dict = field(default_factory=dict)   # JSON-ready: corpus, tokens, dtype, model, modules, cache hits
    # Tensors derived from these C_l in this process, by what they depend on, e.g. ("nullspace", layer,
    # threshold) -> P_l: a second editor of the same statistics reads them here instead of from disk.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, layer: int) -> torch.Tensor:
        try:
            return self.moments[layer]
        except KeyError:
            raise ConfigError(f"layer {layer}: no statistics collected; layers present: {sorted(self.moments)}") from None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.moments))


def _check_dtype(dtype: str) -> torch.dtype:
    try:
        return ACCUMULATION_DTYPES[dtype]
    except (KeyError, TypeError):
        raise ConfigError(f"dtype: {dtype!r} is not an accumulation dtype; use one of {sorted(ACCUMULATION_DTYPES)}") from None


# --------------------------------------------------------------------------- cache files

def _load_tensor(path: Path, key_json: str, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict] | None:
    """Read a cached square matrix if it is complete and was written for exactly this key.

    A truncated or foreign file is reported and treated as missing (then recomputed and
    replaced). safetensors never unpickles, so a tampered file cannot run code.
    """
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key_json:
                log.warning("cache file %s belongs to another key; ignoring it", path)
                return None
            t = f.get_tensor(name)
    except Exception as e:  # SafetensorError, OSError: incomplete or damaged file
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None
    if t.dtype != dtype or t.dim() != 2 or t.shape[0] != t.shape[1] or not bool(torch.isfinite(t).all()):
        log.warning("cache file %s holds a %s tensor of shape %s; expected square %s; ignoring it",
                    path, t.dtype, tuple(t.shape), dtype)
        return None
    return t, meta


def _save_tensor(path: Path, name: str, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({name: tensor.contiguous()}, metadata=metadata))


# --------------------------------------------------------------------------- E1

def _batched(chunks: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for chunk in chunks:
        batch.append(chunk)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def accumulate_second_moments(lm: LoadedModel, layers: tuple[int, ...], chunks: Iterable[list[int]], *,
                              dtype: torch.dtype = torch.float32, batch_size: int = 16,
                              progress_total: int | None = None, progress: bool = True,
                              into: dict[int, torch.Tensor] | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """Sums S_l = sum_t k_t k_t^T over the non-padding tokens of `chunks`, all `layers` in one pass.

    Returns ({layer: S_l on the device of W_out(layer), `dtype`}, N). The pass stops right
    after the last layer's W_out. Sequences are right-padded, so with a causal model a
    real token never sees padding and its key does not depend on the batch.
    `into`: sums to continue (added to in place, in the same order a single pass would add), so
    accumulating a stream in segments of whole batches gives the bit-identical sums of one pass.
    N counts the tokens of `chunks` only.
    """
    from tqdm.auto import tqdm

    model = lm.model
    spec = arch_for(model)
    layers = tuple(sorted(set(layers)))          # the stop hook goes on the deepest one
    names = [resolve_name(model, spec.mlp_out_name(l)) for l in layers]
    device = input_device(model)
    pad = pad_id(lm.tokenizer) if lm.tokenizer is not None else 0
    sums: dict[int, torch.Tensor] = into if into is not None else {}
    n = 0
    with tqdm(total=progress_total, desc="E1 key statistics", unit="tok", disable=not progress, leave=False) as bar:
        # The hooks are installed per batch, never while `chunks` is advanced: a generated
        # corpus runs the same model (generate) lazily, and must not meet the stop hook.
        for seqs in _batched(chunks, batch_size):
            batch = pad_batch(seqs, pad, side="right").to(device)
            # A batch that does not fit raises DeviceMemoryError naming the stage and the batch (core.memory).
            with memory_guard("E1 statistics", len(seqs), None, device):
                with capture_inputs(model, names, stop_after=names[-1]) as store:
                    run_until_stop(model, **batch.model_inputs())
                mask = batch.attention_mask.bool()                   # (B, T)
                for layer, name in zip(layers, names):
                    x = store[name]                                  # on the device of W_out(layer)
                    k = x[mask.to(x.device)].to(dtype)               # (n_b, d_k): keys of real tokens
                    if layer not in sums:
                        sums[layer] = torch.zeros(k.shape[1], k.shape[1], dtype=dtype, device=k.device)
                    sums[layer].addmm_(k.T, k)                       # += K^T K, (d_k, d_k)
            n_b = int(mask.sum())
            n += n_b
            bar.update(n_b)
    if n == 0 and into is None:
        raise DataError("E1 key statistics: the corpus gave no tokens")
    return sums, n


def second_moments(lm: LoadedModel, layers: Iterable[int], *, corpus: CorpusSpec, n_tokens: int,
                   dtype: str = "float32", cache: Cache | None = None, batch_size: int = 16,
                   progress: bool = True) -> LayerStats:
    """E1: C_l = (1/N) sum_t k_t k_t^T for every layer in `layers`, from cache where possible.

    `n_tokens` tokens of `corpus` are used (fewer only if the corpus is shorter; the
    count actually used is `LayerStats.n_tokens_used`). With `cache`, layers already
    on disk are read (no forward pass at all if every layer is there); the missing
    ones are computed in one pass, under per-layer file locks so two processes never
    compute the same file, and written atomically. Results are on the CPU.
    """
    acc_dtype = _check_dtype(dtype)
    if not (isinstance(n_tokens, int) and n_tokens >= 1):
        raise ConfigError(f"n_tokens: {n_tokens!r}; give a positive integer")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size: {batch_size!r}; give a positive integer")
    model = lm.model
    layers = check_layers(model, list(layers))
    spec = arch_for(model)
    corpus_identity = corpus.identity(lm)
    corpus_hash = stable_hash(corpus_identity)
    keys = {l: StatsKey(model=lm.identity.fingerprint, family=spec.family, layer=l,
                        module=resolve_name(model, spec.mlp_out_name(l)), corpus=corpus_hash,
                        n_tokens=n_tokens, dtype=dtype) for l in layers}

    moments: dict[int, torch.Tensor] = {}
    used: dict[int, int] = {}
    origin: dict[int, str] = {}

    def read_cached(wanted: Iterable[int]) -> None:
        for l in wanted:
            hit = _load_tensor(cache.path(*keys[l].parts()), keys[l].to_json(), "C", acc_dtype)
            if hit is not None:
                moments[l], used[l], origin[l] = hit[0], int(hit[1]["n_tokens_used"]), "cache"

    if cache is not None:
        read_cached(layers)
    t0 = time.perf_counter()
    missing = [l for l in layers if l not in moments]
    if missing:
        with contextlib.ExitStack() as locks:
            if cache is not None:
                for l in missing:               # sorted order: no deadlock between processes
                    locks.enter_context(cache.lock(*keys[l].parts()))
                read_cached(missing)            # another process may have finished meanwhile
                missing = [l for l in layers if l not in moments]
            if missing:
                chunks = iter_token_chunks(corpus, lm, n_tokens, cache=cache, progress=progress)
                sums, n = accumulate_second_moments(lm, tuple(missing), chunks, dtype=acc_dtype, batch_size=batch_size,
                                                    progress_total=n_tokens, progress=progress)
                for l in missing:
                    C = (sums[l] / n).cpu()                                   # (d_k, d_k)
                    moments[l], used[l], origin[l] = C, n, "computed"
                    if cache is not None:
                        _save_tensor(cache.path(*keys[l].parts()), "C", C, {
                            "key": keys[l].to_json(), "n_tokens_used": str(n),
                            "corpus_identity": json.dumps(corpus_identity, sort_keys=True),
                            "corpus": corpus.describe(), "equation": "E1",
                        })
    if len(set(used.values())) > 1:
        log.warning("statistics of layers %s were averaged over different token counts %s "
                    "(a cached generated corpus sampled on another device?)", layers, used)
    provenance = {
        "equation": "E1",
        "model": lm.identity.to_dict(),
        "corpus": corpus.describe(),
        "corpus_spec": corpus.to_dict(),
        "corpus_identity": corpus_identity,
        "n_tokens_requested": n_tokens,
        "n_tokens_used": {str(l): used[l] for l in layers},
        "dtype": dtype,
        "modules": {str(l): keys[l].module for l in layers},
        "source": {str(l): origin[l] for l in layers},
        "compute_seconds": round(time.perf_counter() - t0, 3),
    }
    return LayerStats(moments={l: moments[l] for l in layers}, n_tokens_used=min(used.values()), keys=keys,
                      provenance=provenance)


# --------------------------------------------------------------------------- E5 projector

def null_space_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """E5: P = U0 U0^T, U0 = eigenvectors of C with eigenvalue < threshold.

    C is symmetric PSD, so `eigh` (not a general SVD) in float64; C is symmetrised
    first so float32 round-off cannot make it look asymmetric. P projects onto the
    directions the generic keys barely use; AlphaEdit confines its update to them.
    (The AlphaEdit code thresholds the singular values of an SVD of C; for a symmetric
    PSD matrix they are its eigenvalues, so the same threshold values apply.)
    Returned in C's dtype, shape (d_k, d_k).
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ConfigError(f"C: expected a square (d_k, d_k) matrix, got shape {tuple(C.shape)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ConfigError(f"nullspace_threshold: {threshold!r}; give a finite number > 0 (AlphaEdit uses 2e-2)")
    C64 = C.to(torch.float64)
    C64 = (C64 + C64.T) / 2
    eigvals, U = torch.linalg.eigh(C64)          # ascending; U: (d_k, d_k), columns are eigenvectors
    U0 = U[:, eigvals < threshold]               # (d_k, r)
    return (U0 @ U0.T).to(C.dtype)               # (d_k, d_k)


def cached_projector(stats: LayerStats, layer: int, threshold: float, cache: Cache | None = None) -> torch.Tensor:
    """The E5 projector of one layer: from `stats.derived`, else read from or written to the cache beside C_l.

    Keyed like the statistics (model, layer, module, corpus, token count, dtype) plus
    the threshold, since P depends only on the base model and its statistics.
    """
    memo = ("nullspace", layer, float(threshold))
    if memo not in stats.derived:
        stats.derived[memo] = _projector(stats, layer, threshold, cache)
    return stats.derived[memo]


def _projector(stats: LayerStats, layer: int, threshold: float, cache: Cache | None) -> torch.Tensor:
    C = stats[layer]
    if cache is None:
        return null_space_projector(C, threshold)
    key = stats.keys[layer]
    parts = key.projector_parts(threshold)
    key_json = json.dumps({"stats": json.loads(key.to_json()), "threshold": float(threshold)}, sort_keys=True)
    hit = _load_tensor(cache.path(*parts), key_json, "P", C.dtype)
    if hit is not None:
        return hit[0]
    with cache.lock(*parts):
        hit = _load_tensor(cache.path(*parts), key_json, "P", C.dtype)
        if hit is not None:
            return hit[0]
        P = null_space_projector(C, threshold)
        _save_tensor(cache.path(*parts), "P", P, {"key": key_json, "equation": "E5",
                                                  "rank": str(int(round(float(P.diagonal().sum()))))})
    return P


__all__ = ["ACCUMULATION_DTYPES", "LayerStats", "StatsKey", "accumulate_second_moments", "cached_projector",
           "null_space_projector", "second_moments"]
