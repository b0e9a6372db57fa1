"""Multi-objective scalarization: K per-objective rewards -> one RL reward (docs/design.md, "Scalarizers").

Every function maps rewards (B, K) and weights (K,), or one weight vector per row (B, K) (a
weight-conditioned policy's episodes, `morlaif.conditioning`), to (B,), row by row. Nothing here
reduces over the batch (the reference MORLAIF code does for five of its seven functions,
which couples the samples of a batch); every function is defined for any K >= 1 and stays
finite for finite input (log-sum-exp and log-sigmoid instead of exp/log of raw values).

| name                 | per row r, weights w                                  |
|----------------------|-------------------------------------------------------|
| linear               | Σ w_k r_k                                             |
| max_min              | min_k r_k                                             |
| soft_max_min (τ)     | −τ log Σ_k w_k exp(−r_k / τ)                          |
| uncertainty_weighted | Σ w_k r_k − λ Σ w_k (r_k − r̄)²,  r̄ = Σ w_k r_k       |
| lower_quantile (q)   | mean of the ⌈qK⌉ smallest r_k                         |
| max_median           | median_k r_k (mean of the two middle ones, K even)    |
| bernoulli_nash       | Σ_k w_k log σ(r_k)                                    |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from morlaif.config import RLCfg
from morlaif.errors import InputError

NAMES = ("linear", "max_min", "soft_max_min", "uncertainty_weighted", "lower_quantile", "max_median", "bernoulli_nash")
# The scalarizers whose result depends on the weights (max_min, lower_quantile and max_median look only at
# the order of the rewards): the ones a weight sweep (`morlaif steer`) can steer.
WEIGHTED = ("linear", "soft_max_min", "uncertainty_weighted", "bernoulli_nash")
# Parameters a call leaves out take the config's defaults (rl.tau, rl.variance_penalty, rl.q): one source.
DEFAULT_PARAMS = {"tau": RLCfg.model_fields["tau"].default, "lam": RLCfg.model_fields["variance_penalty"].default,
                  "q": RLCfg.model_fields["q"].default}


def _weights(weights, K: int, like: torch.Tensor) -> torch.Tensor:
    """(K,) or per-row (B, K) non-negative weights normalised to sum 1 (per row); uniform when None."""
    if weights is None:
        return torch.full((K,), 1.0 / K, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape not in ((K,), (like.shape[0], K)):
        raise ValueError(f"weights must have shape ({K},) or ({like.shape[0]}, {K}) to match rewards "
                         f"{tuple(like.shape)}; got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative; got {w.tolist()}")
    total = w.sum(-1, keepdim=True)  # (1,) or (B, 1)
    if (total <= 0).any():
        raise ValueError("weights must not all be zero")
    return w / total


def _dot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k x_k per row: x (B, K), w (K,) or (B, K) -> (B,)."""
    return x @ w if w.dim() == 1 else (x * w).sum(1)


