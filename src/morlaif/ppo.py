"""PPO with a per-token KL penalty on a LoRA policy, multi-objective reward.

Read top to bottom: pure pieces (log-probs, KL estimators, GAE, the clipped losses, the KL
controller), then `train`, one loop of rollout -> reward -> advantages -> PPO epochs. One step
is one rollout batch of rl.batch_size prompts followed by rl.ppo_epochs passes of mini-batch
updates over it; rl/log.jsonl gets one row per step.

- policy π_θ: the SFT adapter merged into its base, plus a fresh LoRA adapter (the only
  trainable weights besides the value head).
- reference π_ref: the same network with the LoRA adapter disabled (`model.disable_adapter()`),
  i.e. the SFT policy, without a second copy of the weights.
- value head V_φ: one Linear on the backbone's last hidden state.
- reward: the K preference-model rewards of the response (z-scored per objective), scalarized
  (`morlaif.scalarize`) into one number placed on the last response token; every token also
  pays −β·KL_t against the reference (Ziegler et al. 2019, Stiennon et al. 2020).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from morlaif import models, training
from morlaif.artifacts import ShardWriter, read_jsonl, write_json, write_jsonl
from morlaif.conditioning import Conditioning
from morlaif.config import Config, derived_seed
from morlaif.errors import InputError
from morlaif.generation import Sampling, chat, followup_answers, generate_batch, render
from morlaif.nonfinite import NonFiniteGuard
from morlaif.preference import aspects, reward_scorer
from morlaif.processes import (across_processes, gathered_checksums, make_accelerator, mixed_precision, per_process,
                               process_slice)
from morlaif.promptsets import KINDS, eval_prompts, train_prompts
from morlaif.refusal import refusal_rate, rule_decisions, rule_reward
from morlaif.scalarize import Scalarizer
from morlaif.stats import mean

# --------------------------------------------------------------------------- pure pieces


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) per position: logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens[..., None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(π(·|s_t)) per position: (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π (Schulman, "Approximating KL").

    k1 = log π − log π_ref: unbiased, can be negative per token.
    k3 = (ρ − 1) − log ρ with ρ = π_ref / π: unbiased and always >= 0, lower variance.
    """
    log_ratio = logp - ref_logp  # (B, T) log π/π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (k1 or k3)")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce_sum=None) -> torch.Tensor:
    """Zero-mean unit-variance over the response tokens only; padding stays 0.

    reduce_sum: sums a tensor over every process (several processes: the statistics are those of
    the whole batch, as in one process, not of each process's slice).
    """
    if reduce_sum is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        n = reduce_sum(mask.sum()).clamp(min=1.0)
        mean = reduce_sum((x * mask).sum()) / n
        var = reduce_sum((((x - mean) ** 2) * mask).sum()) / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    rewards, values, mask: (B, T); mask is 1 on response tokens (a prefix of each row).
    δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, with V and A beyond the last token = 0.
    Returns advantages (B, T) and returns = advantages + values (B, T), both 0 on padding.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A_{t+1}
    for t in reversed(range(T)):
        alive_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)  # is s_{t+1} a response state?
        next_value = values[:, t + 1] * alive_next if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * alive_next * last) * mask[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_coef: float):
    """Clipped surrogate L^CLIP (Schulman et al. 2017), as a loss to minimise.

    Returns (loss, clip fraction, approx KL(π_old || π) via k3).
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               vf_clip: float):
    """Clipped value loss ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±vf_clip).

    Returns (loss, clip fraction).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((values - old_values).abs() > vf_clip).float(), mask)
    return loss, clipfrac


