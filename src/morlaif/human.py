"""`morlaif rm --run RUN --human FILE`: how well the run's preference models agree with human
preference labels (HH-RLHF's harmless pairs, say), and the linear weights of the objectives that
best explain those labels, fitted as the MORLAIF repo fits them on HH-RLHF: logistic regression
of the human choice on per-objective score differences, no intercept.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import yaml

from morlaif import preference, report
from morlaif.artifacts import atomic_write_text, read_json, write_json
from morlaif.constitution import configured_objectives
from morlaif.errors import InputError
from morlaif.labels import subset
from morlaif.preference import RewardScorer
from morlaif.promptsets import dialogue_turns, load_labelled
from morlaif.scalarize import Scalarizer
from morlaif.stats import agreement, logistic_regression, pairwise_accuracy


def cv_accuracy(X: torch.Tensor, y: torch.Tensor, folds: int = 5, seed: int = 0) -> float | None:
    """Held-out agreement of the no-intercept logistic regression: fitted on 4/5 of the pairs, scored on
    the rest, over 5 seeded folds. X (N, K) score differences, y (N,). In-sample agreement flatters."""
    n = len(y)
    if n < folds:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    margin = torch.empty(n, dtype=torch.float64)  # (N,) held-out X w
    for f in range(folds):
        test = order[f::folds]
        fit_rows = torch.ones(n, dtype=torch.bool)
        fit_rows[test] = False
        w = logistic_regression(X[fit_rows], y[fit_rows])  # (K,)
        margin[test] = X[test].double() @ w
    return pairwise_accuracy(margin, torch.zeros(n), y)[0]


def rl_weights(coefficients: dict[str, float]) -> dict[str, float] | None:
    """Fitted coefficients -> weights rl.weights accepts (non-negative, summing to 1): a negative coefficient
    (the human choice goes against that objective's model) becomes 0. None when none is positive."""
    pos = {o: max(0.0, w) for o, w in coefficients.items()}
    total = sum(pos.values())
    return {o: round(w / total, 4) for o, w in pos.items()} if total > 0 else None


def human_check(cfg, run_dir: str | Path, rows: list[dict], source: str) -> dict:
    """Agreement with human labels (rows of `promptsets.load_labelled`) of each objective's preference
    model, of the holistic baseline model, of the scalarized score (the run's scalarizer and weights),
    of the longer and the shorter response, and the fitted linear weights. A prompt written as
    `User:`/`Assistant:` lines is scored as the dialogue's turns.

    Aspect objectives are left out: they read the policy's answer to a follow-up question, which a
    human-labelled pair does not have; the scalarized score then combines the action objectives.
    """
    run_dir = Path(run_dir)
    objectives = [o.name for o in configured_objectives(cfg.constitution)]
    action = [o for o in objectives if preference.aspect(o) is None]
    if not action:
        raise InputError("every objective of the run is an aspect objective: none can score a human-labelled pair",
                         key="constitution.objectives")
    acfg = cfg.model_copy(deep=True)  # the run's config on its action objectives
    acfg.constitution.objectives = action
    if cfg.rl.weights is not None:
        acfg.rl.weights = {o: w for o, w in cfg.rl.weights.items() if o in action and w > 0} or None
    scorer = RewardScorer.load(run_dir, acfg)
    scalarizer = Scalarizer.from_config(acfg.rl, action)
    prompts = [dialogue_turns(r["prompt"]) for r in rows]
    resp_a, resp_b = [r["response_a"] for r in rows], [r["response_b"] for r in rows]
    y = torch.tensor([1.0 if r["preferred"] == "a" else 0.0 for r in rows], dtype=torch.float64)  # (N,)
    raw_a = scorer.score(prompts, resp_a).double().cpu()  # (N, K)
    raw_b = scorer.score(prompts, resp_b).double().cpu()  # (N, K)
    std = scorer.std.double() if scorer.std is not None else torch.ones(len(action), dtype=torch.float64)  # (K,)
    s_a = scalarizer(scalarizer.inputs(scorer, raw_a.float()))  # (N,)
    s_b = scalarizer(scalarizer.inputs(scorer, raw_b.float()))  # (N,)
    holistic = None
    if read_json(run_dir / "rm" / "objectives.json").get("baseline_adapter"):
        del scorer  # one backbone in memory at a time
        base = RewardScorer.load(run_dir, acfg, baseline=True)
        holistic = (base.score(prompts, resp_a).double().cpu()[:, 0], base.score(prompts, resp_b).double().cpu()[:, 0])
        del base
    len_a = torch.tensor([len(t) for t in resp_a], dtype=torch.float64)  # (N,) characters
    len_b = torch.tensor([len(t) for t in resp_b], dtype=torch.float64)

    def table(keep: torch.Tensor) -> dict:
        return {
            "per_objective": {o: agreement(raw_a[keep, k], raw_b[keep, k], y[keep]) for k, o in enumerate(action)},
            "holistic": agreement(holistic[0][keep], holistic[1][keep], y[keep]) if holistic else None,
            "scalarized": agreement(s_a[keep], s_b[keep], y[keep]),
            "longer_response": agreement(len_a[keep], len_b[keep], y[keep]),
            "shorter_response": agreement(-len_a[keep], -len_b[keep], y[keep]),
        }

    X = (raw_a - raw_b) / std.clamp(min=1e-3)  # (N, K) score differences in z units, as the scalarizers see them
    w = logistic_regression(X, y)  # (K,)
    coefficients = {o: float(w[k]) for k, o in enumerate(action)}
    labels = Counter(r.get("objective", "unnamed") for r in rows)
    result = {
        "file": source,
        "n": len(rows),
        "multi_turn_prompts": sum(len(p) > 1 for p in prompts),
        "label_objectives": dict(labels),
        "objectives": action,
        "left_out": [o for o in objectives if o not in action],
        "scalarizer": scalarizer.name,
        "weights": scalarizer.weight_dict(),
        "normalized": scalarizer.normalize,
        "agreement": table(torch.ones(len(rows), dtype=torch.bool)),
        "fitted": {
            "coefficients": coefficients,
            "rl_weights": rl_weights(coefficients),
            "accuracy_in_sample": pairwise_accuracy(X @ w, torch.zeros(len(rows)), y)[0],
            "accuracy_cv5": cv_accuracy(X, y, seed=cfg.seed),
        },
        "notes": [
            "agreement: share of pairs where the higher score is the human's choice (equal scores count half), "
            "95% Wilson interval; chance is 0.5",
            "fitted: logistic regression (no intercept, L2 1e-2) of the human choice on z-scored per-objective score "
            "differences; rl_weights clips negative coefficients to 0 and normalises; accuracy_cv5 is held out "
            "(5 folds), accuracy_in_sample is not",
        ],
    }
    if len(labels) > 1:
        result["by_label_objective"] = {lab: table(torch.tensor([r.get("objective", "unnamed") == lab for r in rows]))
                                        for lab in labels}
    return result


def check_human_file(cfg, run_dir: str | Path, path: str, limit: int | None = None, out: str | None = None) -> dict:
    """`morlaif rm --run RUN --human SET`: the check on a labelled pairs file or packaged set (`load_labelled`;
    with `limit`, the seeded sample `feedback --calibrate` judges), written to OUT.json (default
    RUN/human/STEM.json) and the fitted weights to OUT.weights.yaml (an `rl: {weights: …}` recipe fragment)."""
    run_dir = Path(run_dir)
    if limit is not None and limit < 1:
        raise InputError("must be at least 1", key="--limit")
    rows = subset(load_labelled(path), limit, cfg.seed)
    result = human_check(cfg, run_dir, rows, str(path))
    out_p = Path(out) if out else run_dir / "human" / f"{Path(path).stem}.json"
    stem = out_p.with_suffix("") if out_p.suffix == ".json" else out_p
    weights = result["fitted"]["rl_weights"]
    result["weights_file"] = str(stem) + ".weights.yaml" if weights else None
    result["set_weights"] = f"--set 'rl.weights={json.dumps(weights)}'" if weights else None
    if weights:
        atomic_write_text(result["weights_file"],
                          f"# Linear weights fitted to the human labels of {path} ({len(rows)} pairs) by "
                          f"`morlaif rm --human`\n" + yaml.safe_dump({"rl": {"weights": weights}}, sort_keys=False))
    write_json(out_p, result)
    if out is None:  # in the run: its report shows it
        report.write(run_dir)
    result["out"] = str(out_p)
    return result


def print_human(res: dict) -> None:
    """The agreement table and the fitted weights, as `morlaif rm --human` prints them."""
    def line(name: str, a: dict | None) -> None:
        if a is None or a["accuracy"] is None:
            print(f"{name:28s} {'n/a':>8s}")
            return
        lo, hi = a["ci95"]
        print(f"{name:28s} {a['accuracy']:8.3f}  [{lo:.3f}, {hi:.3f}]  n={a['n']}")

    ag = res["agreement"]
    print(f"agreement with the human labels of {res['file']} ({res['n']} pairs, "
          f"{res['multi_turn_prompts']} multi-turn; chance 0.5)")
    for o, a in ag["per_objective"].items():
        line(f"  {o}", a)
    line("holistic (baseline model)", ag["holistic"])
    line(f"scalarized ({res['scalarizer']})", ag["scalarized"])
    line("longer response", ag["longer_response"])
    line("shorter response", ag["shorter_response"])
    f = res["fitted"]
    print("fitted linear weights (logistic regression, no intercept): "
          + ", ".join(f"{o}={w:+.3f}" for o, w in f["coefficients"].items()))
    cv = "n/a" if f["accuracy_cv5"] is None else f"{f['accuracy_cv5']:.3f}"
    print(f"  agreement: {f['accuracy_in_sample']:.3f} in sample, {cv} held out (5 folds)")
    if res["set_weights"]:
        print(f"  use them: {res['set_weights']}   (recipe fragment: {res['weights_file']})")
    else:
        print("  no objective has a positive weight: nothing for rl.weights")
    if res["left_out"]:
        print(f"  left out (aspect objectives): {', '.join(res['left_out'])}")
    print(f"wrote {res['out']}")
