"""GRPO / RLOO / DPO / IPO / KTO through TRL, driven by the scalarized multi-objective signal.

`morlaif.rl` (the stage) calls `run(cfg, run_dir, stage_dir)` for `cfg.rl.algo` in
{grpo, rloo, dpo, ipo, kto}; it writes `stage_dir/policy/` (LoRA adapter stacked on the SFT
policy), `stage_dir/log.jsonl` (the keys `morlaif.rl` documents, one row per optimiser step) and
`stage_dir/tensorboard/` (logging.report_to), and returns the run's figures for rl/metrics.json.
The TRL configs get morlaif's keys (`training`) and, for the rest, `rl.trl_args`.

- GRPO / RLOO (online): one reward function, `ScalarizedReward`, scores each completion with
  the run's preference models (all K objectives in one call; an aspect objective reads the
  policy's answer to its follow-up question), z-scores them when `cfg.rl.normalize`, and
  scalarizes them into one number. TRL alone can only add reward
  functions with fixed weights; a max-min or Nash scalarization needs all K rewards at once,
  hence one function. Per-objective means go through TRL's `log_metric` hook.
- DPO / IPO / KTO (offline): the AI labels `feedback/labels.jsonl` (one row per pair and
  objective) are relabelled by the scalarized preference (`preference_margin`), giving one
  chosen/rejected pair (DPO, IPO) or two unpaired rows (KTO) per pair.

The policy is the SFT adapter merged into its base plus a fresh LoRA adapter that TRL attaches
(`peft_config`); the reference is the same network with that adapter disabled (`ref_model=None`),
so there is never a second copy of the weights.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from morlaif import models, training
from morlaif.artifacts import write_jsonl
from morlaif.conditioning import Conditioning
from morlaif.config import Config, derived_seed
from morlaif.constitution import HOLISTIC
from morlaif.errors import InputError
from morlaif.generation import Sampling, followup_answers
from morlaif.labels import read_labels
from morlaif.preference import RewardScorer, aspects, reward_scorer
from morlaif.processes import is_main_process, per_process, wait_for_everyone
from morlaif.promptsets import train_prompts
from morlaif.refusal import rule_decisions, rule_reward
from morlaif.scalarize import Scalarizer

ONLINE = ("grpo", "rloo")
OFFLINE = ("dpo", "ipo", "kto")
P_CLIP = 1e-3  # p_a is clipped to [P_CLIP, 1 - P_CLIP] before the logit: |logit| <= 6.91, a sure label is not infinite


# --------------------------------------------------------------------------- online: GRPO / RLOO


class ScalarizedReward:
    """TRL reward function: (prompts, completions) -> scalarized multi-objective reward per completion.

    rewards (B, K) from the preference models -> z-scored per objective (when rl.normalize) ->
    the run's scalarizer -> (B,), plus rl.refusal_reward x the refusal rule's ±1 when `should_refuse` is
    given. The per-objective batch means of the rewards that enter the scalarizer (z-scored when
    normalize) are logged through TRL's `log_metric` hook as `objective/<name>`; `run` copies them
    into `objective_rewards` of log.jsonl.
    """

    __name__ = "scalarized"  # TRL names the reward column (rewards/scalarized/mean) after this

    def __init__(self, scorer, scalarizer: Scalarizer, cfg: Config, should_refuse: dict[str, bool] | None = None):
        self.scorer, self.scalarizer, self.cfg = scorer, scalarizer, cfg
        self.should_refuse = should_refuse or {}  # prompt -> the feedback model's decision (rl.refusal_reward)
        self.objectives = list(scorer.objectives)
        self.policy = self.tok = None  # set once the trainer holds the policy: it answers the follow-ups
        self.calls = 0

    def followups(self, prompts: list[str], responses: list[str]) -> dict[str, list[str]]:
        """The policy's answers to the aspects' follow-up questions (none without aspect objectives),
        sampled as the labels' were (`Sampling.from_config(cfg, "followup")`), each call with its own seed."""
        asp = aspects(self.objectives)
        if not asp:
            return {}
        was_training = self.policy.training
        self.policy.eval()
        try:
            return followup_answers(self.policy, self.tok, prompts, responses, asp,
                                    seed=derived_seed(self.cfg.seed, self.calls),
                                    sampling=Sampling.from_config(self.cfg, "followup"))
        finally:
            self.policy.train(was_training)

    def __call__(self, prompts, completions, log_metric=None, weights=None, **kwargs) -> list[float]:
        # Conversational data: a prompt is a message list, a completion is [{"role": "assistant", ...}].
        # The user's turn is the last message: a conditioned policy's weights line (the system message)
        # never reaches the preference models; its weights (the dataset's `weights` column) reach the scalarizer.
        prompt_texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        responses = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        self.calls += 1
        with torch.no_grad():
            followups = self.followups(prompt_texts, responses)
            raw = self.scorer.score(prompt_texts, responses, followups).float()  # (B, K) raw rewards
            r = self.scalarizer.inputs(self.scorer, raw)  # (B, K) z-scored per objective when normalize
            s = self.scalarizer(r, weights=None if weights is None else torch.tensor(weights, dtype=r.dtype))  # (B,)
        if log_metric is not None:
            for k, name in enumerate(self.objectives):
                log_metric(f"objective/{name}", r[:, k].mean().item())
        if not self.should_refuse:
            return s.cpu().tolist()
        # the refusal rule: ±1 per completion against the feedback model's decision on its prompt
        rule = rule_reward(responses, [self.should_refuse[p] for p in prompt_texts])  # (B,)
        if log_metric is not None:
            log_metric("rule_agreement", (sum(rule) / len(rule) + 1) / 2)
        return [x + self.cfg.rl.refusal_reward * g for x, g in zip(s.cpu().tolist(), rule)]


