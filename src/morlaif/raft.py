"""RAFT: reward-ranked fine-tuning (Dong et al. 2023; rejection-sampling fine-tuning, expert iteration).

Read top to bottom: `best_of_groups` (the pure selection), then `train`, one loop of
sample -> reward -> keep each prompt's best -> supervised passes over what was kept. One step is one
round over every rl prompt; rl/log.jsonl gets one row per round (the keys of `morlaif.rl`).

- policy π_θ: the SFT adapter merged into its base plus a fresh LoRA adapter, as PPO's (`ppo.load_policy`).
- round t: N = rl.num_generations samples per prompt from π_θ (rl.temperature, top_p 1), the K
  preference-model rewards scalarized (rl.scalarizer) plus the refusal rule's ±λ (rl.refusal_reward);
  per prompt the sample with the highest reward is kept, and dropped when it breaks the rule (it would
  teach the decision the feedback model did not take); with rl.balance_kept the rarer decision's kept
  samples (refusals, usually) are repeated until both decisions are as many (`balanced`); then
  rl.ppo_epochs passes of the SFT loss (−log π_θ of the kept response's tokens) in mini-batches of
  rl.mini_batch_size.
- no KL penalty: the policy moves only toward its own best samples; rl/log.jsonl's `kl` is the kept
  responses' Σ_t (log π_θ − log π_ref) before the round's update (π_ref: the adapter disabled).

Why it is here: PPO's and GRPO's per-token credit assignment needs far more rollouts than a CPU gives a
small policy to learn a decision that depends on the prompt (refuse this, answer that); RAFT turns the
same samples and rewards into supervised targets, which a small policy learns from in a few rounds.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from morlaif import models, ppo, training
from morlaif.artifacts import ShardWriter, read_jsonl
from morlaif.config import Config, derived_seed
from morlaif.errors import InputError
from morlaif.generation import Sampling, chat, generate_batch, render
from morlaif.processes import world_size
from morlaif.refusal import rule_reward
from morlaif.scalarize import Scalarizer
from morlaif.stats import mean


def best_of_groups(reward: torch.Tensor, rule: torch.Tensor | None) -> list[int | None]:
    """Per prompt, the index (0..N-1) of its highest-reward sample, or None when that sample breaks the rule
    or no sample has a finite reward (a preference model overflowing is never a reason to keep a sample).

    reward (P, N): the total reward of each prompt's N samples; rule (P, N): the refusal rule's ±1, or None.
    """
    finite = torch.where(torch.isfinite(reward), reward, torch.full_like(reward, -torch.inf))  # (P, N)
    best = finite.argmax(1)  # (P,)
    return [int(j) if torch.isfinite(finite[i, j]) and (rule is None or rule[i, j] > 0) else None
            for i, j in enumerate(best)]


def balanced(refuses: list[bool]) -> list[int]:
    """The rows to train on, as indices into the kept samples (`refuses`: whether each refuses), the rarer kind's
    repeated in turn until both kinds are as many: [T, F, F, F] -> [1, 2, 3, 0, 0, 0] (the larger kind first;
    refusals first on a tie). One kind only: each once.

    Why: a round keeps one sample per prompt whose best obeys the rule; when most prompts should be answered
    the kept set is mostly answers, and a small policy learns "answer" rather than "answer these"."""
    ref = [i for i, r in enumerate(refuses) if r]
    ans = [i for i, r in enumerate(refuses) if not r]
    if not ref or not ans:
        return list(range(len(refuses)))
    small, big = (ref, ans) if len(ref) < len(ans) else (ans, ref)
    return big + [small[k % len(small)] for k in range(len(big))]


def sft_batch(tok, prompt_ids: list[torch.Tensor], response_ids: list[torch.Tensor], device):
    """(input_ids, attention_mask, labels) of prompt + response rows, right-padded; labels -100 on the
    prompt and the padding, so the loss is the response's tokens only."""
    rows = [torch.cat([p, r]) for p, r in zip(prompt_ids, response_ids)]
    L = max(len(x) for x in rows)
    pad = tok.pad_token_id
    input_ids = torch.full((len(rows), L), pad, dtype=torch.long)  # (b, L)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)  # (b, L)
    mask = torch.zeros((len(rows), L), dtype=torch.long)  # (b, L)
    for i, (x, p) in enumerate(zip(rows, prompt_ids)):
        input_ids[i, : len(x)], mask[i, : len(x)] = x, 1
        labels[i, len(p): len(x)] = x[len(p):]
    return input_ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def sequence_kl(model, tok, prompt_ids: list[torch.Tensor], response_ids: list[torch.Tensor], device,
                batch_size: int) -> float:
    """Mean over the rows of Σ_t (log π_θ − log π_ref) of the response tokens (π_ref: the adapter disabled)."""
    total = 0.0
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask, labels = sft_batch(tok, prompt_ids[i:i + batch_size], response_ids[i:i + batch_size], device)
        resp = labels[:, 1:] != -100  # (b, L-1) positions whose next token is a response token
        target = ids[:, 1:]  # (b, L-1) the next token at each position
        logp = ppo.logprobs_from_logits(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), target)
        with model.disable_adapter():
            ref = ppo.logprobs_from_logits(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), target)
        total += ((logp - ref) * resp).sum().item()  # (b, L-1) summed over tokens and rows
    return total / max(len(prompt_ids), 1)


