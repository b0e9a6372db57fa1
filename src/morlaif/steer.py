"""`morlaif steer`: the control a user has without retraining, as a curve.

Best-of-N under a sweep of one objective's weight: sample N responses per held-out prompt once from
the run's aligned policy, score them once with the run's preference models, then, for each weight
w of objective X from 0 to 1 (the other objectives sharing 1 - w equally), pick each prompt's best
candidate under the scalarizer with those weights. Sampling and scoring happen once; each point of
the curve is a rerank (cheap). The curve: X's reward and the scalarized reward under the run's own
scalarizer and weights (the fixed yardstick) of the picked responses, against w. Whether X's
reward rises with X's weight: the Spearman correlation of w and X's mean reward over the points,
and X's reward at w = 1 minus at w = 0 with a 95% bootstrap interval over prompts.

RUN/steer/ (or --out) gets OBJECTIVE.json and OBJECTIVE.png, and candidates-KEY.jsonl: the samples
and their raw rewards, reused by any later sweep (another objective, more points) with the same
policy, preference models, prompts and sampling settings.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from morlaif import models, report
from morlaif.artifacts import config_hash, read_jsonl, write_json, write_jsonl
from morlaif.bestof import candidates, rerank
from morlaif.conditioning import Conditioning
from morlaif.config import Config, derived_seed
from morlaif.errors import InputError
from morlaif.generation import Sampling, generate
from morlaif.lifecycle import PREFERENCE_MODELS, input_hashes
from morlaif.policy import aligned_path, eval_followups
from morlaif.preference import RewardScorer
from morlaif.promptsets import eval_prompts
from morlaif.scalarize import WEIGHTED, Scalarizer, weight_vector
from morlaif.stats import bootstrap_mean_ci, spearman


def sweep_weights(objectives: list[str], objective: str, w: float) -> dict[str, float]:
    """Weight w on `objective`, the other objectives sharing 1 - w equally."""
    rest = (1.0 - w) / (len(objectives) - 1)
    return {o: (w if o == objective else rest) for o in objectives}


def curve(z: torch.Tensor, scalarizers: list[Scalarizer], yardstick: Scalarizer, k: int) -> list[dict]:
    """For each scalarizer (one per weight), each prompt's best of N and what it scores.

    z: (P, N, K) rewards as the scalarizers read them (z-scored when normalised). Returns per point:
    the mean reward of objective k over the picked responses, their mean yardstick score, every
    objective's mean, and objective k's reward per prompt (for the bootstrap).
    """
    P = z.shape[0]
    rows = []
    for scal in scalarizers:
        best = torch.tensor([rerank(z[i], scal)[0] for i in range(P)])  # (P,) index of each prompt's pick
        picked = z[torch.arange(P), best]  # (P, K)
        rows.append({
            "objective_reward": float(picked[:, k].mean()),
            "scalarized": float(yardstick(picked).mean()),
            "per_objective": {o: float(picked[:, j].mean()) for j, o in enumerate(yardstick.objectives)},
            "per_prompt": picked[:, k].tolist(),
        })
    return rows


def verdict(objective: str, rho: float | None, ci: list[float | None]) -> str:
    """Plain words for the two numbers: does the objective's reward rise with its weight?"""
    if ci[0] is not None and ci[0] > 0 and rho is not None and rho > 0:
        return f"rises: {objective}'s reward goes up with its weight (the weight-1 minus weight-0 interval is above 0)"
    if ci[1] is not None and ci[1] < 0:
        return f"falls: {objective}'s reward goes down as its weight grows"
    return f"not clear: the interval of {objective}'s weight-1 minus weight-0 difference includes 0"


