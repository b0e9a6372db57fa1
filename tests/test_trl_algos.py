"""TRL-based algorithms (GRPO, RLOO, DPO, IPO, KTO): relabelling maths exactly, each trainer on the tiny model,
and GRPO, RLOO and DPO moving a policy towards a known optimum (failing for a wrong-sign update)."""

import json
import math
import random
import shutil

import pytest
import torch

from morlaif import models
from morlaif.artifacts import read_jsonl, write_jsonl

import learning

LOG_KEYS = {"step", "scalarized_reward", "objective_rewards", "kl", "entropy", "policy_loss", "value_loss",
            "response_tokens", "rule_agreement"}
OBJECTIVES = ["honesty", "prudence"]


# --------------------------------------------------------------------------- relabelling (pure)


def _rows(pair_id, ps, objectives=("honesty", "prudence", "justice")):
    return [{"pair_id": pair_id, "prompt": f"q{pair_id}", "response_a": f"A{pair_id}", "response_b": f"B{pair_id}",
             "objective": o, "p_a": p} for o, p in zip(objectives, ps)]


THREE = ["honesty", "prudence", "justice"]


def _scal(name, objectives=THREE, weights=None):
    from morlaif.scalarize import Scalarizer

    return Scalarizer(name, objectives, weights)


def test_preference_margin_exact():
    from morlaif.trl_algos import P_CLIP, label_logits, preference_margin

    # x = logit(p) = [ln 3, ln 3, -ln 6]: the mean prefers a, but a's worst objective is worse than b's.
    p = label_logits(torch.tensor([[0.75, 0.75, 1 / 7]], dtype=torch.float64))
    assert preference_margin(p, _scal("linear")).item() == pytest.approx(math.log(1.5) / 3, rel=1e-9)
    assert preference_margin(p, _scal("max_min")).item() == pytest.approx(-math.log(2) / 2, rel=1e-9)  # (min + max) / 2
    assert preference_margin(p, _scal("bernoulli_nash")).item() == pytest.approx(math.log(1.5) / 6, rel=1e-9)  # Σ w x / 2
    # weights: only honesty counts
    assert preference_margin(p, _scal("linear", weights={"honesty": 1.0})).item() == pytest.approx(math.log(3), rel=1e-9)
    # antisymmetric: swapping a and b (x -> -x) flips the sign, for every scalarizer
    for name in ("linear", "max_min", "soft_max_min", "uncertainty_weighted", "lower_quantile", "max_median",
                 "bernoulli_nash"):
        d, d_swap = preference_margin(p, _scal(name)), preference_margin(-p, _scal(name))
        assert d.item() == pytest.approx(-d_swap.item(), rel=1e-9, abs=1e-12), name
    # a sure label is clipped, not infinite
    assert preference_margin(label_logits(torch.tensor([[1.0]])), _scal("linear", ["honesty"])).item() == pytest.approx(
        math.log((1 - P_CLIP) / P_CLIP), rel=1e-9)


def test_relabel_exact():
    from morlaif.trl_algos import relabel

    labels = (
        _rows(1, [0.75, 0.75, 1 / 7])
        + [{**_rows(1, [0.0])[0], "objective": "holistic"}]  # ignored: would say b
        + _rows(2, [0.5, 0.5, 0.5])  # exact tie: dropped
        + _rows(3, [0.9, 0.9])  # no justice label: incomplete, dropped
        + _rows(4, [0.2, 0.3, 0.4])  # every objective prefers b
    )
    pairs, stats = relabel(labels, _scal("linear"))
    assert stats == {"objectives": ["honesty", "prudence", "justice"], "pairs": 2, "ties": 1, "incomplete": 1,
                     "filled": 0, "a_chosen": 1}
    assert [(p["pair_id"], p["chosen"], p["rejected"]) for p in pairs] == [(1, "A1", "B1"), (4, "B4", "A4")]
    assert pairs[0]["margin"] == pytest.approx(math.log(1.5) / 3, rel=1e-9)
    assert pairs[1]["margin"] == pytest.approx(-(math.log(0.25) + math.log(3 / 7) + math.log(2 / 3)) / 3, rel=1e-9)
    pairs, stats = relabel(labels, _scal("max_min"))  # pair 1 flips to b under max-min
    assert [(p["pair_id"], p["chosen"]) for p in pairs] == [(1, "B1"), (4, "B4")]
    assert pairs[0]["margin"] == pytest.approx(math.log(2) / 2, rel=1e-9)
    pairs, _ = relabel(labels, _scal("linear", weights={"honesty": 1.0}))  # by name; missing objectives weigh 0
    assert [(p["pair_id"], p["chosen"]) for p in pairs] == [(1, "A1"), (4, "B4")]
    assert pairs[0]["margin"] == pytest.approx(math.log(3), rel=1e-9)


