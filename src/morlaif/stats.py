"""Summary statistics written into the stages' metrics files: pure functions, checked against hand values."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mean(xs: Sequence[float]) -> float | None:
    """Arithmetic mean; None for an empty list (a metric with nothing to average is absent, not 0)."""
    return sum(xs) / len(xs) if xs else None


def pairwise_accuracy(r_a, r_b, p_a) -> tuple[float | None, int]:
    """Share of pairs where the reward model picks the label's majority side; label ties (p_a = 0.5) excluded.

    Equal rewards count half (the model did not choose). Returns (accuracy or None when no pair counts, n).
    """
    r_a, r_b, p_a = (torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in (r_a, r_b, p_a))
    keep = (p_a != 0.5) & ~torch.isnan(p_a)
    n = int(keep.sum())
    if n == 0:
        return None, 0
    want = torch.sign(p_a[keep] - 0.5)  # (n,) +1: a preferred
    got = torch.sign(r_a[keep] - r_b[keep])  # (n,)
    hits = (got == want).double() + 0.5 * (got == 0).double()
    return float(hits.mean()), n


def correlation(scores: torch.Tensor) -> list[list[float | None]]:
    """K×K Pearson correlation of the columns of scores (N, K); None where a column has no variance."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    c = s - s.mean(0, keepdim=True)  # (N, K)
    sd = c.pow(2).sum(0).sqrt()  # (K,)
    cov = c.T @ c  # (K, K)
    K = s.shape[1]
    out: list[list[float | None]] = []
    for i in range(K):
        row: list[float | None] = []
        for j in range(K):
            ok = sd[i] > 1e-12 and sd[j] > 1e-12
            row.append(float(cov[i, j] / (sd[i] * sd[j])) if ok else None)
        out.append(row)
    return out


def logistic_regression(X, y, l2: float = 1e-2, iters: int = 50) -> torch.Tensor:
    """Weights w (K,) minimising mean BCE(σ(X w), y) + l2/2 |w|², by Newton's method.

    X (N, K) per-objective score differences a - b; y (N,) soft targets in [0, 1]. No intercept:
    swapping a and b must flip the prediction. The L2 term keeps w finite on separable data.
    """
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    N, K = X.shape
    w = torch.zeros(K, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for _ in range(iters):
        s = torch.sigmoid(X @ w)  # (N,)
        grad = X.T @ (s - y) / N + l2 * w  # (K,)
        hess = (X.T * (s * (1 - s))) @ X / N + l2 * eye  # (K, K)
        step = torch.linalg.lstsq(hess, grad[:, None]).solution[:, 0]  # lstsq: safe when l2 = 0 and H is singular
        w = w - step
        if step.abs().max() < 1e-10:
            break
    return w
