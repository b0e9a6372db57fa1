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


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span (Spearman's convention)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson's r of the ranks, ties averaged); None when either side is constant
    or there are fewer than two points."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    if len(xs) < 2:
        return None
    r = correlation(torch.tensor([ranks(xs), ranks(ys)], dtype=torch.float64).T)  # (N, 2) ranks
    return r[0][1]


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> list[float | None]:
    """95% Wilson score interval of a proportion successes / n (a half success, a tie, counts half);
    [None, None] when n = 0. Unlike the normal interval it stays inside [0, 1] near 0 and 1."""
    if n == 0:
        return [None, None]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def agreement(score_a, score_b, y) -> dict:
    """Share of pairs where the higher score is the human's choice (equal scores count half), with its
    95% Wilson interval. score_a, score_b, y: (N,); y = 1 where a is preferred."""
    acc, n = pairwise_accuracy(score_a, score_b, y)
    return {"accuracy": acc, "ci95": wilson_interval(acc * n, n) if n else [None, None], "n": n}


def bootstrap_mean_ci(xs: Sequence[float], seed: int = 0, n_boot: int = 2000) -> list[float | None]:
    """95% percentile-bootstrap interval of the mean of xs (resampling the xs), seeded; [None, None] when empty."""
    if not xs:
        return [None, None]
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(list(xs), dtype=torch.float64)  # (N,)
    idx = torch.randint(len(x), (n_boot, len(x)), generator=g)  # (n_boot, N) resampled indices
    means = x[idx].mean(1).sort().values  # (n_boot,)
    return [float(means[int(0.025 * n_boot)]), float(means[min(n_boot - 1, int(0.975 * n_boot))])]