def test_relabel_fills_missing_objectives_from_preference_models():
    from morlaif.trl_algos import relabel

    # contrastive strategy: one pair per objective, a single label each (p_a = 1 or 0)
    labels = _rows("h", [1.0], ["honesty"]) + _rows("p", [0.0], ["prudence"])
    calls = []

    def margins_fn(rows):  # the preference models' r_a - r_b, (P, K) in objectives order
        calls.append(([r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows]))
        return torch.tensor([[99.0, -1.0], [2.0, 99.0]])  # the 99s are labelled entries: must be ignored

    pairs, stats = relabel(labels, _scal("linear", ["honesty", "prudence"]), margins_fn=margins_fn)
    assert calls == [(["qh", "qp"], ["Ah", "Ap"], ["Bh", "Bp"])]
    assert stats["filled"] == 2 and stats["incomplete"] == 0
    x = math.log(999)  # logit of the clipped sure label
    assert [(p["pair_id"], p["chosen"]) for p in pairs] == [("h", "Ah"), ("p", "Bp")]
    assert pairs[0]["margin"] == pytest.approx((x - 1) / 2, rel=1e-9)
    assert pairs[1]["margin"] == pytest.approx((x - 2) / 2, rel=1e-9)
    # without preference models such pairs cannot be scalarized: dropped
    pairs, stats = relabel(labels, _scal("linear", ["honesty", "prudence"]))
    assert pairs == [] and stats["incomplete"] == 2


def test_relabel_bad_weights():
    from morlaif.errors import InputError
    from morlaif.trl_algos import relabel

    with pytest.raises(InputError, match="honsty"):
        relabel(_rows(1, [0.7, 0.6, 0.5]), _scal("linear", weights={"honsty": 1.0}))
    with pytest.raises(InputError, match="justice"):  # labels for an objective the run does not have
        relabel(_rows(1, [0.7, 0.6, 0.5]), _scal("linear", ["honesty", "prudence"]))


def test_preference_dataset_kto_unpaired():
    from morlaif.trl_algos import preference_dataset

    ds = preference_dataset([{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 1.0}], "kto")
    assert ds["label"] == [True, False]
    assert [c[0]["content"] for c in ds["completion"]] == ["good", "bad"]
    ds = preference_dataset([{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 1.0}], "dpo")
    assert ds[0]["prompt"] == [{"role": "user", "content": "q"}] and ds[0]["chosen"][0]["content"] == "good"


def test_log_rows_mapping():
    from morlaif.trl_algos import log_rows

    hist = [{"loss": 0.5, "reward": 1.0, "objective/honesty": 0.2, "kl": 0.01, "entropy": 3.0,
             "completions/mean_length": 7.0, "policy_loss": 0.4, "step": 1},
            {"train_runtime": 3.0, "step": 1}]
    assert log_rows(hist, "grpo") == [{"step": 1, "scalarized_reward": 1.0, "objective_rewards": {"honesty": 0.2},
                                       "kl": 0.01, "entropy": 3.0, "policy_loss": 0.4, "value_loss": None,
                                       "response_tokens": 7.0, "rule_agreement": None}]
    row = log_rows([{"loss": 0.69, "rewards/margins": 0.1, "entropy": 2.0, "step": 3}], "dpo")[0]
    assert row == {"step": 3, "scalarized_reward": 0.1, "objective_rewards": {}, "kl": None, "entropy": 2.0,
                   "policy_loss": 0.69, "value_loss": None, "response_tokens": None, "rule_agreement": None}
    assert log_rows([{"loss": 0.5, "reward": 1.0, "rule_agreement": 0.75, "step": 2}], "rloo")[0]["rule_agreement"] == 0.75


# --------------------------------------------------------------------------- the online reward


class TableScorer:
    """Preference models with known rewards: response text -> (K,) raw rewards; normalize: (r - 1) / 2."""

    def __init__(self, objectives, table):
        self.objectives, self.table, self.seen = list(objectives), table, []

    def score(self, prompts, responses, followups=None):
        self.seen.append((list(prompts), list(responses), followups))
        return torch.tensor([self.table[r] for r in responses])  # (B, K)

    def normalize(self, r):
        return (r - 1.0) / 2.0


