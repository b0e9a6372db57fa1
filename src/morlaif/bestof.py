"""The run's preference models at inference time: `morlaif score` (the per-objective and scalarized
reward of one response; an aspect objective reads the run's aligned policy's answer to its
follow-up question about that response) and steerable best-of-N (`morlaif generate --best-of N`: sample N responses,
rerank them under the user's objective weights and scalarizer; no retraining)."""

from __future__ import annotations

from pathlib import Path

import torch

from morlaif import models
from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.generation import Sampling, chat, followup_answers, generate_batch
from morlaif.policy import aligned_path, eval_followups
from morlaif.preference import RewardScorer
from morlaif.scalarize import Scalarizer, weight_vector


def parse_weights(spec: str | None, objectives: list[str]) -> torch.Tensor | None:
    """'honesty=2,prudence=1' -> (K,) weights over `objectives` (unnamed objectives get 0)."""
    if not spec:
        return None
    return weight_vector(_weights_dict(spec), objectives, key="--weights")


def _weights_dict(spec: str) -> dict[str, float]:
    """'honesty=2,prudence=1' -> {'honesty': 2.0, 'prudence': 1.0}; the values are checked by weight_vector."""
    w: dict[str, float] = {}
    for item in spec.split(","):
        name, eq, val = item.partition("=")
        if not eq or not name.strip():
            raise InputError(f"expected objective=weight, got '{item}'", key="--weights")
        try:
            w[name.strip()] = float(val)
        except ValueError:
            raise InputError(f"weight of '{name.strip()}' is not a number: '{val}'", key="--weights") from None
    return w


def rerank(rewards: torch.Tensor, scalarizer: Scalarizer) -> tuple[int, torch.Tensor]:
    """Index of the best of N candidates and their scalarized scores. rewards: (N, K), already
    normalised as the scalarizer says."""
    s = scalarizer(rewards)  # (N,)
    return int(torch.argmax(s)), s


def best_of_n(cfg: Config, run_dir: Path | None, model_name: str, prompt: str, *, n: int, weights: str | None,
              scalarizer: str | None, sampling: Sampling, seed: int) -> dict:
    """The best of n samples of `model_name` (sampled with `sampling`, as a rule `Sampling.from_config(cfg,
    "candidates")`) under the run's preference models and the scalarizer (the config's, or `scalarizer`)."""
    if run_dir is None:
        raise InputError("--best-of needs --run DIR (the run whose preference models rerank)", key="--run")
    if n < 1:
        raise InputError("--best-of must be at least 1", key="--best-of")
    scorer = RewardScorer.load(run_dir, cfg)
    scal = Scalarizer.from_config(cfg.rl, scorer.objectives, name=scalarizer,
                                  weights=_weights_dict(weights) if weights else None,
                                  weights_key="--weights" if weights else "rl.weights")
    model, tok = models.load(model_name, cfg.model)
    texts, raw = candidates(cfg, model, tok, scorer, prompt, n=n, sampling=sampling, seed=seed)
    r = scal.inputs(scorer, raw)  # (N, K)
    best, s = rerank(r, scal)
    return {
        "best": texts[best],
        "best_index": best,
        "scalarizer": scal.name,
        "weights": scal.weight_dict(),
        "candidates": [{"text": t, "scalarized": float(s[i]), "rewards": dict(zip(scorer.objectives, r[i].tolist()))}
                       for i, t in enumerate(texts)],
    }


def candidates(cfg: Config, model, tok, scorer: RewardScorer, prompt: str, *, n: int, sampling: Sampling,
               seed: int) -> tuple[list[str], torch.Tensor]:
    """n responses to `prompt` sampled with `sampling` and their raw rewards (N, K) from `scorer`: what
    best-of-N reranks (once per weighting: the samples and their scores do not depend on the weights)."""
    g = generate_batch(model, tok, [chat(prompt)] * n, **sampling.batch_kwargs(), seed=seed)
    # an aspect objective reads the sampling model's answer to its follow-up question, sampled as everywhere
    followups = followup_answers(model, tok, [prompt] * n, g.texts, scorer.aspects, seed=seed,
                                 sampling=Sampling.from_config(cfg, "followup"))
    return g.texts, scorer.score([prompt] * n, g.texts, followups).float().cpu()  # (N, K) raw


def score(cfg: Config, run_dir: Path, prompt: str, response: str) -> dict:
    """`morlaif score`: raw and normalised rewards per objective and the scalarized reward of one response."""
    if not prompt.strip():
        raise InputError("empty prompt", key="--prompt")
    scorer = RewardScorer.load(run_dir, cfg)
    scal = Scalarizer.from_config(cfg.rl, scorer.objectives)
    followups = {}
    if scorer.aspects:  # the run's aligned policy answers the follow-up questions about this response
        model, tok = models.load(str(aligned_path(run_dir)), cfg.model)
        followups = eval_followups(cfg, model.eval(), tok, [prompt], [response])
    raw = scorer.score([prompt], [response], followups).float().cpu()  # (1, K)
    z = scorer.normalize(raw) if scorer.mean is not None else None
    use = z if (scal.normalize and z is not None) else raw
    return {"objectives": scorer.objectives, "raw": raw[0].tolist(), "normalized": None if z is None else z[0].tolist(),
            "scalarizer": scal.name, "scalarized_from": "normalized" if use is z else "raw",
            "scalarized": float(scal(use)[0]), "followups": {a: v[0] for a, v in followups.items()}}


def print_score(res: dict) -> None:
    width = max(len(o) for o in res["objectives"])
    print(f"{'objective':{width}s}  {'raw':>9s}  {'normalised':>10s}")
    for k, o in enumerate(res["objectives"]):
        zs = f"{res['normalized'][k]:10.4f}" if res["normalized"] is not None else f"{'n/a':>10s}"
        print(f"{o:{width}s}  {res['raw'][k]:9.4f}  {zs}")
    for aspect, answer in res["followups"].items():
        print(f"{aspect} follow-up answer (the run's policy): {answer!r}")
    which = "normalised" if res["scalarized_from"] == "normalized" else "raw"
    print(f"scalarized ({res['scalarizer']}, {which} rewards): {res['scalarized']:.4f}")
