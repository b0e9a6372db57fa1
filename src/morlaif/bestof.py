"""Steerable best-of-N: sample N responses, rerank by the run's preference models under the
user's objective weights and scalarizer. Changes behaviour at inference time, no retraining."""

from __future__ import annotations

from pathlib import Path

import torch

from morlaif import models
from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.generation import chat, generate_batch


def parse_weights(spec: str | None, objectives: list[str]) -> torch.Tensor | None:
    """'honesty=2,prudence=1' -> (K,) weights over `objectives` (unnamed objectives get 0)."""
    if not spec:
        return None
    w = dict.fromkeys(objectives, 0.0)
    for item in spec.split(","):
        name, eq, val = item.partition("=")
        name = name.strip()
        if not eq or name not in w:
            raise InputError(f"expected objective=weight with objective in {objectives}, got '{item}'", key="--weights")
        try:
            w[name] = float(val)
        except ValueError:
            raise InputError(f"weight of '{name}' is not a number: '{val}'", key="--weights") from None
        if w[name] < 0:
            raise InputError(f"weight of '{name}' is negative", key="--weights")
    if sum(w.values()) <= 0:
        raise InputError("weights sum to zero", key="--weights")
    return torch.tensor([w[o] for o in objectives])


def rerank(rewards: torch.Tensor, scalarizer: str, weights: torch.Tensor | None, **params) -> tuple[int, torch.Tensor]:
    """Index of the best of N candidates and their scalarized scores. rewards: (N, K)."""
    from morlaif.scalarize import scalarize

    s = scalarize(scalarizer, rewards, weights, **params)  # (N,)
    return int(torch.argmax(s)), s


def best_of_n(cfg: Config, run_dir: Path | None, model_name: str, prompt: str, *, n: int, weights: str | None,
              scalarizer: str | None, max_new_tokens: int, temperature: float, seed: int) -> dict:
    if run_dir is None:
        raise InputError("--best-of needs --run DIR (the run whose preference models rerank)", key="--run")
    if n < 1:
        raise InputError("--best-of must be at least 1", key="--best-of")
    from morlaif.reward import RewardScorer

    scorer = RewardScorer.load(run_dir, cfg)
    w = parse_weights(weights, scorer.objectives)
    tok = models.load_tokenizer(model_name, trust_remote_code=cfg.model.trust_remote_code)
    model = models.load_model(model_name, device=cfg.model.device, dtype=cfg.model.dtype,
                              trust_remote_code=cfg.model.trust_remote_code)
    g = generate_batch(model, tok, [chat(prompt)] * n, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=cfg.generation.top_p, repetition_penalty=cfg.generation.repetition_penalty, seed=seed)
    r = scorer.score([prompt] * n, g.texts)  # (N, K)
    if cfg.rl.normalize:
        r = scorer.normalize(r)
    name = scalarizer or cfg.rl.scalarizer
    best, s = rerank(r, name, w, tau=cfg.rl.tau, lam=cfg.rl.lam, q=cfg.rl.q)
    return {
        "best": g.texts[best],
        "best_index": best,
        "scalarizer": name,
        "weights": None if w is None else dict(zip(scorer.objectives, (w / w.sum()).tolist())),
        "candidates": [{"text": t, "scalarized": float(s[i]), "rewards": dict(zip(scorer.objectives, r[i].tolist()))}
                       for i, t in enumerate(g.texts)],
    }