def test_scalarized_reward_exact_and_driven_by_the_config(tiny_cfg):
    """What GRPO/RLOO learn from: ScalarizedReward(prompts, completions) for rl.scalarizer, rl.weights and
    rl.normalize, against hand-computed values; per-objective means go to log_metric."""
    from morlaif.config import load_config
    from morlaif.scalarize import Scalarizer
    from morlaif.trl_algos import ScalarizedReward

    scorer = TableScorer(OBJECTIVES, {"x": [3.0, -1.0], "y": [1.0, 1.0]})
    prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    completions = [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]

    def reward(*sets):
        cfg = load_config(None, list(sets))
        fn = ScalarizedReward(scorer, Scalarizer.from_config(cfg.rl, OBJECTIVES), cfg)
        logged = {}
        out = fn(prompts, completions, log_metric=logged.__setitem__)
        return out, logged

    # raw rewards x: (3, -1), y: (1, 1); z-scored: x: (1, -1), y: (0, 0)
    out, logged = reward("rl.scalarizer=linear", "rl.normalize=false")
    assert out == pytest.approx([1.0, 1.0]) and logged == pytest.approx({"objective/honesty": 2.0, "objective/prudence": 0.0})
    assert reward("rl.scalarizer=linear", "rl.normalize=false", "rl.weights={honesty: 3, prudence: 1}")[0] == \
        pytest.approx([2.0, 1.0])  # 3/4 * 3 + 1/4 * (-1) = 2
    assert reward("rl.scalarizer=max_min", "rl.normalize=false")[0] == pytest.approx([-1.0, 1.0])
    out, logged = reward("rl.scalarizer=max_min", "rl.normalize=true")
    assert out == pytest.approx([-1.0, 0.0]) and logged == pytest.approx({"objective/honesty": 0.5,
                                                                          "objective/prudence": -0.5})
    # uncertainty_weighted, λ = rl.variance_penalty: mean - λ Σ w (r - mean)²: x: 1 - 0.5 * 4 = -1, y: 1
    assert reward("rl.scalarizer=uncertainty_weighted", "rl.normalize=false",
                  "rl.variance_penalty=0.5")[0] == pytest.approx([-1.0, 1.0])
    assert scorer.seen[-1][:2] == (["q1", "q2"], ["x", "y"]) and scorer.seen[-1][2] == {}  # no aspect objective
    # the refusal rule: + rl.refusal_reward where the completion refuses exactly when the feedback model did
    cfg = load_config(None, ["rl.scalarizer=linear", "rl.normalize=false", "rl.refusal_reward=2"])
    refusing = [[{"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
                [{"role": "assistant", "content": "y"}]]
    table = TableScorer(OBJECTIVES, {"I'm sorry, but I can't help with that.": [0.0, 0.0], "y": [1.0, 1.0]})
    fn = ScalarizedReward(table, Scalarizer.from_config(cfg.rl, OBJECTIVES), cfg, {"q1": False, "q2": False})
    logged = {}
    assert fn(prompts, refusing, log_metric=logged.__setitem__) == pytest.approx([0.0 - 2.0, 1.0 + 2.0])
    assert logged["rule_agreement"] == 0.5

    # an aspect objective: the policy being trained answers the follow-up question about each completion
    aspect = TableScorer(["honesty", "honesty:motivation"], {"x": [3.0, -1.0], "y": [1.0, 1.0]})
    cfg = load_config(None, ["rl.scalarizer=linear", "rl.normalize=false", "feedback.followup_max_new_tokens=3"])
    fn = ScalarizedReward(aspect, Scalarizer.from_config(cfg.rl, aspect.objectives), cfg)
    fn.policy, fn.tok = models.load_model("tiny", device="cpu").train(), models.load_tokenizer("tiny")
    assert fn(prompts, completions) == pytest.approx([1.0, 1.0])
    followups = aspect.seen[-1][2]
    assert list(followups) == ["motivation"] and len(followups["motivation"]) == 2
    assert fn.policy.training  # handed back to the trainer as it was


# --------------------------------------------------------------------------- fake run directory


class FakeScorer:
    """Same interface as morlaif.reward.RewardScorer: a known function of the text per objective."""

    objectives = OBJECTIVES

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses, followups=None):
        self.calls += 1
        assert len(prompts) == len(responses) and all(isinstance(p, str) for p in prompts)
        return torch.tensor([[len(r) / 10.0, r.count("e") - 1.0] for r in responses])  # (B, K)

    def normalize(self, r):
        return (r - 1.0) / 2.0


@pytest.fixture
def fake_run(prompts_run, tiny_cfg, monkeypatch):
    """prompts + an SFT adapter on the tiny model + synthetic AI labels + a fake preference-model scorer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = models.load_model("tiny", device="cpu")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    sft = get_peft_model(base, lora)
    with torch.no_grad():  # a non-trivial SFT adapter, so merging it matters
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    models.save_adapter(sft, models.load_tokenizer("tiny"), prompts_run / "sft" / "model", base="tiny")

    rng = random.Random(0)
    prompts = [r["prompt"] for r in read_jsonl(prompts_run / "prompts" / "train.jsonl")]
    labels = []
    for i, p in enumerate(prompts):
        a, b = "I can't help with that, sorry.", "Sure! Here is how: first, " + "step " * rng.randint(1, 4)
        for obj in [*OBJECTIVES, "holistic"]:
            labels.append({"pair_id": i, "prompt": p, "response_a": a, "response_b": b, "objective": obj,
                           "p_a": rng.choice([0.2, 0.7, 0.9])})
    write_jsonl(prompts_run / "feedback" / "labels.jsonl", labels)
    # the feedback model's decisions on the rl prompts (rl.refusal_reward's rule): every other one refused
    write_jsonl(prompts_run / "feedback" / "decisions.jsonl",
                [{"prompt": r["prompt"], "split": "rl", "answer": "", "refuses": i % 2 == 0}
                 for i, r in enumerate(read_jsonl(prompts_run / "prompts" / "train.jsonl")) if r.get("stage") == "rl"])

    scorer = FakeScorer()
    from morlaif import preference

    monkeypatch.setattr(preference.RewardScorer, "load", classmethod(lambda cls, run_dir, cfg: scorer))
    return prompts_run, scorer


def _lora_b_norm(policy_dir) -> float:
    """Sum of |lora_B| of the saved RL adapter: LoRA starts with B = 0, so > 0 means training moved it."""
    model = models.load_model(str(policy_dir), device="cpu")
    return sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n)


def _run(cfg, run_dir, algo, **rl):
    from morlaif import trl_algos

    cfg.rl.algo = algo
    # The tiny model's cost is its 49k-token vocabulary projection: keep 2 prompts (GRPO/RLOO: x 2 completions)
    # or 2 pairs (KTO: 2 rows) per step.
    rl = {"batch_size": 2, **rl}
    for k, v in rl.items():
        setattr(cfg.rl, k, v)
    stage = run_dir / "rl"
    summary = trl_algos.run(cfg, run_dir, stage)
    rows = read_jsonl(stage / "log.jsonl")
    assert len(rows) == cfg.rl.steps and all(set(r) == LOG_KEYS for r in rows)
    assert [r["step"] for r in rows] == list(range(1, cfg.rl.steps + 1))
    assert not (stage / "trainer").exists()  # TRL checkpoints removed
    assert models.adapter_base(str(stage / "policy")) == str((run_dir / "sft" / "model").resolve())
    assert _lora_b_norm(stage / "policy") > 0
    return summary, rows


# --------------------------------------------------------------------------- trainers on the tiny model


def test_grpo_smoke(fake_run, tiny_cfg):
    run_dir, scorer = fake_run
    summary, rows = _run(tiny_cfg, run_dir, "grpo")
    assert scorer.calls == tiny_cfg.rl.steps  # one scoring call per generation batch
    assert summary["seconds_per_step"] > 0 and summary["objectives"] == OBJECTIVES
    for r in rows:
        assert set(r["objective_rewards"]) == set(OBJECTIVES)
        assert all(math.isfinite(v) for v in r["objective_rewards"].values())
        assert math.isfinite(r["scalarized_reward"]) and r["kl"] is not None and r["value_loss"] is None
        assert 0 < r["response_tokens"] <= tiny_cfg.rl.max_new_tokens


def test_dpo_smoke(fake_run, tiny_cfg):
    run_dir, _ = fake_run
    summary, rows = _run(tiny_cfg, run_dir, "dpo")
    assert summary["data"]["pairs"] > 0 and summary["data"]["objectives"] == OBJECTIVES
    assert len(read_jsonl(run_dir / "rl" / "pairs.jsonl")) == summary["data"]["pairs"]
    assert all(r["objective_rewards"] == {} and math.isfinite(r["policy_loss"]) for r in rows)
    assert rows[0]["policy_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1


def test_trainer_settings_reach_trl_and_curves_reach_tensorboard(fake_run, tiny_cfg, monkeypatch):
    """rl.lr_scheduler_type / warmup_steps / activation_checkpointing / lora_target_modules and rl.trl_args
    arrive in the TRL config and the adapter; logging.report_to=tensorboard writes rl/tensorboard/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from morlaif import training

    run_dir, _ = fake_run
    built = []
    real = training.trl_config
    monkeypatch.setattr(training, "trl_config", lambda *a: built.append(real(*a)) or built[-1])
    tiny_cfg.logging.report_to = "tensorboard"
    tiny_cfg.rl.trl_args = {"weight_decay": 0.1, "label_smoothing": 0.05}
    _run(tiny_cfg, run_dir, "dpo", lr_scheduler_type="cosine", warmup_steps=1, activation_checkpointing=True,
         lora_target_modules=["q_proj", "v_proj"])
    (args,) = built
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay, args.label_smoothing) == \
        ("cosine", 1, 0.1, 0.05)
    assert args.activation_checkpointing and args.learning_rate == tiny_cfg.rl.learning_rate
    adapter = json.loads((run_dir / "rl" / "policy" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    acc = EventAccumulator(str(run_dir / "rl" / "tensorboard"))
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("train/learning_rate")]  # the rate each step used: our loops' curve
    want = [tiny_cfg.rl.learning_rate * f for f in training.lr_factors("cosine", 1, tiny_cfg.rl.steps)]
    assert lrs == pytest.approx(want) and lrs[0] == 0.0
    assert not (run_dir / "rl" / "tb").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ipo", "kto", "rloo"])
def test_other_algos_run(fake_run, tiny_cfg, algo):
    """One step each; _run checks that the RL adapter moved (LoRA B left 0). At step 1 the policy is the
    reference (B = 0), so the first loss is known: IPO (h - 1/(2β))² with h = 0; KTO 1 - σ(0) for every
    row (rewards and KL estimate 0); RLOO's leave-one-out advantages sum to 0 over each group."""
    run_dir, _ = fake_run
    tiny_cfg.rl.steps = 1
    summary, rows = _run(tiny_cfg, run_dir, algo)
    want = {"ipo": (1 / (2 * tiny_cfg.rl.dpo_beta)) ** 2, "kto": 0.5, "rloo": 0.0}[algo]
    assert rows[0]["policy_loss"] == pytest.approx(want, abs=1e-4)


# --------------------------------------------------------------------------- learning a known optimum


@pytest.fixture(scope="module")
def half_vocab(tmp_path_factory):
    """(model dir, tokenizer, in_S mask): the policy of tests/learning.py, whose reward optimum is known."""
    return learning.half_vocab_model(tmp_path_factory.mktemp("halfvocab") / "model")


@pytest.fixture
def known_optimum_run(half_vocab, tmp_path, monkeypatch):
    """A run whose SFT policy is that model (a whole model), whose preference models score the share of a
    response's tokens in S, and whose AI labels prefer a text of S words to one of other words (on either side)."""
    model_dir, tok, in_s = half_vocab
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "sft" / "model")
    write_jsonl(run / "prompts" / "train.jsonl",
                [{"prompt": p, "kind": "benign", "stage": "rl"} for p in learning.PROMPTS])
    good, bad = learning.word_texts(tok, in_s)
    write_jsonl(run / "feedback" / "labels.jsonl", [
        {"pair_id": i, "prompt": p, "response_a": (good, bad)[i % 2], "response_b": (bad, good)[i % 2],
         "objective": "share", "p_a": (0.9, 0.1)[i % 2]} for i, p in enumerate(learning.PROMPTS)])
    scorer = learning.HalfVocabScorer(tok, in_s)
    from morlaif import preference

    monkeypatch.setattr(preference.RewardScorer, "load", classmethod(lambda cls, run_dir, cfg, baseline=False: scorer))
    return run, tok, in_s