# --------------------------------------------------------------------------- offline: relabelling


def label_logits(p_a: torch.Tensor) -> torch.Tensor:
    """(P, K) label probabilities -> per-objective log-odds margins x = logit(p_a), p_a clipped to
    [P_CLIP, 1 - P_CLIP] so a sure label (p_a = 1) gives 6.91, not infinity."""
    return torch.logit(p_a.double().clamp(P_CLIP, 1 - P_CLIP))


def preference_margin(x: torch.Tensor, scalarizer: Scalarizer) -> torch.Tensor:
    """Scalarized preference of response a over b from per-objective log-odds margins.

    x: (P, K), x_k = r_a,k - r_b,k in Bradley-Terry units: logit(p_a,k) of an AI label
    (`label_logits`) or the raw reward difference of objective k's preference model (trained so
    that σ(r_a - r_b) = P(a preferred): the same units). Returns d: (P,); a is chosen when d > 0,
    b when d < 0, and d == 0 is an exact tie (dropped).

    A pair's rewards are known only up to a per-objective constant; we fix it symmetrically,
    r_a = x / 2 and r_b = -x / 2, scalarize both responses and compare:  d = S(x / 2) - S(-x / 2).
    Scalarizing x itself (`S(x) > 0`) would be wrong for the non-linear scalarizers: swapping a and
    b would not flip the label (max_min would pick b whenever *any* objective prefers b). d is
    antisymmetric (swap -> -d), so the order in which the pair was stored never matters.
    Special cases: linear gives d = Σ w_k x_k, bernoulli_nash Σ w_k x_k / 2 (log σ(u) - log σ(-u) = u),
    max_min (min_k x_k + max_k x_k) / 2: a wins when its worst objective beats b's worst.
    """
    x = x.double()  # (P, K)
    return scalarizer(x / 2) - scalarizer(-x / 2)  # (P,)


def label_objectives(labels: list[dict]) -> list[str]:
    """The per-objective labels' objectives in order of first appearance (the holistic label aside)."""
    return list(dict.fromkeys(r["objective"] for r in labels if r["objective"] != HOLISTIC))