def sample_and_score(cfg: Config, run_dir: Path, scorer: RewardScorer, policy: str, prompts: list[str], n: int,
                     out_dir: Path) -> tuple[list[list[str]], torch.Tensor]:
    """N samples per prompt from `policy` and their raw rewards (P, N, K), read from out_dir's cache of
    them when a sweep with the same policy, preference models, prompts and settings made them. The policy and
    the preference models are named by their content (`lifecycle.content_hash`, as every stage's inputs are):
    retraining either makes new samples, a model moved or remade bit for bit reuses them."""
    # best-of-N sampling (never greedy: N copies of one response), as long as the eval's responses
    sampling = Sampling.from_config(cfg, "candidates").replace(max_new_tokens=cfg.eval.max_new_tokens)
    local = Path(policy).exists()
    # the run's SFT policy too: RUN/rl/policy is an adapter stacked on it
    reads = ([Path(policy)] if local else []) + [p for p in [run_dir / "sft" / "model"] if p.exists()]
    key = config_hash({
        "policy": None if local else policy,  # a Hub id by name, a local model by its content (below)
        "models": sorted(input_hashes(run_dir, [*reads, *(run_dir / f for f in PREFERENCE_MODELS)]).values()),
        "objectives": scorer.objectives, "n": n, "seed": cfg.seed, "prompts": prompts,
        "sampling": sampling.batch_kwargs(),
        "followup_sampling": Sampling.from_config(cfg, "followup").kwargs() if scorer.aspects else None,
    })
    cache = out_dir / f"candidates-{key}.jsonl"
    if cache.is_file():
        rows = read_jsonl(cache, required=("prompt", "texts", "raw"))
        return [r["texts"] for r in rows], torch.tensor([r["raw"] for r in rows])  # (P, N, K)
    model, tok = models.load(policy, cfg.model)
    model.eval()
    texts, raw = [], []
    for i, p in enumerate(prompts):
        t, r = candidates(cfg, model, tok, scorer, p, n=n, sampling=sampling, seed=derived_seed(cfg.seed, i))
        texts.append(t)
        raw.append(r)  # (N, K)
    write_jsonl(cache, [{"prompt": p, "texts": t, "raw": r.tolist()} for p, t, r in zip(prompts, texts, raw)])
    return texts, torch.stack(raw)  # (P, N, K)


def conditioned_curve(cfg: Config, scorer: RewardScorer, policy: str, prompts: list[str], weights: list[dict],
                      yardstick: Scalarizer, k: int) -> list[dict]:
    """A weight-conditioned policy asked at each weight vector (`rl.conditioning: prompt`): one answer per prompt
    and point (the eval's sampling, greedy by default), scored by the run's preference models; the rows of `curve`."""
    cond = Conditioning.load(Path(policy)) if Path(policy).is_dir() else None
    if cond is None:
        raise InputError(f"{policy} is not a weight-conditioned policy (train one with rl.conditioning: prompt)",
                         key="--conditioned")
    if cond.objectives != scorer.objectives:
        raise InputError(f"the policy was conditioned on {cond.objectives}, the run's preference models score "
                         f"{scorer.objectives}", key="--conditioned")
    model, tok = models.load(policy, cfg.model)
    model.eval()
    sampling = Sampling.from_config(cfg, "eval")
    rows = []
    for w in weights:
        W = weight_vector(w, scorer.objectives, "--objective")  # (K,)
        texts = generate(model, tok, [cond.messages(p, W) for p in prompts], **sampling.kwargs(), seed=cfg.seed,
                         desc="steer", progress=False)
        raw = scorer.score(prompts, texts, eval_followups(cfg, model, tok, prompts, texts)).float()  # (P, K)
        z = yardstick.inputs(scorer, raw)  # (P, K)
        rows.append({"objective_reward": float(z[:, k].mean()), "scalarized": float(yardstick(z).mean()),
                     "per_objective": {o: float(z[:, j].mean()) for j, o in enumerate(scorer.objectives)},
                     "per_prompt": z[:, k].tolist()})
    return rows