@pytest.mark.parametrize("algo", ["grpo", "rloo", "dpo"])
def test_one_update_moves_the_policy_towards_the_known_optimum(known_optimum_run, tiny_cfg, algo):
    """One optimiser step through trl_algos.run moves probability onto S, measured exactly (the first response
    token's mass on S): 0.70 -> 0.95 (GRPO, RLOO), -> 0.9998 (DPO) here. With the update's sign flipped (GRPO,
    RLOO: the reward negated; DPO: chosen and rejected swapped) it falls to 0.38 and 0.004: this fails for it."""
    from morlaif import trl_algos

    torch.set_num_threads(2)
    run, tok, in_s = known_optimum_run
    rl = tiny_cfg.rl
    rl.algo, rl.steps, rl.learning_rate, rl.save_every = algo, 1, 2e-2, 100  # one step: no checkpoint to resume
    if algo == "dpo":
        rl.batch_size = 4  # pairs
    else:  # 2 prompts x 4 completions of 2 tokens; the reward is the share alone, no KL term
        rl.batch_size, rl.num_generations, rl.max_new_tokens, rl.kl_coef = 2, 4, 2, 0.0
        rl.scalarizer, rl.weights = "linear", {"share": 1.0, "nonempty": 0.0}
        rl.refusal_reward = 0.0  # no refusal rule either
    trl_algos.run(tiny_cfg, run, run / "rl")
    before = learning.mass_on_s(str(run / "sft" / "model"), tok, in_s)
    after = learning.mass_on_s(str(run / "rl" / "policy"), tok, in_s)
    print(f"{algo}: P(first token in S) {before:.3f} -> {after:.3f}")
    assert after > before + 0.1


