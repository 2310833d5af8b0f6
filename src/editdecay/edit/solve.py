"""The two closed-form solves (E4, E5). Shapes: K (d_k, n), R (d, n), C and P (d_k, d_k); Delta (d, d_k)."""

from __future__ import annotations

import torch


def memit_delta(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float, dtype=torch.float64) -> torch.Tensor:
    """E4: Delta = R K^T (lam C + K K^T)^-1, via solve((lam C + K K^T), K) (symmetric A, no inverse)."""
    K, R, C = K.to(dtype), R.to(dtype), C.to(device=K.device, dtype=dtype)
    A = lam * C + K @ K.T                                   # (d_k, d_k)
    X = torch.linalg.solve(A, K)                            # (d_k, n) = A^-1 K
    return R @ X.T                                          # (d, d_k)


def alphaedit_delta(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, C_p: torch.Tensor, L2: float,
                    dtype=torch.float64) -> torch.Tensor:
    """E5: solve (P (K K^T + C_p) + L2 I) X = P K R^T; Delta = X^T. X lies in range(P), so Delta (I - P) = 0."""
    K, R = K.to(dtype), R.to(dtype)
    P, C_p = P.to(device=K.device, dtype=dtype), C_p.to(device=K.device, dtype=dtype)
    eye = torch.eye(K.shape[0], dtype=dtype, device=K.device)
    X = torch.linalg.solve(P @ (K @ K.T + C_p) + L2 * eye, P @ K @ R.T)   # (d_k, d)
    return X.T                                                             # (d, d_k)
