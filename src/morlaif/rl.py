"""Stage `rl`: policy optimisation on the scalarized multi-objective reward.

RUN/rl/ gets policy/ (a LoRA adapter stacked on RUN/sft/model, so
`models.load_model("RUN/rl/policy")` gives the aligned policy; `morlaif export` makes it one
adapter on the base, or one merged model), log.jsonl, metrics.json and tensorboard/.
PPO and RAFT are ours (`morlaif.ppo`, `morlaif.raft`); GRPO / RLOO / DPO / IPO / KTO go through TRL (`morlaif.trl_algos`).

log.jsonl: one row per step (keys: step (1-based), scalarized_reward, objective_rewards,
kl, entropy, policy_loss, value_loss, response_tokens; null where the algorithm has none). A PPO
step is one rollout batch followed by rl.ppo_epochs passes of mini-batch updates (PPO's rows add
objective_std, kl_coef, clip fractions, timings); a TRL step is one optimiser step.
metrics.json: `metrics` below, the same keys for every algorithm.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import torch

from morlaif import ppo, raft, trl_algos
from morlaif.artifacts import read_json, read_jsonl, write_json
from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.lifecycle import PREFERENCE_MODELS, run_stage
from morlaif.preference import check_trained_objectives
from morlaif.processes import is_main_process

ALGOS = {"ppo": ppo.train, "grpo": trl_algos.run, "rloo": trl_algos.run, "raft": raft.train, "dpo": trl_algos.run,
         "ipo": trl_algos.run, "kto": trl_algos.run}


def metrics(algo: str, log: list[dict], figures: dict) -> dict:
    """rl/metrics.json: the run's figures (what the algorithm returned) and its log, one schema for
    every algorithm; a figure an algorithm does not have is null."""
    first, last = (log[0], log[-1]) if log else ({}, {})
    rewards = [r["scalarized_reward"] for r in log if r.get("scalarized_reward") is not None]
    return {
        "algo": algo,
        "steps": len(log),
        "objectives": figures.get("objectives"),
        "scalarizer": figures.get("scalarizer"),
        "scalarized_reward_first": first.get("scalarized_reward"),
        "scalarized_reward_last": last.get("scalarized_reward"),
        "policy_loss_first": first.get("policy_loss"),
        "policy_loss_last": last.get("policy_loss"),
        "kl_last": last.get("kl"),
        # PPO and RAFT under rl.refusal_reward: share of rollouts refusing exactly when the feedback model does
        "rule_agreement_first": first.get("rule_agreement"),
        "rule_agreement_last": last.get("rule_agreement"),
        "finite": all(math.isfinite(x) for x in rewards),
        "train_loss": figures.get("train_loss"),  # TRL's mean training loss
        "seconds_per_step": figures.get("seconds_per_step"),
        "cpu_seconds_per_step": figures.get("cpu_seconds_per_step"),
        "wall_s_this_run": figures.get("wall_s_this_run"),
        "resumed_from": figures.get("resumed_from"),  # the step a resumed run started from
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "processes": figures.get("processes"),
        "param_checksums": figures.get("param_checksums"),  # PPO: one per process (TRL: DDP's own business)
        "skipped_nonfinite": figures.get("skipped_nonfinite"),
        "skipped_nonfinite_steps": figures.get("skipped_nonfinite_steps"),
        "data": figures.get("data"),  # prompts (PPO, GRPO, RLOO) or relabelling counts (DPO, IPO, KTO)
        # PPO: the scalarized reward of greedy answers to fixed held-out prompts, per tracked step (rl/heldout.jsonl)
        "heldout_scalarized_reward": {r["step"]: r["scalarized_reward"] for r in figures.get("heldout") or []} or None,
    }


def stage_inputs(cfg: Config, run_dir: Path) -> list[Path]:
    """What the rl stage reads from the run, hashed by content into its manifest (`lifecycle.content_hash`):
    the SFT policy (its weights: a redone sft stage is a new input), the preference models, and what it
    trains on: the train prompts and the feedback model's decisions on them (online algorithms, the refusal
    rule) or the AI labels (offline ones)."""
    inputs = [*(run_dir / f for f in PREFERENCE_MODELS), run_dir / "sft" / "model"]
    if cfg.rl.algo in ("dpo", "ipo", "kto"):  # offline algorithms train on the AI labels themselves
        inputs.append(run_dir / "feedback" / "labels.jsonl")
    else:
        inputs.append(run_dir / "prompts" / "train.jsonl")
        if cfg.rl.refusal_reward:  # the refusal rule's decisions (refusal.rule_decisions)
            inputs.append(run_dir / "feedback" / "decisions.jsonl")
    if cfg.rl.algo in ("ppo", "raft") and cfg.rl.heldout_every and (run_dir / "prompts" / "eval.jsonl").is_file():
        inputs.append(run_dir / "prompts" / "eval.jsonl")  # PPO's held-out reward curve (ppo.heldout_rows)
    return inputs


def stage_config(cfg: Config) -> dict:
    """The config sections the rl stage depends on (its manifest's config)."""
    return cfg.sections("model", "constitution", "generation", "rl")


def algorithm_config(cfg: Config) -> Config:
    """The config the algorithm trains with. On the holistic baseline (rl.reward_model) the reward has one
    objective, the holistic model's (z-scored) reward: the linear scalarizer with no weights passes it on
    unchanged, where rl.weights (naming the K objectives) would not apply and bernoulli_nash would bend it."""
    if cfg.rl.reward_model != "holistic":
        return cfg
    algo_cfg = cfg.model_copy(deep=True)
    algo_cfg.rl.scalarizer, algo_cfg.rl.weights = "linear", None
    return algo_cfg


def check_holistic(cfg: Config, run_dir: Path) -> None:
    """rl.reward_model = holistic needs an algorithm that learns from a preference model, and the run's
    holistic one (the rm stage trains it from the holistic labels unless rm.baseline is off)."""
    if cfg.rl.reward_model != "holistic":
        return
    if cfg.rl.algo not in ("ppo", "grpo", "rloo", "raft"):
        raise InputError(f"the holistic baseline is a preference model to learn from: rl.algo ppo, grpo, rloo or raft, "
                         f"not {cfg.rl.algo} (which learns from the labels)", key="rl.reward_model")
    meta = run_dir / "rm" / "objectives.json"
    if not read_json(meta).get("baseline_adapter"):
        raise InputError("the run has no holistic baseline preference model (no holistic labels, or rm.baseline off)",
                         file=str(meta), key="rl.reward_model")


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `rl`: RUN/rl/."""
    return train_into(cfg, Path(run_dir), Path(run_dir) / "rl")


def train_into(cfg: Config, run_dir: Path, stage_dir: Path) -> Path:
    """The rl stage on RUN's SFT policy and preference models, written to stage_dir (RUN/rl for the
    pipeline; `morlaif compare` trains its arms beside it)."""
    if (run_dir / "rm" / "objectives.json").is_file():  # the clearest message first, before any manifest is read
        check_trained_objectives(run_dir, cfg)
    inputs = stage_inputs(cfg, run_dir)
    for p in inputs:
        if not p.exists():
            stage = p.relative_to(run_dir).parts[0]
            raise InputError(f"missing input of the rl stage: run `morlaif {stage} --run {run_dir}` first", file=str(p))
    check_holistic(cfg, run_dir)

    def body(out: Path) -> dict:
        figures = ALGOS[cfg.rl.algo](algorithm_config(cfg), run_dir, out)  # every process trains; the main one writes
        if not is_main_process():
            return {}
        summary = {**metrics(cfg.rl.algo, read_jsonl(out / "log.jsonl", shard=True), figures),
                   "reward_model": cfg.rl.reward_model, "conditioning": cfg.rl.conditioning}
        write_json(out / "metrics.json", summary)
        return summary

    return run_stage("rl", stage_dir, config=stage_config(cfg), inputs=inputs, body=body)
