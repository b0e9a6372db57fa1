"""PPO pieces on hand-made tensors, tiny-model learning tests (a fast one that fails for a wrong-sign update),
resume, and the rl stage."""

import json
import math
import random

import pytest
import torch

from morlaif import ppo
from morlaif.artifacts import read_jsonl, write_json, write_jsonl

import learning

# --------------------------------------------------------------------------- pure pieces


def test_compute_gae_hand_values():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.1]])
    m = torch.ones(1, 3)
    adv, ret = ppo.compute_gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.9]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    # γ = 0.9, λ = 0.5: δ2 = 0.9; δ1 = 0.09 − 0.2 = −0.11, A1 = −0.11 + 0.45·0.9 = 0.295;
    # δ0 = 0.18 − 0.5 = −0.32, A0 = −0.32 + 0.45·0.295 = −0.18725
    adv, _ = ppo.compute_gae(r, v, m, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.18725, 0.295, 0.9]]))


def _gae_loop(rewards, values, length, gamma, lam):
    """Textbook GAE over one episode of `length` steps, plain Python floats."""
    adv = [0.0] * len(rewards)
    nxt = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        nxt = delta + gamma * lam * nxt
        adv[t] = nxt
    return adv


def test_compute_gae_matches_loop_with_padding():
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [7, 1, 4, 6, 3]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    adv, ret = ppo.compute_gae(rewards * mask, values * mask, mask, gamma=0.97, lam=0.9)
    for i, n in enumerate(lengths):
        want = _gae_loop(rewards[i].tolist(), values[i].tolist(), n, 0.97, 0.9)
        assert torch.allclose(adv[i], torch.tensor(want), atol=1e-5)
        assert torch.allclose(ret[i, :n], adv[i, :n] + values[i, :n], atol=1e-6)
        assert (ret[i, n:] == 0).all() and (adv[i, n:] == 0).all()


def test_policy_loss_clip():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    # −A·ρ = [−1.5, −0.5, 1.1]; −A·clip(ρ) = [−1.2, −0.8, 1.1]; max = [−1.2, −0.5, 1.1]
    loss, clipfrac, approx_kl = ppo.policy_loss(new, old, adv, torch.ones(1, 3), clip_coef=0.2)
    assert loss.item() == pytest.approx(-0.2)
    assert clipfrac.item() == pytest.approx(1 / 3)
    want_kl = sum((x - 1) - math.log(x) for x in (1.5, 0.5, 1.1)) / 3
    assert approx_kl.item() == pytest.approx(want_kl, rel=1e-5)
    loss, clipfrac, _ = ppo.policy_loss(new, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), clip_coef=0.2)
    assert loss.item() == pytest.approx(-0.85)
    assert clipfrac.item() == pytest.approx(0.5)


def test_policy_loss_gradient_zero_when_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _, _ = ppo.policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.abs().item() == 0.0  # ρ > 1 + ε with A > 0: no further push