def linear(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _dot(r, w)  # (B,)


def max_min(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return r.min(dim=1).values  # (B,) the worst objective; weights do not enter


def soft_max_min(r: torch.Tensor, w: torch.Tensor, tau: float) -> torch.Tensor:
    # −τ log Σ w exp(−r/τ) = −τ logsumexp(log w − r/τ); log 0 = −inf drops zero-weight objectives.
    return -tau * torch.logsumexp(torch.log(w).expand_as(r) - r / tau, dim=1)  # (B,)


def uncertainty_weighted(r: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    mean = _dot(r, w)  # (B,) weighted mean r̄
    var = _dot((r - mean[:, None]) ** 2, w)  # (B,) weighted spread around r̄
    return mean - lam * var


def lower_quantile(r: torch.Tensor, w: torch.Tensor, q: float) -> torch.Tensor:
    K = r.shape[1]
    # 1e-9 guards float noise: q = 1/3, K = 6 must give 2, not 3.
    n = min(K, max(1, math.ceil(q * K - 1e-9)))
    return r.sort(dim=1).values[:, :n].mean(dim=1)  # (B,) mean of the n smallest


def max_median(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    K = r.shape[1]
    s = r.sort(dim=1).values  # (B, K)
    if K % 2:
        return s[:, K // 2]
    return 0.5 * (s[:, K // 2 - 1] + s[:, K // 2])  # torch.median would return the lower middle


def bernoulli_nash(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # log σ(r) via logsigmoid: finite for very negative r where log(sigmoid(r)) gives -inf.
    return _dot(F.logsigmoid(r), w)  # (B,)


def scalarize(name: str, rewards, weights=None, **params) -> torch.Tensor:
    """Combine rewards (B, K) into (B,) with the named function (the table in docs/design.md).

    weights: (K,) or one vector per row (B, K), non-negative, normalised to sum 1 (uniform when None).
    params: tau (soft_max_min, > 0), lam (uncertainty_weighted, >= 0), q (lower_quantile, in (0, 1]);
    a parameter the chosen function does not use is accepted and ignored, so callers can pass all three.
    """
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise ValueError(f"unknown scalarizer parameter(s) {sorted(unknown)}; known: tau, lam, q")
    p = {**DEFAULT_PARAMS, **params}
    if not p["tau"] > 0:
        raise ValueError(f"tau must be > 0, got {p['tau']}")
    if not p["lam"] >= 0:
        raise ValueError(f"lam must be >= 0, got {p['lam']}")
    if not 0 < p["q"] <= 1:
        raise ValueError(f"q must be in (0, 1], got {p['q']}")
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.float()
    if r.dim() != 2 or r.shape[1] < 1:
        raise ValueError(f"rewards must have shape (B, K) with K >= 1; got {tuple(r.shape)}")
    w = _weights(weights, r.shape[1], r)  # (K,)
    fns = {
        "linear": lambda: linear(r, w),
        "max_min": lambda: max_min(r, w),
        "soft_max_min": lambda: soft_max_min(r, w, float(p["tau"])),
        "uncertainty_weighted": lambda: uncertainty_weighted(r, w, float(p["lam"])),
        "lower_quantile": lambda: lower_quantile(r, w, float(p["q"])),
        "max_median": lambda: max_median(r, w),
        "bernoulli_nash": lambda: bernoulli_nash(r, w),
    }
    if name not in fns:
        raise ValueError(f"unknown scalarizer '{name}' (one of {', '.join(NAMES)})")
    return fns[name]()


def normalize(rewards, mean, std, min_std: float = 1e-3) -> torch.Tensor:
    """Per-objective z-score: (r − mean) / max(std, min_std). rewards (B, K), mean and std (K,).

    The floor keeps an objective whose preference model barely varies from being blown up.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32) if not torch.is_tensor(rewards) else rewards.float()
    mu = torch.as_tensor(mean, dtype=r.dtype, device=r.device)
    sd = torch.as_tensor(std, dtype=r.dtype, device=r.device).clamp(min=min_std)
    if r.dim() != 2 or mu.shape != (r.shape[1],) or sd.shape != (r.shape[1],):
        raise ValueError(f"normalize expects rewards (B, K) and mean/std (K,); got {tuple(r.shape)}, "
                         f"{tuple(mu.shape)}, {tuple(sd.shape)}")
    return (r - mu) / sd


def weight_vector(weights: Mapping[str, float] | None, objectives: Sequence[str],
                  key: str = "rl.weights") -> torch.Tensor | None:
    """Weights {objective: w} -> (K,) in objective order; None stays None (uniform). The one check of
    user weights (config rl.weights, `--weights`): names must be objectives, weights finite, non-negative,
    not all zero. Objectives missing from the mapping get weight 0. Errors name `key`."""
    if weights is None:
        return None
    unknown = [k for k in weights if k not in objectives]
    if unknown:
        raise InputError(f"weights name unknown objective(s) {unknown}; objectives: {', '.join(objectives)}", key=key)
    w = [float(weights.get(o, 0.0)) for o in objectives]
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise InputError(f"weights must be non-negative and not all zero; got {dict(zip(objectives, w))}", key=key)
    return torch.tensor(w)


class Scalarizer:
    """K per-objective rewards -> one, as the run says: the function (rl.scalarizer), its parameters
    (rl.tau, rl.variance_penalty, rl.q), the weights (rl.weights, resolved against `objectives` once)
    and whether rewards are z-scored first (rl.normalize). PPO, GRPO/RLOO, DPO relabelling, the
    evaluation, best-of-N and `morlaif score` all use one of these.
    """

    def __init__(self, name: str, objectives: Sequence[str], weights: Mapping[str, float] | None = None, *,
                 tau: float = DEFAULT_PARAMS["tau"], variance_penalty: float = DEFAULT_PARAMS["lam"],
                 q: float = DEFAULT_PARAMS["q"], normalize: bool = True, weights_key: str = "rl.weights"):
        if name not in NAMES:
            raise InputError(f"unknown scalarizer '{name}' (one of {', '.join(NAMES)})", key="rl.scalarizer")
        self.name, self.objectives, self.normalize = name, list(objectives), normalize
        self.weights = weight_vector(weights, self.objectives, weights_key)  # (K,) or None = uniform
        self.params = {"tau": tau, "lam": variance_penalty, "q": q}

    @classmethod
    def from_config(cls, rl, objectives: Sequence[str], *, name: str | None = None,
                    weights: Mapping[str, float] | None = None, weights_key: str = "rl.weights") -> Scalarizer:
        """The config's scalarizer (`rl` section) over `objectives`; name / weights override the config's."""
        return cls(name or rl.scalarizer, objectives, rl.weights if weights is None else weights, tau=rl.tau,
                   variance_penalty=rl.variance_penalty, q=rl.q, normalize=rl.normalize, weights_key=weights_key)

    def inputs(self, scorer, raw: torch.Tensor) -> torch.Tensor:
        """(B, K) raw preference-model rewards -> what is scalarized: z-scored per objective when normalize."""
        return scorer.normalize(raw) if self.normalize else raw

    def __call__(self, rewards: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) -> (B,), in the rewards' dtype and device. weights (B, K): each row's own (a conditioned
        policy's episodes) instead of the configured ones."""
        w = self.weights if weights is None else weights
        return scalarize(self.name, rewards, None if w is None else w.to(device=rewards.device), **self.params)

    def weight_dict(self) -> dict[str, float] | None:
        """The weights as used (normalised to sum 1) by objective; None = uniform."""
        return None if self.weights is None else dict(zip(self.objectives, (self.weights / self.weights.sum()).tolist()))