def train(cfg: Config, run_dir: Path, stage_dir: Path, *, scorer=None, init: str | None = None,
          prompts: list[str] | None = None, should_refuse: dict[str, bool] | None = None) -> dict:
    """RAFT for cfg.rl.steps rounds; writes stage_dir/{policy/, log.jsonl, heldout.jsonl}. Arguments as
    `ppo.train`'s. A resumed stage starts again from the first round (a round is the unit of work)."""
    rl = cfg.rl
    run_dir, stage_dir = Path(run_dir), Path(stage_dir)
    if world_size() > 1:
        raise InputError("RAFT runs in one process (accelerate launch: use ppo, grpo or rloo)", key="rl.algo")
    if rl.conditioning != "none":
        raise InputError("RAFT trains one policy for rl.weights; a weight-conditioned policy needs ppo, grpo or rloo",
                         key="rl.conditioning")
    init, scorer, prompts, should_refuse = ppo.rollout_inputs(cfg, run_dir, init, scorer, prompts, should_refuse)
    objectives = list(scorer.objectives)
    scalarizer = Scalarizer.from_config(rl, objectives)
    rollout = Sampling.from_config(cfg, "rollout")  # rl.temperature, top_p 1, no repetition penalty
    N, P = rl.num_generations, len(prompts)

    model, tok = ppo.load_policy(cfg, init)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rl.learning_rate)
    for path in (stage_dir / "log.jsonl", stage_dir / "heldout.jsonl", stage_dir / "checkpoint"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    loggers = ppo.Loggers(cfg, stage_dir, 0)
    heldout = ppo.heldout_rows(run_dir, rl.heldout_prompts) if rl.heldout_every else []
    heldout_log = ShardWriter(stage_dir / "heldout.jsonl") if heldout else None

    def track(done: int) -> None:  # after `done` rounds
        if heldout and (done == 0 or done % rl.heldout_every == 0 or done == rl.steps):
            heldout_log.append([{"step": done, **ppo.heldout_reward(cfg, scorer, scalarizer, model, tok, heldout)}])

    track(0)
    texts = [render(tok, chat(p)) for p in prompts]
    prompt_ids = [tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0] for t in texts]
    flat = [t for t in texts for _ in range(N)]  # (P·N,) prompt i's samples at i·N .. i·N+N-1
    batch = [p for p in prompts for _ in range(N)]  # (P·N,) their prompts
    lrs = [rl.learning_rate * f for f in training.lr_factors(rl.lr_scheduler_type, rl.warmup_steps, rl.steps)]
    history: list[dict] = []
    t_begin = time.monotonic()
    for step in tqdm(range(rl.steps), desc="raft"):
        t0, cpu0 = time.monotonic(), time.process_time()
        training.set_lr(optimizer, lrs[step])
        # ---- 1. sample N responses per prompt from π_θ, rl.batch_size prompts per generate() call
        model.eval()
        seed = derived_seed(cfg.seed, step)
        chunk = rl.batch_size * N
        responses, lengths, samples = [], [], []
        for c in range(0, len(flat), chunk):
            gen = generate_batch(model, tok, flat[c:c + chunk], **rollout.batch_kwargs(), seed=seed + c)
            samples += gen.texts
            responses += [r[: int(n)].cpu() for r, n in zip(gen.response_ids, gen.response_lengths)]
            lengths += gen.response_lengths.tolist()
        t_rollout = time.monotonic() - t0
        # ---- 2. rewards: K objectives -> one scalar (rl.scalarizer) + the refusal rule's ±λ
        raw = ppo.score(cfg, scorer, model, tok, batch, samples, seed=seed)  # (P·N, K)
        s = scalarizer(scalarizer.inputs(scorer, raw).float().cpu())  # (P·N,)
        rule = torch.tensor(rule_reward(samples, [should_refuse[p] for p in batch])) if should_refuse else None
        total = s + rl.refusal_reward * rule if rule is not None else s  # (P·N,)
        t_reward = time.monotonic() - t0 - t_rollout
        # ---- 3. keep each prompt's best sample (none where the best breaks the rule or no reward is finite)
        best = best_of_groups(total.view(P, N), rule.view(P, N) if rule is not None else None)
        kept = [(i, i * N + j) for i, j in enumerate(best) if j is not None]
        kept_prompts = [prompt_ids[i] for i, _ in kept]
        kept_responses = [responses[k] for _, k in kept]
        kl = sequence_kl(model, tok, kept_prompts, kept_responses, device, rl.mini_batch_size) if kept else 0.0
        # kept samples obey the rule, so each refuses exactly when the feedback model refused its prompt
        kept_refuses = [should_refuse[prompts[i]] for i, _ in kept] if rule is not None else []
        order = balanced(kept_refuses) if rl.balance_kept and rule is not None else list(range(len(kept)))
        # ---- 4. rl.ppo_epochs passes of the SFT loss over the kept responses
        model.train()
        for epoch in range(rl.ppo_epochs):
            losses: list[float] = []  # the last pass's are logged
            random.Random(derived_seed(cfg.seed, step * 1_000 + epoch)).shuffle(order)
            for b in range(0, len(order), rl.mini_batch_size):
                idx = order[b:b + rl.mini_batch_size]
                ids, mask, labels = sft_batch(tok, [kept_prompts[i] for i in idx], [kept_responses[i] for i in idx],
                                              device)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # mean over response tokens
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, rl.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        row = {
            "step": step + 1,
            "scalarized_reward": s.mean().item(),  # over every sample of the round, before its update
            "objective_rewards": {o: raw[:, k].mean().item() for k, o in enumerate(objectives)},
            "objective_std": {o: raw[:, k].std(unbiased=False).item() for k, o in enumerate(objectives)},
            "rule_agreement": (rule.mean().item() + 1) / 2 if rule is not None else None,
            "kl": kl,
            "entropy": None,
            "policy_loss": mean(losses) if kept else None,  # the SFT loss of the round's last pass
            "value_loss": None,
            "response_tokens": mean(lengths),
            "kept": len(kept),  # prompts whose best sample was trained on
            "kept_refusals": sum(kept_refuses) if rule is not None else None,
            "train_rows": len(order),  # kept samples after rl.balance_kept's repeats
            "kept_reward": mean([total[k].item() for _, k in kept]) if kept else None,
            "lr": optimizer.param_groups[0]["lr"],
            "step_time_s": time.monotonic() - t0,
            "step_cpu_s": time.process_time() - cpu0,
            "time_rollout_s": t_rollout,
            "time_reward_s": t_reward,
            "skipped_nonfinite": 0,
        }
        history.append(row)
        loggers.log(row)
        track(step + 1)
    loggers.close()
    models.save_adapter(model, tok, stage_dir / "policy", base=init)  # load_model(policy) stacks it on init
    return {
        "objectives": objectives,
        "scalarizer": rl.scalarizer,
        "seconds_per_step": mean([r["step_time_s"] for r in history]),
        "cpu_seconds_per_step": mean([r["step_cpu_s"] for r in history]),
        "wall_s_this_run": time.monotonic() - t_begin,
        "resumed_from": None,
        "processes": 1,
        "data": {"prompts": P, "samples_per_prompt": N},
        "heldout": read_jsonl(stage_dir / "heldout.jsonl") if heldout else [],
    }
