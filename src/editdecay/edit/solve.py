"""The two closed-form solves (E4 lambda-weighted, E5 null-space projected) and the key Gram matrix of E5's
C_p, batched over key columns.

Shapes: K (d_k, n) keys, R (d, n) residuals, C, P, C_p (d_k, d_k); Delta (d, d_k).
K and R may live anywhere (the editing run keeps them on the CPU: O(n) host
bookkeeping); the work runs on `device` (the device of the edited module) and
reads K and R in column blocks, so device memory does not grow with n.

Precision rule:
- The d_k x d_k system (lambda C + K K^T for E4, P (K K^T + C_p) + L2 I for E5) is
  formed, factorised (LU with partial pivoting, never an explicit inverse) and
  solved in `dtype` (float64 by default, the spec's choice) on `device`: it is
  independent of n and of the hidden size d, and is where precision matters.
  K K^T is accumulated in `dtype` from column blocks of K.
- Weight-sized products (Delta = R X^T, (d, d_k)) are formed in float32 on
  accelerators (CUDA and others): float32 is what the patch stores and what is
  added to the weights, so a float64 copy of a full weight matrix on the GPU
  buys nothing. On the CPU they stay in `dtype`.
- The solves' outputs are float32 on accelerators, `dtype` on the CPU.
"""

from __future__ import annotations

import torch

from editdecay.core.memory import memory_guard, note_batch, plan_batch_size

SOLVE_CPU_BLOCK = 4096      # key columns per block on the CPU (no memory query there)


def output_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """dtype of weight-sized results on `device` (precision rule above)."""
    return dtype if torch.device(device).type == "cpu" else torch.float32


def _elt(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _blocks(stage: str, K: torch.Tensor, d: int, dtype, device, block_size: int | None, extra_per_col: int = 0):
    """Column slices of K sized from free memory: per column a K block column, its solve and R's column."""
    d_k, n = K.shape
    per_col = 3 * d_k * _elt(dtype) + d * 4 + extra_per_col
    size = plan_batch_size(stage, n_items=n, bytes_per_item=per_col, device=device, explicit=block_size,
                           cpu_default=SOLVE_CPU_BLOCK)
    blocks = [slice(s, min(s + size, n)) for s in range(0, n, size)]
    for cols in blocks:
        note_batch(stage, cols.stop - cols.start, per_col)
    return blocks, size, per_col


def key_gram(K: torch.Tensor, *, dtype=torch.float64, device=None, block_size: int | None = None,
             out: torch.Tensor | None = None, stage: str = "E5 C_p (K K^T)") -> torch.Tensor:
    """K K^T (d_k, d_k) in `dtype` on `device` (default: K's), accumulated over column blocks of K.

    With `out` (a (d_k, d_k) tensor on `device`, `dtype`), the product is added to it in place.
    Raises DeviceMemoryError naming the stage when a block does not fit.
    """
    device = torch.device(device) if device is not None else K.device
    d_k, n = K.shape
    if out is None:
        with memory_guard(stage, n, d_k * d_k * _elt(dtype), device):
            out = torch.zeros(d_k, d_k, dtype=dtype, device=device)
    blocks, size, per_col = _blocks(stage, K, 0, dtype, device, block_size)
    for cols in blocks:
        with memory_guard(stage, size, size * per_col, device):
            Kj = K[:, cols].to(device=device, dtype=dtype)
            out.addmm_(Kj, Kj.T)
    return out


def memit_delta(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, dtype=torch.float64, *,
                device=None, block_size: int | None = None) -> torch.Tensor:
    """E4: Delta = R K^T (lam C + K K^T)^-1 = R X^T with X = A^-1 K, A = lam C + K K^T symmetric.

    A is LU-factorised once in `dtype`; X is solved and R X^T accumulated block by block of key columns.
    Returns (d, d_k) on `device` (default: K's) in `output_dtype(device, dtype)`.
    Raises DeviceMemoryError (stage 'E4 solve') when the system or a block does not fit.
    """
    device = torch.device(device) if device is not None else K.device
    d_k, n = K.shape
    sys_bytes = 3 * d_k * d_k * _elt(dtype)                                   # A, its LU factor, C's copy
    with memory_guard("E4 solve", n, sys_bytes, device):
        A = C.to(device=device, dtype=dtype, copy=True).mul_(lam)                  # (d_k, d_k)
        key_gram(K, dtype=dtype, device=device, block_size=block_size, out=A, stage="E4 solve")
        LU, pivots = torch.linalg.lu_factor(A)
        del A
    return _apply_solve(LU, pivots, K, R, None, dtype, device, block_size, "E4 solve")


def nullspace_delta(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, C_p: torch.Tensor, L2: float,
                    dtype=torch.float64, *, device=None, block_size: int | None = None) -> torch.Tensor:
    """E5: solve (P (K K^T + C_p) + L2 I) X = P K R^T and return Delta = X^T, i.e. Delta = R Y^T with
    Y = A^-1 P K (the same X = Y R^T, solved for n columns instead of d). From A X = P B,
    X = P (B - (K K^T + C_p) X) / L2 lies in range(P), so Delta (I - P) = 0; equal to the paper's form
    Delta = R K^T P ((K K^T + C_p) P + L2 I)^-1.

    Returns (d, d_k) on `device` (default: K's) in `output_dtype(device, dtype)`.
    Raises DeviceMemoryError (stage 'E5 solve') when the system or a block does not fit.
    """
    device = torch.device(device) if device is not None else K.device
    d_k, n = K.shape
    sys_bytes = 4 * d_k * d_k * _elt(dtype)                                   # P, K K^T + C_p, A, its LU factor
    with memory_guard("E5 solve", n, sys_bytes, device):
        P = P.to(device=device, dtype=dtype)                                       # (d_k, d_k)
        M = C_p.to(device=device, dtype=dtype, copy=True)
        key_gram(K, dtype=dtype, device=device, block_size=block_size, out=M, stage="E5 solve")
        A = P @ M                                                                  # P (K K^T + C_p)
        del M
        A.diagonal().add_(L2)
        LU, pivots = torch.linalg.lu_factor(A)
        del A
    return _apply_solve(LU, pivots, K, R, P, dtype, device, block_size, "E5 solve")


def _apply_solve(LU, pivots, K, R, P, dtype, device, block_size, stage) -> torch.Tensor:
    """sum over column blocks j of R_j (A^-1 [P] K_j)^T, in `output_dtype` on `device`."""
    d_k, d = K.shape[0], R.shape[0]
    out_dtype = output_dtype(device, dtype)
    with memory_guard(stage, K.shape[1], d * d_k * _elt(out_dtype), device):
        delta = torch.zeros(d, d_k, dtype=out_dtype, device=device)
    blocks, size, per_col = _blocks(stage, K, d, dtype, device, block_size)
    for cols in blocks:
        with memory_guard(stage, size, size * per_col, device):
            Kj = K[:, cols].to(device=device, dtype=dtype)                         # (d_k, b)
            rhs = P @ Kj if P is not None else Kj
            Xj = torch.linalg.lu_solve(LU, pivots, rhs)                            # (d_k, b) = A^-1 [P] K_j
            delta.addmm_(R[:, cols].to(device=device, dtype=out_dtype), Xj.T.to(out_dtype))
    return delta


__all__ = ["SOLVE_CPU_BLOCK", "key_gram", "memit_delta", "nullspace_delta", "output_dtype"]