def test_missing_sft_adapter(prompts_run, tiny_cfg):
    from morlaif import trl_algos
    from morlaif.errors import InputError

    tiny_cfg.rl.algo = "dpo"
    with pytest.raises(InputError, match="sft"):
        trl_algos.run(tiny_cfg, prompts_run, prompts_run / "rl")


@pytest.mark.slow
def test_resume_after_interruption(fake_run, tiny_cfg, monkeypatch):
    """A run killed after its step-1 checkpoint resumes from it: the log still has every step once."""
    from transformers import TrainerCallback

    from morlaif import trl_algos

    run_dir, _ = fake_run
    tiny_cfg.rl.algo, tiny_cfg.rl.batch_size, tiny_cfg.rl.save_every = "dpo", 2, 1

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise KeyboardInterrupt  # the checkpoint of step 1 is on disk, step 2 never happens

    real = trl_algos.callbacks
    monkeypatch.setattr(trl_algos, "callbacks", lambda tracker: [*real(tracker), Crash()])
    with pytest.raises(KeyboardInterrupt):
        trl_algos.run(tiny_cfg, run_dir, run_dir / "rl")
    assert (run_dir / "rl" / "trainer" / "checkpoint-1").is_dir() and not (run_dir / "rl" / "log.jsonl").exists()
    monkeypatch.setattr(trl_algos, "callbacks", real)
    summary = trl_algos.run(tiny_cfg, run_dir, run_dir / "rl")
    assert summary["resumed_from"] == 1
    assert [r["step"] for r in read_jsonl(run_dir / "rl" / "log.jsonl")] == [1, 2]
    assert not (run_dir / "rl" / "trainer").exists()