def steer(cfg: Config, run_dir: Path, objective: str, *, n: int = 8, points: int = 6, scalarizer: str | None = None,
          model: str | None = None, limit: int | None = None, out_dir: Path | None = None,
          conditioned: bool = False) -> dict:
    """The steering curve of `objective`; writes OUT/OBJECTIVE.json and OUT/OBJECTIVE.png (OUT: RUN/steer).
    conditioned: the curve of one weight-conditioned policy asked at each weight, instead of best-of-N reranking
    (written as OBJECTIVE-conditioned.*)."""
    run_dir = Path(run_dir)
    if n < 2:
        raise InputError("best-of-N needs N of at least 2 to have a choice", key="--n")
    if points < 2:
        raise InputError("a curve needs at least 2 points", key="--points")
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1", key="--limit")
    name = scalarizer or cfg.rl.scalarizer
    if name not in WEIGHTED:
        raise InputError(f"{name} does not use the weights, so a weight sweep cannot steer it: pass --scalarizer "
                         f"with one of {', '.join(WEIGHTED)}", key="--scalarizer" if scalarizer else "rl.scalarizer")
    scorer = RewardScorer.load(run_dir, cfg)
    objectives = scorer.objectives
    if objective not in objectives:
        raise InputError(f"'{objective}' is not an objective of the run ({', '.join(objectives)})", key="--objective")
    if len(objectives) < 2:
        raise InputError("steering one objective against the others needs at least two objectives", key="--objective")
    out_dir = Path(out_dir) if out_dir else run_dir / "steer"
    rows = eval_prompts(run_dir)[:limit]
    policy = model or str(aligned_path(run_dir))
    yardstick = Scalarizer.from_config(cfg.rl, objectives)  # the run's own scalarizer and weights
    grid = [i / (points - 1) for i in range(points)]
    k, K = objectives.index(objective), len(objectives)
    if conditioned:
        prompts = [r["prompt"] for r in rows]
        pts = conditioned_curve(cfg, scorer, policy, prompts, [sweep_weights(objectives, objective, w) for w in grid],
                                yardstick, k)
        P, N, one = len(prompts), 1, None
    else:
        texts, raw = sample_and_score(cfg, run_dir, scorer, policy, [r["prompt"] for r in rows], n, out_dir)
        P, N, K = raw.shape
        z = yardstick.inputs(scorer, raw.reshape(P * N, K)).reshape(P, N, K)  # (P, N, K) z-scored when rl.normalize
        sweep = [Scalarizer.from_config(cfg.rl, objectives, name=name, weights=sweep_weights(objectives, objective, w),
                                        weights_key="--objective") for w in grid]
        pts = curve(z, sweep, yardstick, k)
        one = {"objective_reward": float(z[..., k].mean()), "scalarized": float(yardstick(z.reshape(-1, K)).mean())}
    gain = [hi - lo for lo, hi in zip(pts[0]["per_prompt"], pts[-1]["per_prompt"])]  # (P,) X at w=1 minus at w=0
    rho = spearman(grid, [p["objective_reward"] for p in pts])
    ci = bootstrap_mean_ci(gain, seed=cfg.seed)
    result = {
        "run": str(run_dir),
        "objective": objective,
        "objectives": objectives,
        "policy": policy,
        "scalarizer": name,
        "yardstick": {"scalarizer": yardstick.name, "weights": yardstick.weight_dict(), "normalized": yardstick.normalize},
        "n": N,
        "prompts": P,
        "points": [{"weight": w, **{k_: v for k_, v in p.items() if k_ != "per_prompt"}} for w, p in zip(grid, pts)],
        "mode": "conditioned" if conditioned else "best_of_n",
        "one_sample": one,
        "spearman_weight_vs_objective_reward": rho,
        "gain_w1_minus_w0": {"mean": sum(gain) / P, "ci95": ci},
        "verdict": verdict(objective, rho, ci),
        "notes": [
            ("one weight-conditioned policy asked at every weight (its system line), one answer per prompt; "
             if conditioned else f"best-of-{N} reranking of the same samples at every weight; ")
            + f"{objective} gets weight w, the other objectives (1 - w)/{K - 1} each"
            + ("" if conditioned else f", under {name}"),
            "scalarized: the picked responses under the run's own scalarizer and weights (fixed across points)",
            "one_sample: the mean over all N samples per prompt (what one sample, no reranking, gives)",
        ],
    }
    stem = out_dir / (re.sub(r"[^\w.-]", "_", objective) + ("-conditioned" if conditioned else ""))
    result["png"] = str(stem) + ".png"
    report.steer_figure(result, Path(result["png"]))
    write_json(str(stem) + ".json", result)
    if out_dir == run_dir / "steer":  # the run's report shows it
        report.write(run_dir)
    return result


def print_curve(res: dict) -> None:
    how = "one conditioned policy" if res.get("mode") == "conditioned" else f"best-of-{res['n']}, {res['scalarizer']}"
    print(f"steering {res['objective']} ({how}, {res['prompts']} held-out prompts)")
    print(f"{'weight':>7s} {res['objective'][:18]:>18s} {'scalarized (run)':>17s}")
    for p in res["points"]:
        print(f"{p['weight']:7.2f} {p['objective_reward']:18.3f} {p['scalarized']:17.3f}")
    one = res["one_sample"]
    if one:
        print(f"{'1 sample':>7s} {one['objective_reward']:18.3f} {one['scalarized']:17.3f}")
    rho = res["spearman_weight_vs_objective_reward"]
    g = res["gain_w1_minus_w0"]
    lo, hi = g["ci95"]
    print(f"Spearman(weight, {res['objective']} reward) = {'n/a' if rho is None else f'{rho:.3f}'}; "
          f"gain w=1 vs w=0 = {g['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]: {res['verdict']}")
    print(f"wrote {res['png']}")