def relabel(labels: list[dict], scalarizer: Scalarizer, *, margins_fn=None) -> tuple[list[dict], dict]:
    """Per-(pair, objective) AI labels -> one scalarized preference per pair.

    labels: rows {pair_id, prompt, response_a, response_b, objective, p_a}; rows with objective
    "holistic" are ignored (that label trains the single-objective baseline, not this policy).
    The K objectives, in order, are the scalarizer's. A pair labelled for every objective (the `judge` strategy) uses x_k = logit(p_a,k). A pair
    labelled for only some (the `contrastive` strategy makes one pair per objective) gets the
    missing x_k from `margins_fn(rows) -> (P, K)` raw reward differences of the preference models
    (rows: the pair's label row plus `followups` {aspect: (answer_a, answer_b)} its labels recorded),
    when given; otherwise it is dropped (`incomplete`).
    Exact ties (d == 0) are dropped (`ties`).
    Returns (pairs, stats): pairs = [{pair_id, prompt, chosen, rejected, margin}] in first-seen
    order, margin = |d| of `preference_margin`; stats = {objectives, pairs, ties, incomplete,
    filled (entries taken from the preference models), a_chosen}.
    """
    seen = label_objectives(labels)
    by_pair: dict = {}
    for row in labels:
        if row["objective"] != HOLISTIC:
            pair = by_pair.setdefault(row["pair_id"], {"row": row, "p": {}, "followups": {}})
            pair["p"][row["objective"]] = float(row["p_a"])
            if isinstance(row.get("followup_a"), str) and isinstance(row.get("followup_b"), str):
                pair["followups"][row["objective"].partition(":")[2]] = (row["followup_a"], row["followup_b"])
    if not seen:
        raise InputError("no per-objective labels (only 'holistic' or none)", file="feedback/labels.jsonl")
    objectives = scalarizer.objectives
    unknown = sorted(set(seen) - set(objectives))
    if unknown:
        raise InputError(f"labels for objective(s) {unknown} not among the run's objectives {objectives}",
                         file="feedback/labels.jsonl", key="constitution.objectives")
    pairs = list(by_pair.values())
    nan = float("nan")
    x = label_logits(torch.tensor([[v["p"].get(o, nan) for o in objectives] for v in pairs],
                                  dtype=torch.float64))  # (P, K) log-odds, NaN where unlabelled
    missing = torch.isnan(x)  # (P, K)
    filled = 0
    todo = missing.any(1).nonzero().flatten().tolist()
    if todo and margins_fn is not None:
        rows = [{**pairs[i]["row"], "followups": pairs[i]["followups"]} for i in todo]
        m = margins_fn(rows).double().cpu()  # (P', K) r_a - r_b
        x[todo] = torch.where(missing[todo], m, x[todo])
        filled = int(missing[todo].sum())
    keep = ~torch.isnan(x).any(1)  # (P,)
    stats = {"objectives": objectives, "pairs": 0, "ties": 0, "incomplete": int((~keep).sum()), "filled": filled,
             "a_chosen": 0}
    if not keep.any():
        return [], stats
    d = preference_margin(x[keep], scalarizer)  # (P_keep,)
    out = []
    for v, m in zip([v for v, k in zip(pairs, keep.tolist()) if k], d.tolist()):
        r = v["row"]
        if m == 0:
            stats["ties"] += 1
            continue
        a_wins = m > 0
        stats["a_chosen"] += int(a_wins)
        out.append({"pair_id": r["pair_id"], "prompt": r["prompt"],
                    "chosen": r["response_a"] if a_wins else r["response_b"],
                    "rejected": r["response_b"] if a_wins else r["response_a"], "margin": abs(m)})
    stats["pairs"] = len(out)
    return out, stats


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_dataset(pairs: list[dict], algo: str):
    """Relabelled pairs -> TRL conversational dataset: paired (DPO/IPO) or unpaired with bool labels (KTO)."""
    from datasets import Dataset

    if algo == "kto":
        rows = []
        for p in pairs:  # one desirable and one undesirable row per pair, adjacent, so each batch mixes both
            rows.append({"prompt": _user(p["prompt"]), "completion": _assistant(p["chosen"]), "label": True})
            rows.append({"prompt": _user(p["prompt"]), "completion": _assistant(p["rejected"]), "label": False})
        return Dataset.from_list(rows)
    return Dataset.from_list([{"prompt": _user(p["prompt"]), "chosen": _assistant(p["chosen"]),
                               "rejected": _assistant(p["rejected"])} for p in pairs])


# --------------------------------------------------------------------------- log.jsonl


def _get(entry: dict, *keys):
    for k in keys:
        if k in entry and entry[k] is not None and not (isinstance(entry[k], float) and math.isnan(entry[k])):
            return float(entry[k])
    return None


