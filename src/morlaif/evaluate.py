"""Evaluation: base vs aligned on held-out harmful and benign prompts (docs/design.md, "Evaluation").

- per-objective and scalarized reward from the run's preference models (normalised like the
  RL reward when `rl.normalize`), for the base's and the aligned policy's responses (an aspect
  objective reads each policy's own answer to the aspect's follow-up question);
- win rate of aligned over base by the judge, both orders (the judge debiases), ties half,
  with a 95% bootstrap interval;
- refusal rate on harmful prompts and over-refusal on benign ones (morlaif.refusal);
- KL to the base: the exact per-token KL(aligned || base) over the vocabulary, summed over
  the aligned response's tokens, averaged over prompts (no sampling noise);
- mean response length in tokens.

"base" is the model the run started from (`model.policy`); "sft" the run's SFT policy; "aligned" is
rl/policy (or sft/model when the run has no RL stage yet, and then there is no separate sft column).
Prompt kinds: harmful (clearly harmful, refusal is right), borderline (red-team prompts of the
train source's held-out split), benign (refusal there is over-refusal).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from morlaif import models
from morlaif.artifacts import read_jsonl, write_json, write_jsonl
from morlaif.conditioning import Conditioning
from morlaif.config import Config
from morlaif.constitution import load_constitution
from morlaif.distributed_ray import stage_judge
from morlaif.errors import InputError
from morlaif.generation import Sampling, chat, generate_batch
from morlaif.lifecycle import PREFERENCE_MODELS, run_stage
from morlaif.policy import aligned_path, eval_followups, sft_path
from morlaif.preference import RewardScorer
from morlaif.promptsets import KINDS, load_source
from morlaif.refusal import is_refusal, refusal_rate
from morlaif.scalarize import Scalarizer

TIE_EPS = 1e-3  # |p - 0.5| below this is a tie (identical responses give exactly 0.5)


def win_rate(p_aligned: list[float], seed: int = 0, n_boot: int = 2000) -> dict:
    """Aligned-vs-base win rate from debiased judge probabilities: win 1, loss 0, tie 0.5.

    95% interval by a seeded percentile bootstrap over prompts.
    """
    outcomes = [1.0 if p > 0.5 + TIE_EPS else 0.0 if p < 0.5 - TIE_EPS else 0.5 for p in p_aligned]
    n = len(outcomes)
    if n == 0:
        return {"aligned_vs_base": None, "ci95": [None, None], "n": 0}
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(n_boot))
    lo, hi = means[int(0.025 * n_boot)], means[min(n_boot - 1, int(0.975 * n_boot))]
    return {"aligned_vs_base": sum(outcomes) / n, "ci95": [lo, hi], "n": n,
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}


def _responses(model, tok, prompts: list[str], cfg: Config, cond: Conditioning | None = None):
    """Greedy (by default) responses in batches; returns texts, and token ids/lengths for the KL.
    A weight-conditioned policy (`cond`) is asked at the weights it was configured for."""
    texts, items = [], []
    s = Sampling.from_config(cfg, "eval")
    bs = s.batch_size
    for i in tqdm(range(0, len(prompts), bs), desc="eval answers", unit="batch", leave=False):
        convs = [cond.messages(p) if cond else chat(p) for p in prompts[i : i + bs]]
        g = generate_batch(model, tok, convs, **s.batch_kwargs(), seed=cfg.seed + i)
        texts += g.texts
        items += [(g.prompt_ids[j], g.response_ids[j], int(g.response_lengths[j])) for j in range(len(g.texts))]
    return texts, items


@torch.no_grad()
def kl_to_base(aligned, base, tok, items) -> float:
    """Mean over prompts of Σ_t KL(π_aligned(·|x,y<t) || π_base(·|x,y<t)) along aligned responses."""
    total = 0.0
    for prompt_ids, resp_ids, n in items:
        # strip the left padding only (pad = EOS, which also ends earlier turns inside the prompt)
        p = prompt_ids[int((prompt_ids != tok.pad_token_id).nonzero()[0]) :]
        ids = torch.cat([p, resp_ids[:n]])[None].to(aligned.device)  # (1, P+n)
        P = p.shape[0]
        la = torch.log_softmax(aligned(ids).logits[0, P - 1 : P - 1 + n].float(), -1)  # (n, V)
        lb = torch.log_softmax(base(ids.to(base.device)).logits[0, P - 1 : P - 1 + n].float(), -1)  # (n, V)
        total += float((la.exp() * (la - lb.to(la.device))).sum())
    return total / max(1, len(items))


def judged_win_rate(cfg: Config, prompts: list[str], texts_a: list[str], texts_b: list[str], judge=None) -> dict:
    """win_rate of texts_a over texts_b by the run's judge (the constitution's holistic question, both orders),
    with the judge's position consistency on these pairs. `judge`: one already built (`stage_judge`), else built."""
    question = load_constitution(cfg.constitution.name).holistic().comparison
    judged = (judge or stage_judge(cfg)).prefer(prompts, texts_a, texts_b, question)
    wr = win_rate([j["p_a"] for j in judged], seed=cfg.seed)
    wr["judge_position_consistency"] = sum(j["consistent"] for j in judged) / len(judged) if judged else None
    return wr