class AdaptiveKLController:
    """β_{n+1} = β_n (1 + clip(KL/target − 1, ±0.2) · n_steps / horizon)  (Ziegler et al. 2019).

    target None = fixed β.
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon


# --------------------------------------------------------------------------- model pieces


def load_policy(cfg: Config, init: str):
    """π_θ = `init` (the SFT adapter merged into its base) + a fresh LoRA adapter (rl.lora_target_modules,
    activation checkpointing when rl.activation_checkpointing); tokenizer."""
    from peft import get_peft_model

    rl = cfg.rl
    model, tok = models.load_sft_policy(init, cfg.model)
    training.check_lora_targets(model, rl.lora_target_modules, "rl.lora_target_modules")
    if rl.activation_checkpointing:
        training.enable_checkpointing(model)  # active in training mode only: rollouts keep their KV cache
    torch.manual_seed(0)  # LoRA A init: the same fresh adapter whatever ran before
    return get_peft_model(model, models.policy_lora(rl.lora_r, rl.lora_target_modules)), tok


def forward(model, value_head, input_ids, attention_mask, P: int, temperature: float, with_values: bool = True):
    """One pass over prompt+response; returns response-position logits (B, T, V) and values (B, T).

    Position t of the response is predicted from the hidden state at P + t − 1, so we run the
    backbone once, slice those T states, and apply the LM head only to them (the full
    (B, P+T, V) logits would be mostly wasted memory).
    """
    T = input_ids.shape[1] - P
    # left padding: each row's positions start at its first real token, as in generate()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # (B, P+T, H)
    h = hidden[:, P - 1 : P + T - 1]  # (B, T, H) states s_t before each response token
    logits = lm.get_output_embeddings()(h).float() / temperature  # (B, T, V) the sampling distribution
    values = value_head(h.float()).squeeze(-1) if with_values else None  # (B, T)
    return logits, values


class PolicyValue(torch.nn.Module):
    """π_θ and V_φ as one module: what `accelerator.prepare` wraps (DDP), so every pass that needs
    gradients, synchronised across processes, goes through one forward with every trainable weight."""

    def __init__(self, model, value_head: torch.nn.Linear):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, input_ids, attention_mask, P: int, temperature: float, with_values: bool = True):
        return forward(self.model, self.value_head, input_ids, attention_mask, P, temperature, with_values)


def step_prompts(prompts: list[str], step: int, batch_size: int, seed: int) -> list[str]:
    """Prompts of (0-based) step `step`: epochs over a seeded shuffle, a pure function of step (resume)."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, len(prompts))
        order = list(range(len(prompts)))
        random.Random(derived_seed(seed, epoch)).shuffle(order)
        out.append(prompts[order[j]])
    return out


def score(cfg: Config, scorer, model, tok, prompts: list[str], responses: list[str], seed: int) -> torch.Tensor:
    """Raw rewards (B, K) of the rollouts for the scorer's objectives. An aspect objective reads the
    policy's answer to its follow-up question, sampled as the labels' were (`Sampling.from_config(cfg,
    "followup")`), so the preference model scores what it was trained on."""
    followups = followup_answers(model, tok, prompts, responses, aspects(scorer.objectives), seed=seed,
                                 sampling=Sampling.from_config(cfg, "followup"))
    return scorer.score(prompts, responses, followups).float().cpu()  # (B, K)


def rollout_inputs(cfg: Config, run_dir: Path, init: str | None, scorer, prompts: list[str] | None,
                   should_refuse: dict[str, bool] | None) -> tuple[str, object, list[str], dict[str, bool]]:
    """What an online learner (PPO, RAFT) starts from, each argument defaulting to the run's: the SFT policy, the
    preference models, the rl stage's prompts, and the feedback model's decisions on them for the refusal rule
    (none on prompts the caller passes in)."""
    init = init or str(run_dir / "sft" / "model")
    scorer = scorer or reward_scorer(run_dir, cfg)
    own_prompts = prompts is None
    prompts = [r["prompt"] for r in train_prompts(run_dir, stage="rl")] if own_prompts else prompts
    if not prompts:
        raise InputError("no train prompts for RL", file=str(run_dir / "prompts" / "train.jsonl"))
    if should_refuse is None:  # the refusal rule checks the run's own rl prompts against the feedback model's decisions
        should_refuse = rule_decisions(run_dir, prompts) if cfg.rl.refusal_reward and own_prompts else {}
    return init, scorer, prompts, should_refuse