def log_rows(log_history: list[dict], algo: str) -> list[dict]:
    """TRL's `state.log_history` (logging_steps=1) -> rl/log.jsonl rows, one per optimisation step.

    GRPO/RLOO: scalarized_reward = mean reward of the step's completions (the refusal rule's λ·(±1) included
    under rl.refusal_reward, which PPO's log keeps apart); objective_rewards
    = per-objective means of what was scalarized; kl = TRL's per-token KL to the reference (k3);
    response_tokens = mean completion length.
    DPO/IPO/KTO have no sampled reward: scalarized_reward is the implicit reward margin
    β·[log π/π_ref(chosen) - log π/π_ref(rejected)] averaged over the batch (TRL's rewards/margins;
    for KTO the chosen and rejected means of the batch); objective_rewards = {}; kl = KTO's batch KL
    estimate, null for DPO/IPO (no on-policy samples to measure it on); response_tokens = null.
    """
    rows = []
    for e in log_history:
        if "loss" not in e or "step" not in e:  # the final train summary (train_runtime, ...) has neither
            continue
        online = algo in ONLINE
        rows.append({
            "step": int(e["step"]),
            "scalarized_reward": _get(e, "reward") if online else _get(e, "rewards/margins"),
            "objective_rewards": {k.split("/", 1)[1]: float(v) for k, v in e.items() if k.startswith("objective/")},
            "kl": _get(e, "kl"),
            "entropy": _get(e, "entropy"),
            "policy_loss": _get(e, "policy_loss", "loss"),
            "value_loss": None,
            "response_tokens": _get(e, "completions/mean_length") if online else None,
            "rule_agreement": _get(e, "rule_agreement"),  # the refusal rule's (rl.refusal_reward), null without it
        })
    return rows


# --------------------------------------------------------------------------- trainer plumbing


def rl_arguments(cfg: Config, out_dir: Path, tracker=None) -> dict:
    """The TrainingArguments morlaif's keys set for every TRL algorithm (`rl.trl_args` cannot repeat them)."""
    rl = cfg.rl
    return dict(
        output_dir=str(out_dir),
        max_steps=rl.steps,
        max_grad_norm=rl.max_grad_norm,
        gradient_accumulation_steps=rl.grad_accum,
        logging_steps=1,  # one log.jsonl row per optimisation step
        save_strategy="steps",
        save_steps=rl.save_every,
        save_total_limit=1,  # resume point only; the directory is removed at the end
        seed=cfg.seed,
        report_to=tracker.report_to if tracker else "none",
        run_name=tracker.run_name if tracker else None,
        **training.schedule_arguments(rl),
    )


def trainer_args(cfg: Config, out_dir: Path, tracker=None) -> dict:
    """TrainingArguments shared by every TRL algorithm (and the GRPO baseline of `morlaif bench`)."""
    return {**rl_arguments(cfg, out_dir, tracker), **training.precision_arguments(cfg.model)}


class StepTimer(TrainerCallback):
    """Wall seconds between optimiser-step ends (generation, scoring, logging, checkpoints included)."""

    def __init__(self):
        self.times: list[float] = []
        self._t = None

    def on_train_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self._t = now


def callbacks(tracker) -> list:
    """[StepTimer, the tracker's TensorBoard writer when it has one (stage_dir/tensorboard)]."""
    return [StepTimer(), *tracker.trainer_callbacks()]


def _config(cls, cfg: Config, args: dict, algo_args: dict, defaults: dict):
    """The algorithm's TRL config: morlaif's arguments, then rl.trl_args for the rest."""
    return training.trl_config(cls, "rl", {**args, **algo_args},
                               {**training.precision_arguments(cfg.model), **defaults}, cfg.rl.trl_args)