def test_grpo_conditioned_smoke(fake_run, tiny_cfg, monkeypatch):
    """rl.conditioning: prompt through TRL's GRPO: each prompt carries its episode's weights line, the reward
    function gets those weights (the dataset's column), and the saved policy records its conditioning."""
    from morlaif import trl_algos
    from morlaif.conditioning import FILE, Conditioning, parse_weights_line

    run_dir, scorer = fake_run
    seen = []
    real = trl_algos.ScalarizedReward.__call__

    def spy(self, prompts, completions, log_metric=None, weights=None, **kw):
        seen.append((prompts, weights))
        return real(self, prompts, completions, log_metric=log_metric, weights=weights, **kw)

    monkeypatch.setattr(trl_algos.ScalarizedReward, "__call__", spy)
    _run(tiny_cfg, run_dir, "grpo", conditioning="prompt", scalarizer="linear")
    assert len(seen) == tiny_cfg.rl.steps
    for prompts, weights in seen:
        assert weights is not None and len(weights) == len(prompts)
        for p, w in zip(prompts, weights):  # the line the policy read states the weights it is rewarded under
            assert parse_weights_line(p[0]["content"], OBJECTIVES).tolist() == pytest.approx(w)
    assert (run_dir / "rl" / "policy" / FILE).is_file()
    assert Conditioning.load(run_dir / "rl" / "policy").objectives == OBJECTIVES