def _optimizer_step(params, optimizer, rl, guard: NonFiniteGuard, step: int,
                    clip=torch.nn.utils.clip_grad_norm_) -> bool:
    """Clip and step; a NaN/inf gradient norm skips the update (and counts as a skipped step).

    clip: `accelerator.clip_grad_norm_` under several processes (the norm of the synced gradients)."""
    norm = clip(params, rl.max_grad_norm)
    if not guard.check(step + 1, grad_norm=norm):
        return False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def heldout_rows(run_dir: Path, n: int) -> list[dict]:
    """The fixed held-out prompts of rl.heldout_every: the first n/2 harmful and n - n/2 benign eval prompts
    (none when the run has no eval split, e.g. PPO called on prompts of the caller's choosing)."""
    if not (run_dir / "prompts" / "eval.jsonl").is_file():
        return []
    rows = eval_prompts(run_dir)
    harmful, benign = [r for r in rows if r["kind"] == "harmful"], [r for r in rows if r["kind"] == "benign"]
    return harmful[: n // 2] + benign[: n - n // 2]


@torch.no_grad()
def heldout_reward(cfg: Config, scorer, scalarizer, model, tok, rows: list[dict],
                   cond: Conditioning | None = None) -> dict:
    """Greedy answers of the policy to `rows`, scored like rollouts: the reward curve on prompts never trained on.
    A conditioned policy is asked at the configured weights (rl.weights), which the scalarizer also uses."""
    was_training = model.training
    model.eval()
    prompts = [r["prompt"] for r in rows]
    greedy = Sampling.from_config(cfg, "rollout").replace(temperature=0.0)
    convs = [cond.messages(p) if cond else chat(p) for p in prompts]
    gen = generate_batch(model, tok, convs, **greedy.batch_kwargs())
    raw = score(cfg, scorer, model, tok, prompts, gen.texts, seed=cfg.seed)  # (N, K)
    s = scalarizer(scalarizer.inputs(scorer, raw).float().cpu())  # (N,)
    model.train(was_training)
    kinds = [r["kind"] for r in rows]
    return {"scalarized_reward": s.mean().item(),
            "objective_rewards": {o: raw[:, k].mean().item() for k, o in enumerate(scorer.objectives)},
            "refusal_rate": {kind: refusal_rate([t for t, k in zip(gen.texts, kinds) if k == kind])
                             for kind in KINDS if kind in kinds},
            "response_tokens": gen.response_lengths.float().mean().item(), "n": len(rows)}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(ckpt: Path, model, value_head, optimizer, step: int, kl_coef: float,
                    skipped: list[int] = ()) -> None:
    """Adapter, value head, optimizer state, RNG (safetensors) + step, β, param groups, steps skipped for
    NaN/inf (JSON); atomic rename. No pickle anywhere: a checkpoint cannot run code when loaded."""
    from peft import get_peft_model_state_dict

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              tmp / "adapter.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
              tmp / "value_head.safetensors")
    opt = optimizer.state_dict()
    save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()},
              tmp / "optimizer.safetensors")
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    py_state = random.getstate()
    write_json(tmp / "state.json", {"step": step, "kl_coef": kl_coef, "param_groups": opt["param_groups"],
                                    "python_random": [py_state[0], list(py_state[1]), py_state[2]],
                                    "numpy_random": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
                                    "skipped_nonfinite": list(skipped)})
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)