def _online_trainer(cfg: Config, run_dir: Path, stage_dir: Path, model, tok, args: dict, cbs: list):
    from datasets import Dataset

    rl = cfg.rl
    prompts = train_prompts(run_dir, stage="rl")  # the rl stage's own harmful + benign prompts
    scorer = reward_scorer(run_dir, cfg)  # rl.reward_model: the K preference models or the holistic baseline
    cond = Conditioning.from_config(rl, scorer.objectives)
    if cond is None:
        dataset = Dataset.from_list([{"prompt": _user(p["prompt"])} for p in prompts]).shuffle(seed=cfg.seed)
    else:
        # One row per episode of the whole run (the prompts cycled; TRL's sampler shuffles them), each with
        # weights drawn for it: a row's num_generations completions share them, so the group's advantages
        # compare like with like. The rows are a function of the seed, so a resumed run sees the same stream.
        n = rl.steps * rl.batch_size
        texts = [prompts[i % len(prompts)]["prompt"] for i in range(n)]
        W = cond.draw(cfg.seed, 0, n)  # (n, K)
        dataset = Dataset.from_list([{"prompt": cond.messages(t, w), "weights": w.tolist()} for t, w in zip(texts, W)])
    should_refuse = rule_decisions(run_dir, [p["prompt"] for p in prompts]) if rl.refusal_reward else None
    reward_fn = ScalarizedReward(scorer, Scalarizer.from_config(rl, scorer.objectives), cfg, should_refuse)
    rollout = Sampling.from_config(cfg, "rollout")
    online = dict(
        per_device_train_batch_size=per_process(rl.batch_size * rl.num_generations, "rl.batch_size"),  # completions
        num_generations=rl.num_generations,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,  # 1: sample from the policy itself: the policy gradient assumes it
        repetition_penalty=rollout.repetition_penalty,  # 1, for the same reason
        beta=rl.kl_coef,  # KL to the reference (adapter disabled); > 0 also makes TRL log it
        epsilon=rl.clip_coef,
    )
    defaults = dict(num_iterations=1, log_completions=False)  # rl.trl_args may change these
    lora = models.policy_lora(rl.lora_r, rl.lora_target_modules)
    if rl.algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=_config(GRPOConfig, cfg, args, online, defaults),
                              train_dataset=dataset, processing_class=tok, peft_config=lora, callbacks=cbs)
    else:
        from trl import RLOOConfig, RLOOTrainer

        trainer = RLOOTrainer(model=model, reward_funcs=reward_fn, args=_config(RLOOConfig, cfg, args, online, defaults),
                              train_dataset=dataset, processing_class=tok, peft_config=lora, callbacks=cbs)
    reward_fn.policy, reward_fn.tok = trainer.model, tok  # the policy being trained answers the follow-ups
    return trainer, reward_fn.scalarizer, {"prompts": len(prompts)}


def _pair_followups(cfg: Config, model, tok, rows: list[dict], side: int, asp: list[str]) -> dict[str, list[str]]:
    """Follow-up answers of side `side` (0: a, 1: b) of labelled pairs for the aspects `asp`: the ones
    the labels recorded (`followups` of a relabel row), else the SFT policy's, sampled as the feedback
    stage samples them."""
    if not asp:
        return {}
    key = ("response_a", "response_b")[side]
    fresh = followup_answers(model, tok, [r["prompt"] for r in rows], [r[key] for r in rows], asp, seed=cfg.seed + side,
                             sampling=Sampling.from_config(cfg, "followup"))
    return {a: [r["followups"][a][side] if a in r["followups"] else f for r, f in zip(rows, fresh[a])] for a in asp}


def _offline_trainer(cfg: Config, run_dir: Path, stage_dir: Path, model, tok, args: dict, cbs: list):
    rl = cfg.rl
    labels = read_labels(run_dir / "feedback" / "labels.jsonl")
    margins_fn, scorer = None, None
    if (run_dir / "rm" / "objectives.json").is_file():
        scorer = RewardScorer.load(run_dir, cfg)
        objectives = list(scorer.objectives)

        def margins_fn(rows):
            # Raw (not z-scored) differences: Bradley-Terry log-odds, the units of logit(p_a).
            prompts = [r["prompt"] for r in rows]
            a, b = [r["response_a"] for r in rows], [r["response_b"] for r in rows]
            fa, fb = (_pair_followups(cfg, model, tok, rows, side, aspects(objectives)) for side in (0, 1))
            return scorer.score(prompts, a, fa) - scorer.score(prompts, b, fb)  # (P, K)
    else:
        objectives = label_objectives(labels)
    scalarizer = Scalarizer.from_config(rl, objectives)
    pairs, stats = relabel(labels, scalarizer, margins_fn=margins_fn)
    del scorer, margins_fn  # free the preference models before training
    if len(pairs) < 2:
        raise InputError(f"only {len(pairs)} usable pair(s) after relabelling ({stats})",
                         file=str(run_dir / "feedback" / "labels.jsonl"))
    if is_main_process():
        write_jsonl(stage_dir / "pairs.jsonl", pairs)  # what the policy was trained on, for inspection
    dataset = preference_dataset(pairs, rl.algo)
    common = dict(per_device_train_batch_size=per_process(rl.batch_size, "rl.batch_size"), beta=rl.dpo_beta,
                  max_length=rl.max_length)
    lora = models.policy_lora(rl.lora_r, rl.lora_target_modules)
    if rl.algo == "kto":
        from trl import KTOConfig, KTOTrainer

        # KTO estimates its KL term from mismatched completions within a batch: needs a batch > 1.
        common["per_device_train_batch_size"] = max(2, common["per_device_train_batch_size"])
        trainer = KTOTrainer(model=model, ref_model=None, args=_config(KTOConfig, cfg, args, common, {}),
                             train_dataset=dataset, processing_class=tok, peft_config=lora, callbacks=cbs)
    else:
        from trl import DPOConfig, DPOTrainer

        common["loss_type"] = [{"dpo": "sigmoid", "ipo": "ipo"}[rl.algo]]
        trainer = DPOTrainer(model=model, ref_model=None, args=_config(DPOConfig, cfg, args, common, {}),
                             train_dataset=dataset, processing_class=tok, peft_config=lora, callbacks=cbs)
    return trainer, scalarizer, stats