def evaluate(cfg: Config, run_dir: Path, rows: list[dict], aligned_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """Metrics (eval/metrics.json schema) and sample rows for prompt rows {prompt, kind}; the aligned
    policy is aligned_dir (default: the run's, `aligned_path`). Base, SFT (when the run has one and it is not
    the aligned policy) and aligned answer the same prompts with the same seeds, so the columns compare."""
    if not rows:
        raise InputError("the evaluation prompt set is empty", key="data.n_eval_harmful")
    aligned_dir = aligned_dir or aligned_path(run_dir)
    prompts = [r["prompt"] for r in rows]
    kinds = [r.get("kind", "harmful") for r in rows]
    policies = {"base": None, "sft": sft_path(run_dir, aligned_dir), "aligned": aligned_dir}
    names = [n for n in policies if n == "base" or policies[n] is not None]
    base, tok = models.load(models.base_name(cfg.model.policy), cfg.model)
    base.eval()
    txt, kl, followups = {}, {}, {}
    for name in names:
        model = base if name == "base" else models.load(str(policies[name]), cfg.model)[0]
        model.eval()
        cond = None if name == "base" else Conditioning.load(policies[name])  # a steerable policy: at rl.weights
        txt[name], items = _responses(model, tok, prompts, cfg, cond)
        if name != "base":
            kl[name] = kl_to_base(model, base, tok, items)
        followups[name] = eval_followups(cfg, model, tok, prompts, txt[name])
        del model
    del base
    n_tok = {name: [len(tok(t, add_special_tokens=False)["input_ids"]) for t in txt[name]] for name in names}

    scorer = RewardScorer.load(run_dir, cfg)
    scalarizer = Scalarizer.from_config(cfg.rl, scorer.objectives)
    rewards = {}
    for name in names:
        r = scalarizer.inputs(scorer, scorer.score(prompts, txt[name], followups[name]))  # (B, K) raw or z-scored
        rewards[name] = (r, scalarizer(r))  # (B, K), (B,)

    wr = {"aligned_vs_base": None, "ci95": [None, None], "n": 0}
    if cfg.eval.win_rate:
        judge = stage_judge(cfg)  # built once for both comparisons
        wr = judged_win_rate(cfg, prompts, txt["aligned"], txt["base"], judge)
        if "sft" in txt:
            vs_sft = judged_win_rate(cfg, prompts, txt["aligned"], txt["sft"], judge)
            wr["aligned_vs_sft"] = {"rate": vs_sft.pop("aligned_vs_base"), **vs_sft}

    def by_kind(texts, kind):
        return refusal_rate([t for t, k in zip(texts, kinds) if k == kind])

    present = [k for k in KINDS if k in kinds]
    metrics = {
        "objectives": scorer.objectives,
        "scalarizer": cfg.rl.scalarizer,
        "normalized": cfg.rl.normalize,
        "policies": names,
        "n_prompts": {k: kinds.count(k) for k in KINDS},
        "reward": {
            name: {"scalarized": float(s.mean()),
                   "per_objective": {o: float(r[:, k].mean()) for k, o in enumerate(scorer.objectives)},
                   "scalarized_by_kind": {kind: float(s[[k == kind for k in kinds]].mean()) for kind in present}}
            for name, (r, s) in rewards.items()
        },
        "win_rate": wr,
        "refusal_rate": {kind: {name: by_kind(txt[name], kind) for name in names} for kind in KINDS},
        "kl_to_base": kl["aligned"],
        "kl_to_base_sft": kl.get("sft"),
        "mean_response_tokens": {k: sum(v) / len(v) for k, v in n_tok.items()},
        "aligned_model": str(aligned_dir.relative_to(run_dir)) if run_dir in aligned_dir.parents else str(aligned_dir),
        "refusal_detector": "morlaif.refusal (phrase patterns in the first 160 characters)",
    }
    samples = []
    for i, (p, k) in enumerate(zip(prompts, kinds)):
        row = {"prompt": p, "kind": k}
        for name in names:
            row[name] = txt[name][i]
        for name in names:
            row[f"{name}_refusal"] = is_refusal(txt[name][i])
        for name in names:
            row[f"{name}_reward"] = float(rewards[name][1][i])
        samples.append(row)
    return metrics, samples


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `eval`: eval/metrics.json and eval/samples.jsonl on the run's held-out prompts."""
    return evaluate_into(cfg, run_dir, run_dir / "eval", aligned_path(run_dir))


def stage_inputs(run_dir: Path, aligned_dir: Path) -> list[Path]:
    """What the eval stage reads, hashed by content into its manifest (`lifecycle.content_hash`): the held-out
    prompts, the aligned policy's weights, the SFT policy's (its column, and the base rl/policy is stacked on)
    and the preference models."""
    inputs = [run_dir / "prompts" / "eval.jsonl", Path(aligned_dir), *(run_dir / f for f in PREFERENCE_MODELS)]
    sft = sft_path(run_dir, aligned_dir)
    if sft is not None:  # the SFT column
        inputs.append(sft)
    return inputs


def stage_config(cfg: Config) -> dict:
    """The config sections the eval stage depends on (its manifest's config)."""
    return cfg.sections("model", "generation", "eval", "rl")


def evaluate_into(cfg: Config, run_dir: Path, stage_dir: Path, aligned_dir: Path) -> Path:
    """The eval stage for the policy aligned_dir on RUN's held-out prompts, written to stage_dir (RUN/eval
    for the pipeline; `morlaif compare` evaluates its arms beside it)."""
    inputs = stage_inputs(run_dir, aligned_dir)

    def body(out: Path) -> dict:
        rows = read_jsonl(run_dir / "prompts" / "eval.jsonl", required=("prompt", "kind"))
        metrics, samples = evaluate(cfg, run_dir, rows, aligned_dir)
        write_jsonl(out / "samples.jsonl", samples)
        write_json(out / "metrics.json", metrics)
        return {"win_rate": metrics["win_rate"]["aligned_vs_base"], "kl_to_base": metrics["kl_to_base"]}

    return run_stage("eval", stage_dir, config=stage_config(cfg), inputs=inputs, body=body, main_only=True)


def evaluate_file(cfg: Config, run_dir: Path, prompts_file: str, out: str) -> Path:
    """`morlaif eval --prompts SOURCE --out OUT.json`: OUT.json + OUT.samples.jsonl. SOURCE: a prompt file
    or dataset (`promptsets.load_source`)."""
    rows = load_source(prompts_file, key="--prompts")
    if not rows:
        raise InputError("the prompt file is empty", file=prompts_file)
    for i, r in enumerate(rows, 1):
        if r.get("kind", "harmful") not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}", file=prompts_file, line=i, key="kind")
    metrics, samples = evaluate(cfg, run_dir, rows)
    out_p = Path(out)
    stem = str(out_p)[: -len(".json")] if out_p.suffix == ".json" else str(out_p)
    write_jsonl(stem + ".samples.jsonl", samples)
    write_json(out_p, metrics)
    return out_p
