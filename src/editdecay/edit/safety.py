"""No silent damage: checks that make an edit fail with a named error instead of writing a destructive patch.

- E1 statistics (`check_statistics`): C_l must be averaged over at least d_k non-padding tokens
  and be numerically full rank; otherwise E4's lambda C + K K^T is (near) singular and E5's null
  space P covers directions the statistics never saw, and the edit damages the model (on the
  embedded model, 3 MEMIT edits with 1,000 tokens at d_k = 1,536 raised its perplexity on plain
  English from 11.9 to about 11 million). Fewer than `RECOMMENDED_TOKENS_PER_KEY_DIM` x d_k tokens
  is a judgement call: a warning, recorded in the result and the patch.
- Non-finite values (statistics, projectors, keys, targets, deltas) go through `core.checks.check_finite`,
  the same check the grid uses.
"""

from __future__ import annotations

import logging

import torch

from editdecay.core.errors import StatisticsError

log = logging.getLogger(__name__)

RECOMMENDED_TOKENS_PER_KEY_DIM = 10     # below 10 x d_k statistics tokens: a warning
_EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def numerical_rank(C: torch.Tensor) -> tuple[int, float]:
    """(rank, tolerance) of a symmetric PSD second-moment matrix C (d_k, d_k).

    C is first scaled to unit diagonal (D^-1/2 C D^-1/2, D = diag C): float32 accumulation errs in
    each entry relative to sqrt(C_ii C_jj), so after scaling the round-off is uniform and one key
    dimension with a huge scale (a "massive activation") cannot hide the others. Eigenvalues
    (float64, `eigvalsh`) above tol = lambda_max * d_k * eps count, eps being the machine epsilon of
    C's dtype (the E1 accumulation dtype): the rule of `torch.linalg.matrix_rank` on the scaled
    matrix. Dimensions with C_ii <= 0 (keys that are always zero) add nothing to the rank.
    Measured on the embedded model (d_k = 1,536, generated text): 1,000 tokens -> rank 893-943;
    1,600 -> 1,152-1,250; 3,000 and 20,000 -> 1,536.
    """
    eps = _EPS.get(C.dtype, torch.finfo(torch.float32).eps)
    C64 = C.to(torch.float64)
    C64 = (C64 + C64.T) / 2
    d = C64.diagonal()
    live = d > 0
    if not bool(live.any()):
        return 0, 0.0
    sub = C64[live][:, live]
    scale = d[live].rsqrt()
    eig = torch.linalg.eigvalsh(sub * scale[:, None] * scale[None, :])
    tol = float(eig.max().clamp_min(0)) * C.shape[0] * eps
    return int((eig > tol).sum()), tol


def check_statistics(stats, layers, *, modules: dict[int, str] | None = None,
                     devices: dict[int, torch.device] | None = None) -> list[str]:
    """Raise StatisticsError if some C_l cannot support an edit; return warnings for judgement calls.

    `stats`: an `edit.stats.LayerStats`. For each layer l, with d_k = C_l's width and N the
    non-padding tokens it was averaged over:
      N < d_k                     -> StatisticsError (C_l has rank <= N < d_k)
      numerical rank(C_l) < d_k   -> StatisticsError (rank, N and the minimum to use in the message)
      N < 10 d_k                  -> a warning (returned and logged)
    `devices[l]` (optional) is where the rank's eigenvalues are computed (the layer's device).
    """
    used = stats.provenance.get("n_tokens_used", {})
    warnings: list[str] = []
    low: list[tuple[int, int, int]] = []          # (layer, N, 10 x d_k)
    for l in layers:
        C = stats[l]
        d_k = int(C.shape[0])
        n = int(used.get(str(l), stats.n_tokens_used))
        where = f"E1 statistics, layer {l}" + (f" ({modules[l]})" if modules and l in modules else "")
        recommended = RECOMMENDED_TOKENS_PER_KEY_DIM * d_k
        advice = (f"use --stats-tokens (field stats_tokens) of at least {d_k:,} (= d_k); "
                  f"{recommended:,} (10 x d_k) or more is recommended")
        if n < d_k:
            raise StatisticsError(
                f"{where}: C was averaged over {n:,} non-padding tokens, fewer than the key width d_k = {d_k:,}, "
                f"so its rank is at most {n:,} of {d_k:,}; an edit would write into key directions the statistics "
                f"never saw and damage the model: {advice}")
        device = (devices or {}).get(l, C.device)
        rank, tol = numerical_rank(C.to(device))
        if rank < d_k:
            raise StatisticsError(
                f"{where}: C is numerically rank-deficient: rank {rank:,} of d_k = {d_k:,} from {n:,} non-padding "
                f"tokens (eigenvalues of the unit-diagonal C below {tol:.2g} count as zero; tokens of one text are "
                f"correlated, so N > d_k is not enough); the E4/E5 solve would be unreliable and the edit "
                f"destructive. Use more (and more varied) statistics text: --stats-tokens (field stats_tokens) of "
                f"at least {2 * n:,}; {recommended:,} (10 x d_k) or more is recommended")
        if n < recommended:
            low.append((l, n, recommended))
    if low:
        layers_text = ", ".join(str(l) for l, _, _ in low)
        n, recommended = min(x[1] for x in low), max(x[2] for x in low)
        msg = (f"E1 statistics of layer(s) {layers_text}: {n:,} tokens, fewer than {RECOMMENDED_TOKENS_PER_KEY_DIM} "
               f"x d_k = {recommended:,}; C is a rough estimate and the edit may disturb unrelated knowledge more "
               f"than with the reference statistics (use --stats-tokens {recommended:,} or more)")
        log.warning(msg)
        warnings.append(msg)
    return warnings


__all__ = ["RECOMMENDED_TOKENS_PER_KEY_DIM", "check_statistics", "numerical_rank"]
