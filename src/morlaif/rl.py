"""Stage `rl`: policy optimisation on the scalarized multi-objective reward.

RUN/rl/ gets policy/ (a LoRA adapter stacked on RUN/sft/model, so
`models.load_model("RUN/rl/policy")` gives the aligned policy; `morlaif export` makes it one
adapter on the base, or one merged model), log.jsonl, metrics.json and tensorboard/.
PPO is ours (`morlaif.ppo`); GRPO / RLOO / DPO / IPO / KTO go through TRL (`morlaif.trl_algos`).

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

from morlaif import models, ppo, trl_algos
from morlaif.artifacts import read_jsonl, run_stage, write_json
from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.preference import check_trained_objectives
from morlaif.processes import is_main_process

ALGOS = {"ppo": ppo.train, "grpo": trl_algos.run, "rloo": trl_algos.run, "dpo": trl_algos.run,
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
    }


def run(cfg: Config, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    stage_dir = run_dir / "rl"
    sft = run_dir / "sft" / "model"
    # the SFT policy's weights, not only its config: a redone sft stage is a new input
    inputs = [run_dir / "rm" / "metrics.json", *(models.saved_model_files(sft) or [sft / "adapter_config.json"])]
    if cfg.rl.algo in ("dpo", "ipo", "kto"):  # offline algorithms train on the AI labels themselves
        inputs.append(run_dir / "feedback" / "labels.jsonl")
    for p in inputs:
        if not p.is_file():
            stage = p.relative_to(run_dir).parts[0]
            raise InputError(f"missing input of the rl stage: run `morlaif {stage} --run {run_dir}` first", file=str(p))
    if (run_dir / "rm" / "objectives.json").is_file():  # a clear message before any manifest is read
        check_trained_objectives(run_dir, cfg)

    def body(out: Path) -> dict:
        figures = ALGOS[cfg.rl.algo](cfg, run_dir, out)  # every launched process trains; the main one writes
        if not is_main_process():
            return {}
        summary = metrics(cfg.rl.algo, read_jsonl(out / "log.jsonl", shard=True), figures)
        write_json(out / "metrics.json", summary)
        return summary

    return run_stage("rl", stage_dir, config=cfg.sections("model", "constitution", "generation", "rl"), inputs=inputs,
                     body=body)