def load_checkpoint(ckpt: Path, model, value_head, optimizer) -> dict:
    from peft import set_peft_model_state_dict

    state = json.loads((ckpt / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
    value_head.load_state_dict(load_file(ckpt / "value_head.safetensors"))
    flat = load_file(ckpt / "optimizer.safetensors")
    opt_state: dict = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    v, s, g = state["python_random"]
    random.setstate((v, tuple(s), g))
    if "numpy" in rng:  # numpy is not used here, but a scorer may use it
        name, pos, has_gauss, gauss = state["numpy_random"]
        np.random.set_state((name, rng["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    return state


def resume(stage_dir: Path, model, value_head, optimizer, kl_ctl: AdaptiveKLController, guard: NonFiniteGuard,
           accelerator) -> int:
    """The step to start from: the checkpoint's (weights, optimizer, RNG, β and skipped steps restored,
    log rows of steps after it dropped), else 0 with no log. Every process restores; the main one
    rewrites the log."""
    ckpt, log_path = stage_dir / "checkpoint", stage_dir / "log.jsonl"
    accelerator.wait_for_everyone()  # every process has seen the checkpoint before the main one touches the log
    if not (ckpt / "state.json").is_file():
        for path in (log_path, stage_dir / "heldout.jsonl"):
            if path.exists() and accelerator.is_main_process:
                path.unlink()  # no checkpoint: every logged step is redone
        return 0
    state = load_checkpoint(ckpt, model, value_head, optimizer)
    kl_ctl.value = state["kl_coef"]
    guard.steps = list(state.get("skipped_nonfinite", []))
    guard.count = len(guard.steps)
    for path in (log_path, stage_dir / "heldout.jsonl"):
        if path.exists() and accelerator.is_main_process:
            write_jsonl(path, [r for r in read_jsonl(path, shard=True) if r["step"] <= state["step"]])
    return state["step"]


# --------------------------------------------------------------------------- logging


class Loggers:
    """rl/log.jsonl (always; its keys are documented in morlaif.rl) + the run's tracker (logging.report_to:
    TensorBoard in rl/tensorboard/ or W&B, as every training stage)."""

    def __init__(self, cfg: Config, stage_dir: Path, start_step: int):
        self.jsonl = ShardWriter(stage_dir / "log.jsonl")
        self.tracker = training.Tracker(cfg, stage_dir.parent, stage_dir.name, start_step)

    def log(self, row: dict) -> None:
        self.jsonl.append([row])
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        flat.update({f"objective/{k}": v for k, v in row["objective_rewards"].items()})
        self.tracker.log(flat, row["step"])

    def close(self) -> None:
        self.tracker.close()


def log_row(step: int, accelerator, objectives: list[str], s, raw, rule, kl_t, lengths, ent_sum, stats: dict,
            kl_coef: float, lr: float, skipped: int, t0: float, cpu0: float, t_rollout: float, t_reward: float) -> dict:
    """The rl/log.jsonl row of 0-based `step`, over the whole batch: per-response values gathered from
    every process, token sums and minibatch means reduced (one process: the tensors themselves).

    s (B,) scalarized rewards, raw (B, K) raw rewards, rule (B,) the refusal rule's ±1 (None without the rule),
    kl_t (B, T) per-token KL, lengths (B,), ent_sum (2,) summed entropy and token count, stats: per-minibatch
    losses and clip fractions.
    """
    world, device = accelerator.num_processes, s.device
    s_all, raw_all = accelerator.gather(s), accelerator.gather(raw.to(device)).cpu()  # (B,), (B, K)
    rule_all = accelerator.gather(rule) if rule is not None else None  # (B,)
    seq_kl_all, lengths_all = accelerator.gather(kl_t.sum(1)), accelerator.gather(lengths)  # (B,), (B,)
    ent_sum = accelerator.reduce(ent_sum, "sum") if world > 1 else ent_sum

    def mb_mean(xs: list[float]) -> float:  # over minibatches, then over processes
        local = torch.tensor(sum(xs) / len(xs), dtype=torch.float64, device=device)
        return accelerator.reduce(local, "mean").item() if world > 1 else local.item()

    return {
        "step": step + 1,
        "scalarized_reward": s_all.mean().item(),
        "objective_rewards": {o: raw_all[:, k].mean().item() for k, o in enumerate(objectives)},
        "objective_std": {o: raw_all[:, k].std(unbiased=False).item() for k, o in enumerate(objectives)},
        # share of rollouts refusing exactly when the feedback model does (rl.refusal_reward; null without the rule)
        "rule_agreement": (rule_all.mean().item() + 1) / 2 if rule_all is not None else None,
        "kl": seq_kl_all.mean().item(),  # mean over responses of Σ_t KL_t
        "entropy": (ent_sum[0] / ent_sum[1].clamp(min=1.0)).item(),
        "policy_loss": mb_mean(stats["pg"]),
        "value_loss": mb_mean(stats["vf"]),
        "response_tokens": lengths_all.float().mean().item(),
        "kl_coef": kl_coef,
        "clipfrac_policy": mb_mean(stats["pg_clip"]),
        "clipfrac_value": mb_mean(stats["vf_clip"]),
        "approx_kl": mb_mean(stats["approx_kl"]),
        "lr": lr,
        "step_time_s": time.monotonic() - t0,
        "step_cpu_s": time.process_time() - cpu0,  # CPU seconds, all threads: robust to a shared machine
        "time_rollout_s": t_rollout,
        "time_reward_s": t_reward,
        "skipped_nonfinite": skipped,  # steps skipped so far for a NaN/inf reward or loss
    }


# --------------------------------------------------------------------------- training loop


def train(cfg: Config, run_dir: Path, stage_dir: Path, *, scorer=None, init: str | None = None,
          prompts: list[str] | None = None, should_refuse: dict[str, bool] | None = None) -> dict:
    """PPO for cfg.rl.steps rollout batches; writes stage_dir/{policy/, value_head.safetensors, log.jsonl}.

    scorer: object with .objectives, .score(prompts, responses, followups) -> (B, K), .normalize(r);
    default the run's preference models (rl.reward_model). init: the policy to start from; default RUN/sft/model. prompts: default
    the rl stage's share of the run's train prompts. should_refuse: prompt -> the feedback model's decision, for the
    refusal rule (rl.refusal_reward); default the run's (feedback/decisions.jsonl) on the run's own prompts, none on
    prompts passed in (an empty dict: no rule). Resumes from stage_dir/checkpoint when present. Returns the run's figures
    for rl/metrics.json (`rl.metrics` completes them from the log).
    """
    rl = cfg.rl
    run_dir, stage_dir = Path(run_dir), Path(stage_dir)
    init, scorer, prompts, should_refuse = rollout_inputs(cfg, run_dir, init, scorer, prompts, should_refuse)
    objectives = list(scorer.objectives)
    scalarizer = Scalarizer.from_config(rl, objectives)
    cond = Conditioning.from_config(rl, objectives)  # rl.conditioning: prompt -> each episode's own weights
    rollout = Sampling.from_config(cfg, "rollout")  # rl.temperature, top_p 1, no repetition penalty

    # Several processes (accelerate launch): each samples its own slice of the step's prompts,
    # gradients are averaged by DDP, statistics are gathered, and only the main process writes.
    accelerator = make_accelerator(cfg.model.device, mixed_precision(cfg.model.mixed_precision, cfg.model.device))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    B, mb = rl.batch_size, min(rl.mini_batch_size, rl.batch_size)
    b_local, mb_local = per_process(B, "rl.batch_size"), per_process(mb, "rl.mini_batch_size")
    reduce_sum = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else None

    model, tok = load_policy(cfg, init)
    device = next(model.parameters()).device
    hidden_size = model.get_base_model().get_output_embeddings().in_features
    value_head = torch.nn.Linear(hidden_size, 1).to(device)  # V_φ(s_t), float32
    torch.nn.init.zeros_(value_head.weight)  # V starts at 0: the first advantages are the plain returns
    torch.nn.init.zeros_(value_head.bias)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=rl.learning_rate, eps=1e-5)
    net, optimizer = accelerator.prepare(PolicyValue(model, value_head), optimizer)  # one process: net is unwrapped
    kl_ctl = AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    guard = NonFiniteGuard("rl", rl.max_nonfinite_steps, "rl.max_nonfinite_steps",
                           any_process=across_processes(accelerator, device))
    ckpt = stage_dir / "checkpoint"
    start = resume(stage_dir, model, value_head, optimizer, kl_ctl, guard, accelerator)
    loggers = Loggers(cfg, stage_dir, start) if main else None

    def checkpoint(step: int) -> None:  # after 0-based `step`; the last step needs none (the stage saves)
        if main and (step + 1) % rl.save_every == 0 and step + 1 < rl.steps:
            save_checkpoint(ckpt, model, value_head, optimizer, step + 1, kl_ctl.value, guard.steps)

    # The reward curve on fixed held-out prompts (main process; the others wait at their next sync).
    heldout = heldout_rows(run_dir, rl.heldout_prompts) if rl.heldout_every and main else []
    heldout_log = ShardWriter(stage_dir / "heldout.jsonl") if heldout else None

    def track(done: int) -> None:  # after `done` optimisation steps
        if heldout and (done == 0 or done % rl.heldout_every == 0 or done == rl.steps):
            heldout_log.append([{"step": done, **heldout_reward(cfg, scorer, scalarizer, model, tok, heldout,
                                                                 cond)}])

    if start == 0:
        track(0)

    history: list[dict] = []
    lrs = [rl.learning_rate * f for f in training.lr_factors(rl.lr_scheduler_type, rl.warmup_steps, rl.steps)]
    t_begin = time.monotonic()
    bar = tqdm(range(start, rl.steps), initial=start, total=rl.steps, desc="ppo", disable=not main)
    for step in bar:
        t0, cpu0 = time.monotonic(), time.process_time()
        training.set_lr(optimizer, lrs[step])  # rl.lr_scheduler_type over rollout steps: a function of the step
        # ---- 1. rollout: sample responses from π_θ (top_p 1: PPO's ratio needs the true sampling distribution)
        model.eval()
        batch = process_slice(step_prompts(prompts, step, B, cfg.seed), rank, b_local)  # this process's prompts
        # conditioned: each episode's weights (a function of the step, so a resumed run draws the same),
        # shown to the policy as a system line and used by the scalarizer below
        W = torch.stack(process_slice(list(cond.draw(cfg.seed, step, B)), rank, b_local)) if cond else None  # (b, K)
        convs = [cond.messages(p, w) for p, w in zip(batch, W)] if cond else [chat(p) for p in batch]
        texts = [render(tok, c) for c in convs]
        seed = derived_seed(cfg.seed, step + rank * 7_919_993)  # rank 0 (and a single process) keeps the plain seed
        gen = generate_batch(model, tok, texts, **rollout.batch_kwargs(), seed=seed)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        lengths = gen.response_lengths.to(device)  # (B,) incl. EOS
        T = int(lengths.max())
        response = gen.response_ids[:, :T].to(device)  # (B, T)
        P = enc["input_ids"].shape[1]
        mask = (torch.arange(T, device=device)[None] < lengths[:, None]).float()  # (B, T) response tokens
        input_ids = torch.cat([enc["input_ids"], response], 1)  # (B, P+T)
        attention_mask = torch.cat([enc["attention_mask"], mask.long()], 1)  # (B, P+T)

        t_rollout = time.monotonic() - t0
        # ---- 2. rewards: K objectives -> z-scores (rl.normalize) -> one scalar per response (rl.scalarizer)
        raw = score(cfg, scorer, model, tok, batch, gen.texts, seed=seed)  # (B, K)
        s = scalarizer(scalarizer.inputs(scorer, raw).float().cpu(), weights=W).to(device)  # (B,)
        # the refusal rule (rl.refusal_reward): ±1 per rollout against the feedback model's decision on its prompt
        rule = torch.tensor(rule_reward(gen.texts, [should_refuse[p] for p in batch]),
                            device=device) if should_refuse else None  # (B,)

        t_reward = time.monotonic() - t0 - t_rollout
        # ---- 3. old log-probs, values, reference log-probs (no grad)
        # (through `net`: under mixed precision these passes autocast exactly like the update's)
        with torch.no_grad():
            logits, old_values = net(input_ids, attention_mask, P, rl.temperature)
            old_logp = logprobs_from_logits(logits, response)  # (B, T)
            ent_sum = torch.stack([(entropy_from_logits(logits) * mask).sum(), mask.sum()])  # for the masked mean
            del logits
            with model.disable_adapter():  # π_ref: the SFT policy, same weights
                ref_logits, _ = net(input_ids, attention_mask, P, rl.temperature, False)
            ref_logp = logprobs_from_logits(ref_logits, response)  # (B, T)
            del ref_logits
            kl_t = kl_estimate(old_logp, ref_logp, rl.kl_estimator) * mask  # (B, T)
            rewards = -kl_ctl.value * kl_t  # (B, T) per-token KL penalty
            # the scalarized reward (and the rule) on the last token
            rewards[torch.arange(len(batch), device=device), lengths - 1] += \
                s if rule is None else s + rl.refusal_reward * rule
            old_values = old_values * mask
            advantages, returns = compute_gae(rewards, old_values, mask, rl.gamma, rl.gae_lambda)  # (B, T)
            advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)  # whole-batch statistics
        # A NaN/inf reward (a preference model overflowing) or KL: learn nothing from this batch.
        if not guard.check(step + 1, objective_rewards=raw, scalarized_reward=s, kl=kl_t, advantages=advantages):
            checkpoint(step)
            continue

        # ---- 4. PPO epochs over minibatches
        model.train()
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "ent", "pg_clip", "vf_clip", "approx_kl")}
        n_mb, finite = 0, True
        for _ in range(rl.ppo_epochs):
            for idx in torch.randperm(b_local).split(mb_local):  # the same number of minibatches on every process
                idx = idx.to(device)
                logits, values = net(input_ids[idx], attention_mask[idx], P, rl.temperature)
                logp = logprobs_from_logits(logits, response[idx])  # (b, T)
                ent = masked_mean(entropy_from_logits(logits), mask[idx])
                pg, pg_clip, approx_kl = policy_loss(logp, old_logp[idx], advantages[idx], mask[idx], rl.clip_coef)
                vf, vf_clip = value_loss(values, old_values[idx], returns[idx], mask[idx], rl.vf_clip)
                loss = pg + rl.vf_coef * vf - rl.ent_coef * ent
                # checked before backward: a NaN gradient would reach the weights and Adam's moments
                if not (finite := guard.check(step + 1, policy_loss=pg, value_loss=vf, entropy=ent)):
                    break
                accelerator.backward(loss / rl.grad_accum)  # DDP: gradients averaged over processes here
                n_mb += 1
                if n_mb % rl.grad_accum == 0 and not (finite := _optimizer_step(params, optimizer, rl, guard, step,
                                                                                  accelerator.clip_grad_norm_)):
                    break
                for k, v in zip(stats, (pg, vf, ent, pg_clip, vf_clip, approx_kl)):
                    stats[k].append(float(v.detach()))
            if not finite:
                break
        if finite and n_mb % rl.grad_accum:  # a partial accumulation at the end of the step still counts
            finite = _optimizer_step(params, optimizer, rl, guard, step, accelerator.clip_grad_norm_)
        if not finite:  # the rest of this step's updates are dropped; earlier (finite) ones stay
            optimizer.zero_grad(set_to_none=True)
            checkpoint(step)
            continue

        # ---- 5. log (whole-batch statistics), β update, checkpoint
        row = log_row(step, accelerator, objectives, s, raw, rule, kl_t, lengths, ent_sum, stats, kl_ctl.value,
                      optimizer.param_groups[0]["lr"], guard.count, t0, cpu0, t_rollout, t_reward)
        kl_ctl.update(row["kl"], B)  # the same β on every process
        history.append(row)
        if main:
            loggers.log(row)
            bar.set_postfix(reward=f"{row['scalarized_reward']:.3f}", kl=f"{row['kl']:.3f}")
        track(step + 1)
        checkpoint(step)
    bar.close()
    if main:
        loggers.close()

    # ---- final artifacts: the policy adapter (stacked on `init`), the value head
    # One checksum of the trained weights per process: all equal unless DDP failed to keep them in sync.
    checksums = gathered_checksums((n, p) for n, p in net.named_parameters() if p.requires_grad)
    if main:
        models.save_adapter(model, tok, stage_dir / "policy", base=init)  # load_model(policy) stacks it on init
        if cond:
            cond.save(stage_dir / "policy")
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                  stage_dir / "value_head.safetensors")
        shutil.rmtree(ckpt, ignore_errors=True)  # the stage is complete: nothing left to resume
    accelerator.wait_for_everyone()
    times = [r["step_time_s"] for r in history]
    cpu = [r["step_cpu_s"] for r in history]
    return {
        "objectives": objectives,
        "scalarizer": rl.scalarizer,
        "seconds_per_step": mean(times),
        "cpu_seconds_per_step": mean(cpu),
        "wall_s_this_run": time.monotonic() - t_begin,
        "resumed_from": start or None,
        "processes": world,
        "param_checksums": checksums,
        "skipped_nonfinite": guard.count,
        "skipped_nonfinite_steps": guard.steps,
        "data": {"prompts": len(prompts)},
        "heldout": read_jsonl(stage_dir / "heldout.jsonl") if heldout else [],
    }