def test_value_loss_clip():
    loss, clipfrac = ppo.value_loss(torch.tensor([[0.5, 0.1]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                                    torch.ones(1, 2), vf_clip=0.2)
    # V_clip = [0.2, 0.1]; max((V−R)², (V_clip−R)²) = [0.64, 1.21]; ½·mean = 0.4625
    assert loss.item() == pytest.approx(0.4625)
    assert clipfrac.item() == pytest.approx(0.5)


def test_entropy_and_logprobs():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]]])
    ent = ppo.entropy_from_logits(logits[:, :1])
    assert ent.item() == pytest.approx(math.log(4))
    ent2 = ppo.entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]]))
    assert ent2.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    lp = ppo.logprobs_from_logits(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75))


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert ppo.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert ppo.kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert ppo.kl_estimate(ref, logp, "k3").item() == pytest.approx(1.0 - math.log(2))  # ρ = 2: (2−1) − log 2
    assert ppo.kl_estimate(logp, logp, "k3").item() == 0.0
    with pytest.raises(ValueError):
        ppo.kl_estimate(logp, ref, "k2")
    # Monte Carlo: both estimators are unbiased for KL(p || q) under samples from p.
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for est in ("k1", "k3"):
        assert ppo.kl_estimate(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(kl, abs=0.01)


def test_masked_whiten_and_mean():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert ppo.masked_mean(x, m).item() == pytest.approx(4.0)
    w = ppo.masked_whiten(x, m)
    assert torch.allclose(w, torch.tensor([[-3.0, -1.0, 0.0], [1.0, 3.0, 0.0]]) / math.sqrt(5.0), atol=1e-5)


def test_adaptive_kl_controller():
    c = ppo.AdaptiveKLController(0.1, target=1.0, horizon=80)
    c.update(2.0, 8)  # error clipped to +0.2: β · (1 + 0.2 · 8/80)
    assert c.value == pytest.approx(0.102)
    c = ppo.AdaptiveKLController(0.1, target=1.0, horizon=80)
    c.update(0.9, 8)  # error −0.1
    assert c.value == pytest.approx(0.1 * (1 - 0.01))
    fixed = ppo.AdaptiveKLController(0.1, target=None, horizon=80)
    fixed.update(50.0, 8)
    assert fixed.value == 0.1


def test_step_prompts_pure_and_cover_each_epoch():
    prompts = [f"p{i}" for i in range(5)]
    first = [p for s in range(5) for p in ppo.step_prompts(prompts, s, 2, seed=3)][:10]
    assert sorted(first[:5]) == prompts and sorted(first[5:]) == prompts
    assert ppo.step_prompts(prompts, 3, 2, seed=3) == ppo.step_prompts(prompts, 3, 2, seed=3)


# --------------------------------------------------------------------------- tiny-model PPO


class CountScorer:
    """Fake preference models: objective 'count' = how often token `target` appears in the response
    (re-tokenized), 'nonempty' = 1 for a non-empty response. Same interface as reward.RewardScorer."""

    objectives = ["count", "nonempty"]

    def __init__(self, tok, target: int):
        self.tok, self.target, self.calls = tok, target, 0

    def score(self, prompts, responses, followups=None):
        self.calls += 1
        rows = []
        for text in responses:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            rows.append([float(sum(i == self.target for i in ids)), float(bool(text))])
        return torch.tensor(rows)  # (B, K)

    def normalize(self, r):
        return r


@pytest.fixture(scope="module")
def half_vocab_model(tmp_path_factory):
    """(model dir, tokenizer, in_S mask): the policy of tests/learning.py, whose reward optimum is known."""
    return learning.half_vocab_model(tmp_path_factory.mktemp("halfvocab"))


def _rl_cfg(tiny_cfg, report_to="none", **rl):
    from morlaif.config import Config

    d = tiny_cfg.model_dump()
    d["rl"].update(rl)
    d["model"]["device"] = "cpu"
    d["logging"]["report_to"] = report_to
    return Config.model_validate(d)


PROMPTS = learning.PROMPTS
HalfVocabScorer = learning.HalfVocabScorer


def test_ppo_update_moves_the_policy_towards_a_known_reward(half_vocab_model, tiny_cfg, tmp_path):
    """Three PPO steps on the reward 'share of tokens in S' move probability onto S, measured exactly (the
    first response token's mass on S, no sampling): 0.70 -> 0.99 here. With the update's sign flipped (the
    advantages negated in ppo.policy_loss) it falls to 0.31, so this fails for a wrong-sign update."""
    torch.set_num_threads(2)
    model_dir, tok, in_s = half_vocab_model
    cfg = _rl_cfg(tiny_cfg, steps=3, batch_size=8, mini_batch_size=8, ppo_epochs=2, max_new_tokens=4,
                  learning_rate=5e-3, kl_coef=0.02, scalarizer="linear", weights={"share": 1.0, "nonempty": 0.0},
                  save_every=100, heldout_every=0)
    ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=HalfVocabScorer(tok, in_s), init=model_dir, prompts=PROMPTS)
    before = learning.mass_on_s(model_dir, tok, in_s)
    after = learning.mass_on_s(str(tmp_path / "rl" / "policy"), tok, in_s)
    print(f"P(first token in S): {before:.3f} -> {after:.3f}")
    assert after > before + 0.1