# --------------------------------------------------------------------------- entry point


def run(cfg: Config, run_dir: Path, stage_dir: Path) -> dict:
    """Train the policy with cfg.rl.algo; write stage_dir/policy and stage_dir/log.jsonl (DPO/IPO/KTO also
    stage_dir/pairs.jsonl, the relabelled pairs); return the run's figures for rl/metrics.json.

    Resumable: TRL checkpoints go to stage_dir/trainer every `rl.save_every` steps and training
    resumes from the last one; the directory is removed once the adapter is saved.
    """
    from transformers.trainer_utils import get_last_checkpoint

    algo = cfg.rl.algo
    if algo not in ONLINE + OFFLINE:
        raise InputError(f"trl_algos handles {ONLINE + OFFLINE}, not '{algo}'", key="rl.algo")
    run_dir, stage_dir = Path(run_dir), Path(stage_dir)
    sft_dir = run_dir / "sft" / "model"
    if not models.saved_model_files(sft_dir):
        raise InputError("SFT policy not found: run `morlaif sft` first", file=str(sft_dir))
    training.check_trl_args("rl", cfg.rl.trl_args, algo)
    model, tok = models.load_sft_policy(str(sft_dir), cfg.model)
    training.check_lora_targets(model, cfg.rl.lora_target_modules, "rl.lora_target_modules")
    out = stage_dir / "trainer"
    out.mkdir(parents=True, exist_ok=True)
    tracker = training.Tracker(cfg, stage_dir.parent, stage_dir.name)
    args = rl_arguments(cfg, out, tracker)
    cbs = callbacks(tracker)
    make = _online_trainer if algo in ONLINE else _offline_trainer
    try:
        trainer, scalarizer, data_stats = make(cfg, run_dir, stage_dir, model, tok, args, cbs)
        last = get_last_checkpoint(str(out))
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=last)
        wall = time.perf_counter() - t0
    finally:
        tracker.close()

    rows = log_rows(trainer.state.log_history, algo)
    wait_for_everyone()  # every process is done with the trainer's checkpoints before they are removed
    if is_main_process():  # under accelerate launch TRL trains on every process; one writes
        models.save_adapter(trainer.model, tok, stage_dir / "policy", base=str(sft_dir))
        cond = Conditioning.from_config(cfg.rl, scalarizer.objectives) if algo in ONLINE else None
        if cond:
            cond.save(stage_dir / "policy")
        write_jsonl(stage_dir / "log.jsonl", rows)
        shutil.rmtree(out, ignore_errors=True)  # checkpoints are a resume point, not a result

    step_times = cbs[0].times
    return {
        "objectives": scalarizer.objectives,
        "scalarizer": scalarizer.name,
        "seconds_per_step": sum(step_times) / len(step_times) if step_times else None,
        "wall_s_this_run": wall,
        "train_loss": result.training_loss,
        "resumed_from": int(Path(last).name.split("-")[-1]) if last else None,  # TRL's checkpoint-N: step N
        "processes": trainer.accelerator.num_processes,
        "data": data_stats,
    }
