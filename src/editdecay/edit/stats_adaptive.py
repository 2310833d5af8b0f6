"""E1 statistics as long as they matter: doubling chunk counts until the edit no longer changes.

The reference settings average C_l over ~44M tokens per layer (36-40 h on one GPU at 7B); a small fraction
suffices (FastMEMIT, arXiv 2506.04226). What matters is not C_l itself but what the solve does with it.
So the pass runs in doubling segments of the same token stream (c0, 2 c0, 4 c0, ... chunks) and after each
one measures the quantity the editor uses, for the keys of the requests being edited (E2, unedited model):

    MEMIT (E4):      X(C) = (lambda C + K K^T)^-1 K            (d_k, n): the solve's map from residuals to deltas
    AlphaEdit (E5):  X(C) = P(C) K                              the edit keys projected on C's null space

The delta of each layer is R X^T. The pass stops when the change of the delta *where it acts* is below
`tolerance` (or at `max_tokens`): on the edit keys (X^T K) and on generic keys (X weighted by C), relative
to the newer checkpoint (`EditProbe.change`). The plain ||X(C_2c) - X(C_c)|| / ||X(C_2c)|| is dominated by C's
smallest eigenvalues, which a corpus estimates slowly and which no key visits; on the embedded model it is
still ~25 % per doubling at 150k tokens (benchmarks/adaptive_stats.py).

Checkpoints are whole multiples of the batch, and the sums continue in place
(`accumulate_second_moments(into=...)`), so the statistics at a checkpoint of N tokens are bit-identical to
a fixed-count run of N tokens (the first N tokens of the same stream): each checkpoint is cached under that
fixed-count key (`StatsKey(n_tokens=N)`), and a fixed-count run of N tokens, or a later adaptive run, reads
it. A fixed token count (`stats_tolerance=None`) is the original procedure, unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from editdecay.core.arch import arch_for, check_layers, resolve_name
from editdecay.core.cache import Cache, stable_hash
from editdecay.core.errors import ConfigError
from editdecay.core.models import LoadedModel
from editdecay.data.corpus import CorpusSpec, iter_token_chunks
from editdecay.edit.stats import (
    LayerStats,
    StatsKey,
    _check_dtype,
    _load_tensor,
    _save_tensor,
    accumulate_second_moments,
)

log = logging.getLogger(__name__)

# Measured on the embedded model (benchmarks/adaptive_stats.py, docs/adaptive_stats_embedded.json; 20-edit MEMIT
# patch, local text corpus): the change per doubling falls only like a Monte Carlo error (1.32 at 17k tokens,
# 0.80 at 32k, 0.70 at 87k, 0.37 at 156k); at 0.5 the pass stops at 156k tokens, whose deltas are 27 % (where
# they act; 14 % plain) from those of 200k tokens, within the tolerance. Tighter tolerances need more than 10x
# today's 20k default on this model; today's 20k default is 95 % (where they act) from the 200k deltas.
DEFAULT_TOLERANCE = 0.5

@dataclass(frozen=True)
class EditProbe:
    """What the convergence measure looks at: X_l(C) for the edit keys K_l, and how much it changed.

    `solve(C, K)` gives X (d_k, n) in float64; `change(new, old)` compares two checkpoints where it counts:
    the edit's effect on the edit keys (X^T K, (n, n)) and on generic keys, weighted by the newer statistics
    (||D^T L||_F with L L^T = C, computed as sqrt(tr(D^T C D))), each relative to the newer value, max over
    layers and the two. Directions that neither the edit keys nor the corpus' keys visit (C's smallest
    eigenvalues) do not count: no key the edited model meets goes there.
    """

    keys: dict[int, torch.Tensor]                  # layer -> K (d_k, n)
    solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    name: str
    device: str | torch.device = "cpu"

    def state(self, C: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for l, c in C.items():
            c64 = c.to(device=self.device, dtype=torch.float64)
            out[l] = (self.solve(c64, self.keys[l].to(device=self.device, dtype=torch.float64)), c64)
        return out

    def change(self, new: dict, old: dict) -> float:
        worst = 0.0
        for l, (X, C) in new.items():
            D = X - old[l][0]                                                    # (d_k, n)
            K = self.keys[l].to(device=X.device, dtype=torch.float64)
            on_keys = float((D.T @ K).norm() / (X.T @ K).norm().clamp_min(1e-300))
            generic = float(torch.sqrt((D * (C @ D)).sum() / (X * (C @ X)).sum().clamp_min(1e-300)))
            worst = max(worst, on_keys, generic)
        return worst


def memit_probe(keys: dict[int, torch.Tensor], lam: float, device="cpu") -> EditProbe:
    """E4: X(C) = (lam C + K K^T)^-1 K (the delta is R X^T). At d_k = 14336 the solve takes tens of seconds on
    a CPU and a fraction of one on a GPU: give the edited module's device."""
    def solve(C: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(lam * C + K @ K.T, K)
    return EditProbe(keys, solve, "MEMIT (lambda C + K K^T)^-1 K (E4)", device)


def projector_probe(keys: dict[int, torch.Tensor], threshold: float, device="cpu") -> EditProbe:
    """E5: X(C) = P(C) K, the edit keys in the null space AlphaEdit confines its update to."""
    from editdecay.edit.stats import null_space_projector

    def solve(C: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return null_space_projector(C, threshold) @ K
    return EditProbe(keys, solve, "AlphaEdit P(C) K (E5)", device)


def checkpoints(start_chunks: int, batch_size: int) -> Iterator[int]:
    """Chunk counts c0, 2 c0, 4 c0, ... with c0 rounded up to whole batches."""
    c = max(batch_size, math.ceil(start_chunks / batch_size) * batch_size)
    while True:
        yield c
        c *= 2


def adaptive_second_moments(lm: LoadedModel, layers: Iterable[int], *, corpus: CorpusSpec, probe: "EditProbe",
                            tolerance: float = DEFAULT_TOLERANCE, max_tokens: int, start_tokens: int | None = None,
                            dtype: str = "float32", cache: Cache | None = None, batch_size: int = 16,
                            progress: bool = True) -> LayerStats:
    """E1 over doubling token counts until `probe` changes by less than `tolerance` (module docstring).

    `max_tokens`: the most tokens used (the fixed-count setting becomes the cap). `start_tokens`: the first
    checkpoint (default: 2 d_k tokens, the least for a well-conditioned C_l, rounded up to whole batches).
    Returns the statistics at the stopping checkpoint; `provenance["adaptive"]` records every checkpoint's
    token count and change, the tolerance and why it stopped. Raises ConfigError on invalid settings.
    """
    acc_dtype = _check_dtype(dtype)
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ConfigError(f"stats_tolerance: {tolerance!r}; give a number in (0, 1), e.g. {DEFAULT_TOLERANCE}")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ConfigError(f"stats_tokens: {max_tokens!r}; give a positive integer (the adaptive pass's cap)")
    model = lm.model
    layers = check_layers(model, list(layers))
    spec = arch_for(model)
    names = {l: resolve_name(model, spec.mlp_out_name(l)) for l in layers}
    d_k = model.get_submodule(names[layers[0]]).weight.shape[1 if not spec.conv1d else 0]
    start = start_tokens or 2 * d_k
    corpus_identity = corpus.identity(lm)
    corpus_hash = stable_hash(corpus_identity)

    def key(l: int, n: int) -> StatsKey:
        return StatsKey(model=lm.identity.fingerprint, family=spec.family, layer=l, module=names[l],
                        corpus=corpus_hash, n_tokens=n, dtype=dtype)

    t0 = time.perf_counter()
    stream = iter_token_chunks(corpus, lm, max_tokens, cache=cache, progress=progress)
    sums: dict[int, torch.Tensor] = {}
    n, taken, history, prev, C = 0, 0, [], None, None
    stopped = "max_tokens"
    for target in checkpoints(max(1, math.ceil(start / corpus.seq_len)), batch_size):
        wanted = target - taken
        segment = _take(stream, wanted)
        taken += len(segment)
        if not segment:
            stopped = "corpus exhausted"
            break
        seg_tokens = sum(len(c) for c in segment)
        cached = _read(cache, [key(l, n + seg_tokens) for l in layers], acc_dtype) if cache is not None else None
        if cached is not None:
            C = dict(zip(layers, cached))
            sums = {l: C[l].to(acc_dtype) * (n + seg_tokens) for l in layers}     # continue from the cached C
            n += seg_tokens
            source = "cache"
        else:
            sums, got = accumulate_second_moments(lm, layers, segment, dtype=acc_dtype, batch_size=batch_size,
                                                  progress=False, into=sums)
            n += got
            C = {l: (sums[l] / n).cpu() for l in layers}
            source = "computed"
            if cache is not None:
                for l in layers:
                    k = key(l, n)
                    _save_tensor(cache.path(*k.parts()), "C", C[l], {
                        "key": k.to_json(), "n_tokens_used": str(n), "equation": "E1",
                        "corpus": corpus.describe(), "adaptive_checkpoint": "true"})
        X = probe.state(C)
        change = probe.change(X, prev) if prev is not None else None
        history.append({"tokens": n, "chunks": taken, "change": change, "source": source,
                        "seconds": round(time.perf_counter() - t0, 3)})
        log.info("E1 adaptive: %d tokens, relative change %s", n, "-" if change is None else f"{change:.2e}")
        if change is not None and change < tolerance:
            stopped = "converged"
            break
        if n >= max_tokens or len(segment) < wanted:
            stopped = "max_tokens" if n >= max_tokens else "corpus exhausted"
            break
        prev = {l: (x, None) for l, (x, _) in X.items()}      # the next change weighs by the newer C only
    if C is None:
        raise ConfigError("E1 adaptive statistics: the corpus gave no tokens")
    keys = {l: key(l, n) for l in layers}
    provenance = {
        "equation": "E1", "model": lm.identity.to_dict(), "corpus": corpus.describe(), "corpus_spec": corpus.to_dict(),
        "corpus_identity": corpus_identity, "n_tokens_requested": max_tokens,
        "n_tokens_used": {str(l): n for l in layers}, "dtype": dtype, "modules": {str(l): names[l] for l in layers},
        "source": {str(l): history[-1]["source"] for l in layers},
        "compute_seconds": round(time.perf_counter() - t0, 3),
        "adaptive": {"tolerance": tolerance, "measure": probe.name, "stopped": stopped, "max_tokens": max_tokens,
                     "tokens_used": n, "checkpoints": history},
    }
    return LayerStats(moments={l: C[l] for l in layers}, n_tokens_used=n, keys=keys, provenance=provenance)


def _take(stream: Iterator[list[int]], k: int) -> list[list[int]]:
    out = []
    for chunk in stream:
        out.append(chunk)
        if len(out) == k:
            break
    return out


def _read(cache: Cache, keys: list[StatsKey], dtype: torch.dtype) -> list[torch.Tensor] | None:
    got = []
    for k in keys:
        hit = _load_tensor(cache.path(*k.parts()), k.to_json(), "C", dtype)
        if hit is None or int(hit[1].get("n_tokens_used", -1)) != k.n_tokens:
            return None
        got.append(hit[0])
    return got


__all__ = ["DEFAULT_TOLERANCE", "EditProbe", "adaptive_second_moments", "checkpoints", "memit_probe",
           "projector_probe"]