def test_ppo_learns_from_the_refusal_rule_alone(half_vocab_model, tiny_cfg, tmp_path, monkeypatch):
    """rl.refusal_reward's λ·rule reaches PPO's reward: the preference reward held constant (all weight on
    'nonempty') and the rule replaced by a graded stand-in (2·share of S tokens − 1 where the feedback model
    'refused', its negative elsewhere; every prompt 'refused'), three steps move the first token's mass onto S:
    0.70 -> 0.99 here; with λ = 0 it drifts to 0.25, so this fails when the rule does not reach the reward."""
    torch.set_num_threads(2)
    model_dir, tok, in_s = half_vocab_model
    share = HalfVocabScorer(tok, in_s)

    def graded_rule(texts, should):
        shares = share.score([], texts)[:, 0]  # (B,)
        return [(2 * float(x) - 1) * (1 if d else -1) for x, d in zip(shares, should)]

    monkeypatch.setattr(ppo, "rule_reward", graded_rule)
    cfg = _rl_cfg(tiny_cfg, steps=3, batch_size=8, mini_batch_size=8, ppo_epochs=2, max_new_tokens=4,
                  learning_rate=5e-3, kl_coef=0.02, scalarizer="linear", weights={"share": 0.0, "nonempty": 1.0},
                  save_every=100, heldout_every=0, refusal_reward=1.0)
    ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=share, init=model_dir, prompts=PROMPTS,
              should_refuse=dict.fromkeys(PROMPTS, True))
    before = learning.mass_on_s(model_dir, tok, in_s)
    after = learning.mass_on_s(str(tmp_path / "rl" / "policy"), tok, in_s)
    print(f"P(first token in S) under the rule alone: {before:.3f} -> {after:.3f}")
    assert after > before + 0.1


@pytest.mark.slow
def test_ppo_learns_known_reward(half_vocab_model, tiny_cfg, tmp_path):
    from morlaif import models, rl

    torch.set_num_threads(2)
    model_dir, tok, in_s = half_vocab_model
    scorer = HalfVocabScorer(tok, in_s)
    cfg = _rl_cfg(tiny_cfg, steps=10, batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=4,
                  learning_rate=2e-3, kl_coef=0.02, scalarizer="linear", weights={"share": 1.0, "nonempty": 0.0},
                  save_every=100)
    figures = ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=scorer, init=model_dir, prompts=PROMPTS)
    log = read_jsonl(tmp_path / "rl" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 11))
    rewards = [r["objective_rewards"]["share"] for r in log]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"share in S: first3 {first:.3f} last3 {last:.3f}; kl {[round(r['kl'], 3) for r in log]}")
    assert last > first + 0.1, rewards  # the rewarded half of the vocabulary is sampled clearly more often
    assert all(math.isfinite(r["kl"]) and r["kl"] < 10.0 for r in log)  # kept near the reference by β·KL
    summary = rl.metrics("ppo", log, figures)
    assert summary["finite"] and summary["steps"] == 10 and summary["objectives"] == ["share", "nonempty"]
    for key in ("scalarized_reward", "objective_rewards", "kl", "entropy", "policy_loss", "value_loss",
                "response_tokens", "objective_std", "kl_coef", "clipfrac_policy", "clipfrac_value", "approx_kl",
                "lr", "step_time_s", "step_cpu_s"):
        assert key in log[0]
    # the saved policy reloads as base + adapter and differs from the start
    pol = models.load_model(str(tmp_path / "rl" / "policy"), device="cpu")
    base = models.load_model(model_dir, device="cpu")
    ids = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")["input_ids"]
    assert not torch.allclose(pol(ids).logits, base(ids).logits)
    assert (tmp_path / "rl" / "value_head.safetensors").is_file()
    assert not (tmp_path / "rl" / "checkpoint").exists()


