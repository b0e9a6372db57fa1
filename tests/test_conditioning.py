"""Weight-conditioned (steerable) policies: the weights line, the weight stream, per-episode scalarization,
PPO and GRPO training with it, `morlaif generate --weights` on the trained policy, the exported card."""

import pytest
import torch

import learning
from morlaif import models, ppo
from morlaif.artifacts import read_jsonl
from morlaif.cli import main
from morlaif.conditioning import Conditioning, parse_weights_line, weights_line
from morlaif.config import Config, load_config
from morlaif.errors import InputError
from morlaif.export import steering_section
from morlaif.generation import render
from morlaif.scalarize import WEIGHTED, Scalarizer, scalarize


def _cond(objectives=("a", "b"), **rl):
    cfg = load_config(None, ["rl.conditioning=prompt", *(f"rl.{k}={v}" for k, v in rl.items())])
    return Conditioning.from_config(cfg.rl, list(objectives))


# --------------------------------------------------------------------------- the form and the stream


def test_weights_line_is_exact_and_parses_back():
    assert weights_line(["honesty", "prudence"], [1.0, 3.0]) == "weights: honesty=0.25 prudence=0.75"
    assert weights_line(["a", "b", "c"], [1, 1, 1]) == "weights: a=0.33 b=0.33 c=0.33"
    line = weights_line(["honesty:motivation", "prudence"], [2.0, 0.0])
    assert line == "weights: honesty:motivation=1.00 prudence=0.00"
    assert parse_weights_line(line, ["honesty:motivation", "prudence"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        parse_weights_line("honesty=1", ["honesty"])


def test_the_weights_line_reaches_the_tokenizer_exactly():
    tok = models.load_tokenizer(models.TINY)
    cond = _cond()
    text = render(tok, cond.messages("How do I boil an egg?", torch.tensor([0.2, 0.8])))
    assert "weights: a=0.20 b=0.80" in text and text.index("weights:") < text.index("How do I boil an egg?")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # what the policy reads is the line, token for token
    assert cond.messages("q") == [{"role": "system", "content": "weights: a=0.50 b=0.50"},
                                  {"role": "user", "content": "q"}]  # None: the configured (uniform) weights


def test_weight_stream_is_a_function_of_the_step():
    cond = _cond(("a", "b", "c"))
    w0, w1 = cond.draw(7, 0, 64), cond.draw(7, 1, 64)
    assert torch.equal(w0, cond.draw(7, 0, 64))  # a resumed run redraws step 0's weights exactly
    assert not torch.equal(w0, w1)
    assert torch.equal(w0, torch.round(w0 * 100) / 100)  # two decimals: the numbers the policy reads
    assert ((w0.sum(1) - 1).abs() <= 0.02).all()
    share = cond.draw(7, 3, 4000).eq(cond.configured).all(1).float().mean().item()
    assert 0.22 < share < 0.28  # rl.configured_weight_share 0.25
    peaked = _cond(("a", "b", "c"), weight_concentration=0.1, configured_weight_share=0.0).draw(0, 0, 2000)
    flat = _cond(("a", "b", "c"), weight_concentration=10.0, configured_weight_share=0.0).draw(0, 0, 2000)
    assert peaked.max(1).values.mean() > 0.8 > 0.5 > flat.max(1).values.mean()


def test_conditioning_refuses_what_cannot_be_steered():
    for sets in (["rl.scalarizer=max_min"], ["rl.algo=dpo"], ["rl.reward_model=holistic"]):
        cfg = load_config(None, ["rl.conditioning=prompt", *sets])
        with pytest.raises(InputError) as e:
            Conditioning.from_config(cfg.rl, ["a", "b"])
        assert e.value.key == "rl.conditioning"
    assert Conditioning.from_config(load_config(None).rl, ["a"]) is None  # the default: no conditioning


# --------------------------------------------------------------------------- per-episode weights


def test_scalarize_with_one_weight_vector_per_row_exact():
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    W = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    assert scalarize("linear", r, W).tolist() == [1.0, 3.75]
    assert Scalarizer("linear", ["a", "b"], normalize=False)(r, weights=W).tolist() == [1.0, 3.75]
    for name in WEIGHTED:  # every weighted scalarizer: row i under W_i, as if called alone
        rows = torch.stack([scalarize(name, r[i : i + 1], W[i])[0] for i in range(2)])
        assert torch.allclose(scalarize(name, r, W), rows), name
    with pytest.raises(ValueError, match="shape"):
        scalarize("linear", r, torch.ones(3, 2))


def _rl_cfg(tiny_cfg, **rl):
    d = tiny_cfg.model_dump()
    d["rl"].update(rl)
    d["model"]["device"] = "cpu"
    d["logging"]["report_to"] = "none"
    return Config.model_validate(d)


class FixedScorer:
    """Raw rewards (3, -1) for objectives a, b, whatever the text; records the prompts it scores."""

    objectives = ["a", "b"]

    def __init__(self):
        self.prompts = []

    def score(self, prompts, responses, followups=None):
        self.prompts += list(prompts)
        return torch.tensor([[3.0, -1.0]] * len(responses))  # (B, K)

    def normalize(self, r):
        return r


def test_ppo_rewards_each_episode_under_its_own_weights(tiny_cfg, tmp_path, monkeypatch, capsys):
    cfg = _rl_cfg(tiny_cfg, steps=2, batch_size=4, mini_batch_size=4, max_new_tokens=2, conditioning="prompt",
                  scalarizer="linear", normalize=False)
    seen = []
    real = ppo.generate_batch
    monkeypatch.setattr(ppo, "generate_batch", lambda m, t, texts, **kw: seen.append(list(texts)) or real(m, t, texts, **kw))
    scorer = FixedScorer()
    ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=scorer, init="tiny", prompts=learning.PROMPTS)
    cond = Conditioning.from_config(cfg.rl, scorer.objectives)
    log = read_jsonl(tmp_path / "rl" / "log.jsonl")
    for step in range(2):
        W = cond.draw(cfg.seed, step, 4)  # (B, K)
        for text, w in zip(seen[step], W):
            assert weights_line(["a", "b"], w) in text  # each episode shows its own weights...
        want = ((W / W.sum(1, keepdim=True)) @ torch.tensor([3.0, -1.0])).mean().item()
        assert log[step]["scalarized_reward"] == pytest.approx(want, rel=1e-5)  # ...and is rewarded under them
    assert not any("weights:" in p for p in scorer.prompts)  # the preference models never see the line
    assert Conditioning.load(tmp_path / "rl" / "policy").objectives == ["a", "b"]

    # `morlaif generate --weights` asks the conditioned policy itself (no reranking)
    policy = str(tmp_path / "rl" / "policy")
    assert main(["generate", "--config", "tiny", "--model", policy, "--prompt", "hi", "--weights", "a=1,b=3",
                 "--max-new-tokens", "2", "--set", "model.device=cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", "--config", "tiny", "--model", "tiny", "--prompt", "hi", "--weights", "a=1",
                 "--max-new-tokens", "2"]) == 2
    assert "needs a weight-conditioned policy" in capsys.readouterr().err

    card = steering_section(Conditioning.load(tmp_path / "rl" / "policy"))
    assert "weights: a=0.50 b=0.50" in card and "a, b" in card


def test_grpo_conditioned_dataset_and_reward(tiny_cfg, tmp_path, monkeypatch):
    """GRPO through TRL: every row shows its episode's weights; the reward function scalarizes under them."""
    from morlaif.trl_algos import ScalarizedReward

    cfg = load_config(None, ["rl.conditioning=prompt", "rl.scalarizer=linear", "rl.normalize=false"])
    fn = ScalarizedReward(FixedScorer(), Scalarizer.from_config(cfg.rl, ["a", "b"]), cfg)
    prompts = [[{"role": "system", "content": "weights: a=1.00 b=0.00"}, {"role": "user", "content": "q1"}],
               [{"role": "system", "content": "weights: a=0.25 b=0.75"}, {"role": "user", "content": "q2"}]]
    completions = [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]
    out = fn(prompts, completions, weights=[[1.0, 0.0], [0.25, 0.75]])
    assert out == pytest.approx([3.0, 0.0])  # 3; 0.25 * 3 - 0.75
    assert fn.scorer.prompts == ["q1", "q2"]
    assert fn(prompts, completions) == pytest.approx([1.0, 1.0])  # no weights column: rl.weights (uniform)


def test_resumed_ppo_keeps_the_weight_stream(tiny_cfg, tmp_path, monkeypatch):
    """A crash in step 3 and a resume from the step-2 checkpoint: step 3 shows the weights an uninterrupted
    run showed in its step 3."""
    import re

    cfg = _rl_cfg(tiny_cfg, steps=3, batch_size=2, mini_batch_size=2, max_new_tokens=2, save_every=1,
                  conditioning="prompt", scalarizer="linear", normalize=False)
    seen = []
    real = ppo.generate_batch

    def spy(m, t, texts, **kw):
        seen.append(sorted(re.findall(r"weights: [^\n<]*", "".join(texts))))
        return real(m, t, texts, **kw)

    monkeypatch.setattr(ppo, "generate_batch", spy)
    ppo.train(cfg, tmp_path, tmp_path / "a", scorer=FixedScorer(), init="tiny", prompts=learning.PROMPTS)
    uninterrupted = list(seen)
    seen.clear()
    scorer = FixedScorer()
    real_score = scorer.score
    calls = []

    def crash_in_step_3(prompts, responses, followups=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_score(prompts, responses, followups)

    monkeypatch.setattr(scorer, "score", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ppo.train(cfg, tmp_path, tmp_path / "b", scorer=scorer, init="tiny", prompts=learning.PROMPTS)
    monkeypatch.setattr(scorer, "score", real_score)
    seen.clear()
    ppo.train(cfg, tmp_path, tmp_path / "b", scorer=scorer, init="tiny", prompts=learning.PROMPTS)
    assert len(seen) == 1 and seen[0] == uninterrupted[2] and seen[0]  # only step 3 ran again, same weights