def test_ppo_follows_the_trainer_settings(tiny_cfg, tmp_path):
    """rl.lr_scheduler_type / warmup_steps set each step's learning rate (log.jsonl `lr`), the adapter
    has rl.lora_target_modules, and activation checkpointing runs."""
    from morlaif import models, training

    tok = models.load_tokenizer(models.TINY)
    cfg = _rl_cfg(tiny_cfg, steps=3, batch_size=2, mini_batch_size=2, max_new_tokens=4, learning_rate=1e-3,
                  lr_scheduler_type="linear", warmup_steps=1, activation_checkpointing=True,
                  lora_target_modules=["q_proj", "v_proj"], save_every=100)
    ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=CountScorer(tok, target=tok.eos_token_id), init=models.TINY,
              prompts=PROMPTS)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "rl" / "log.jsonl")]
    assert lrs == pytest.approx([1e-3 * f for f in training.lr_factors("linear", 1, 3)]) == [0.0, 1e-3, 5e-4]
    adapter = json.loads((tmp_path / "rl" / "policy" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.slow
def test_ppo_resume_after_crash(tiny_cfg, tmp_path, monkeypatch):
    from morlaif import models

    torch.set_num_threads(2)
    tok = models.load_tokenizer(models.TINY)
    cfg = _rl_cfg(tiny_cfg, steps=3, batch_size=2, mini_batch_size=2, max_new_tokens=4, save_every=1,
                  report_to="tensorboard", kl_target=1.0, kl_horizon=10, kl_estimator="k3", grad_accum=2)
    stage = tmp_path / "rl"
    scorer = CountScorer(tok, target=tok.eos_token_id)
    real_score = scorer.score

    def crash_on_third_call(prompts, responses, followups=None):
        if scorer.calls == 2:
            raise RuntimeError("simulated crash in step 3")
        return real_score(prompts, responses, followups)

    monkeypatch.setattr(scorer, "score", crash_on_third_call)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ppo.train(cfg, tmp_path, stage, scorer=scorer, init=models.TINY, prompts=PROMPTS)
    state = json.loads((stage / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert [r["step"] for r in read_jsonl(stage / "log.jsonl")] == [1, 2]
    # A row of a step after the checkpoint (e.g. crash between log and save) must not survive.
    with open(stage / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "stale": True}) + "\n")
    monkeypatch.setattr(scorer, "score", real_score)
    ppo.train(cfg, tmp_path, stage, scorer=scorer, init=models.TINY, prompts=PROMPTS)
    log = read_jsonl(stage / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "stale" not in log[-1]
    assert log[2]["kl_coef"] == pytest.approx(state["kl_coef"])  # β continued from the checkpoint
    assert (stage / "policy" / "adapter_config.json").is_file()
    assert any((stage / "tensorboard").iterdir())


def test_aspect_objectives_get_the_policys_follow_up_answers(tiny_cfg):
    """ppo.score passes the policy's answer to each aspect's follow-up question to the scorer, which
    renders the transcript itself (tests/test_aspect_objectives.py checks the rendering)."""
    from morlaif import models

    class AspectScorer:
        objectives = ["honesty", "honesty:motivation", "prudence:consequence"]

        def score(self, prompts, responses, followups=None):
            self.seen = (list(prompts), list(responses), followups)
            return torch.zeros(len(prompts), 3)

    cfg = _rl_cfg(tiny_cfg, max_new_tokens=3)
    model, tok = models.load_model(models.TINY, device="cpu"), models.load_tokenizer(models.TINY)
    sc = AspectScorer()
    assert ppo.score(cfg, sc, model, tok, ["p1", "p2"], ["a1", "a2"], seed=0).shape == (2, 3)
    prompts, responses, followups = sc.seen
    assert (prompts, responses) == (["p1", "p2"], ["a1", "a2"])
    assert set(followups) == {"motivation", "consequence"} and all(len(v) == 2 for v in followups.values())


class FixedScorer:
    """The same raw rewards for every response: (3, -1) for objectives a, b; normalize: (r - 1) / 2."""

    objectives = ["a", "b"]

    def score(self, prompts, responses, followups=None):
        return torch.tensor([[3.0, -1.0]] * len(responses))  # (B, K)

    def normalize(self, r):
        return (r - 1.0) / 2.0


@pytest.mark.parametrize("sets, want", [
    ({"scalarizer": "linear", "normalize": False}, 1.0),  # (3 - 1) / 2
    ({"scalarizer": "linear", "normalize": False, "weights": {"a": 3.0, "b": 1.0}}, 2.0),  # 3/4 * 3 - 1/4
    ({"scalarizer": "max_min", "normalize": False}, -1.0),
    ({"scalarizer": "max_min", "normalize": True}, -1.0),  # z = (1, -1)
    ({"scalarizer": "soft_max_min", "normalize": True, "tau": 1.0}, -math.log((math.exp(-1) + math.exp(1)) / 2)),
])
def test_config_decides_the_reward_ppo_learns_from(tiny_cfg, tmp_path, sets, want):
    """rl.scalarizer, rl.weights, rl.normalize change the scalarized reward PPO puts on the last token."""
    cfg = _rl_cfg(tiny_cfg, steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=2, **sets)
    ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=FixedScorer(), init="tiny", prompts=PROMPTS)
    row = read_jsonl(tmp_path / "rl" / "log.jsonl")[0]
    assert row["scalarized_reward"] == pytest.approx(want, rel=1e-6)
    assert row["objective_rewards"] == {"a": 3.0, "b": -1.0}  # logged raw, whatever the scalarization


# --------------------------------------------------------------------------- the rl stage


def test_rl_stage_ppo(tiny_cfg, prompts_run, monkeypatch):
    """rl.run: inputs checked, dispatch to PPO, artifacts, the policy stacks on the SFT adapter, skip on rerun."""
    from peft import LoraConfig, get_peft_model

    from morlaif import models, rl
    from morlaif.errors import InputError

    torch.set_num_threads(2)
    run = prompts_run
    with pytest.raises(InputError, match="morlaif rm"):
        rl.run(tiny_cfg, run)
    tok = models.load_tokenizer(models.TINY)
    sft = get_peft_model(models.load_model(models.TINY, device="cpu"),
                         LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    models.save_adapter(sft, tok, run / "sft" / "model", base=models.TINY)
    # the preference models' files (the rl stage's inputs); CountScorer below stands in for what they score
    from morlaif.constitution import configured_objectives

    trained = [o.name for o in configured_objectives(tiny_cfg.constitution)]
    write_json(run / "rm" / "objectives.json", {"objectives": trained})
    for f in ("norm.json", "heads.safetensors", "model/adapter_model.safetensors"):
        (run / "rm" / f).parent.mkdir(parents=True, exist_ok=True)
        (run / "rm" / f).write_text("{}")
    from morlaif import preference

    monkeypatch.setattr(preference.RewardScorer, "load",
                        classmethod(lambda cls, run_dir, cfg: CountScorer(tok, tok.eos_token_id)))
    with pytest.raises(InputError, match="morlaif feedback"):  # rl.refusal_reward: the feedback model's decisions
        rl.run(tiny_cfg, run)
    from morlaif.promptsets import train_prompts

    rl_prompts = [r["prompt"] for r in train_prompts(run, stage="rl")]
    first = ppo.step_prompts(rl_prompts, 0, tiny_cfg.rl.batch_size, tiny_cfg.seed)
    refuses = {p: p in first[:3] for p in rl_prompts}  # 3 of the first step's 4 prompts: not a symmetric 0.5
    write_jsonl(run / "feedback" / "decisions.jsonl", [{"prompt": p, "split": "rl", "answer": "", "refuses": refuses[p]}
                                                       for p in rl_prompts])
    # a scripted detector: every rollout "refuses", so the rule agrees exactly where the feedback model refused
    monkeypatch.setattr(ppo, "rule_reward", lambda texts, should: [1.0 if d else -1.0 for d in should])
    out = rl.run(tiny_cfg, run)
    assert (out / "policy" / "adapter_config.json").is_file()
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, tiny_cfg.rl.steps + 1))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algo"] == "ppo" and metrics["steps"] == tiny_cfg.rl.steps
    for r in log:  # the rule's agreement: the share of the step's prompts the feedback model refused
        batch = ppo.step_prompts(rl_prompts, r["step"] - 1, tiny_cfg.rl.batch_size, tiny_cfg.seed)
        assert r["rule_agreement"] == pytest.approx(sum(refuses[p] for p in batch) / len(batch))
    assert log[0]["rule_agreement"] == pytest.approx(0.75)
    assert metrics["rule_agreement_last"] == log[-1]["rule_agreement"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # the held-out reward curve: before the first step and after the last, greedy answers to the same prompts
    held = read_jsonl(out / "heldout.jsonl")
    assert [r["step"] for r in held] == [0, tiny_cfg.rl.steps]
    rows = ppo.heldout_rows(run, tiny_cfg.rl.heldout_prompts)
    # tiny: 2 clearly harmful and 4 benign eval prompts, so the first 8 of each kind are all of them
    assert held[0]["n"] == len(rows) == 6 and [r["kind"] for r in rows] == ["harmful"] * 2 + ["benign"] * 4
    assert set(held[0]["refusal_rate"]) == {"harmful", "benign"}
    from morlaif.generation import chat, generate_batch
    from morlaif.scalarize import Scalarizer

    sft_policy, sft_tok = models.load_sft_policy(str(run / "sft" / "model"), tiny_cfg.model)
    texts = generate_batch(sft_policy, sft_tok, [chat(r["prompt"]) for r in rows],
                           max_new_tokens=tiny_cfg.rl.max_new_tokens, temperature=0).texts
    scorer = CountScorer(tok, tok.eos_token_id)
    want = Scalarizer.from_config(tiny_cfg.rl, scorer.objectives)(scorer.score([], texts)).mean().item()
    assert held[0]["scalarized_reward"] == pytest.approx(want, abs=1e-6)
    assert metrics["heldout_scalarized_reward"] == {str(r["step"]): r["scalarized_reward"] for r in held}
    # load_model(rl/policy): SFT adapter merged, RL adapter on top, trained (B ≠ 0 after PPO steps)
    pol = models.load_model(str(out / "policy"), device="cpu")
    lora_b = [p for n, p in pol.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    mtime = (out / "metrics.json").stat().st_mtime
    rl.run(tiny_cfg, run)  # complete: skipped
    assert (out / "metrics.json").stat().st_mtime == mtime


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    """A resumed run continues with the same weights, Adam moments and RNG streams (torch, python, numpy)."""
    import numpy as np
    from peft import LoraConfig, get_peft_model

    from morlaif import models

    torch.manual_seed(0)
    model = get_peft_model(models.load_model(models.TINY, device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    vh = torch.nn.Linear(64, 1)
    params = [p for p in model.parameters() if p.requires_grad] + list(vh.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4]])
    for _ in range(2):
        (model(ids).logits.mean() + vh.weight.sum()).backward()
        opt.step()
        opt.zero_grad()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ppo.save_checkpoint(tmp_path / "ckpt", model, vh, opt, 5, 0.07, [3])
    expected = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]

    torch.manual_seed(9)  # a fresh process: other weights, empty optimizer, other RNG states
    model2 = get_peft_model(models.load_model(models.TINY, device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    vh2 = torch.nn.Linear(64, 1)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad] + list(vh2.parameters()), lr=1e-2)
    random.seed(9), np.random.seed(9)
    state = ppo.load_checkpoint(tmp_path / "ckpt", model2, vh2, opt2)
    assert (state["step"], state["kl_coef"], state["skipped_nonfinite"]) == (5, 0.07, [3])
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == expected
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(vh2.weight, vh.weight)
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt2.state.values()))
