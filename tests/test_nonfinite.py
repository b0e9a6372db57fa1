"""NaN/inf in rewards or losses: the step is skipped and counted, a warning names the step and the quantity,
and the run stops with one clear error after rl.max_nonfinite_steps / rm.max_nonfinite_steps.
(SFT and the TRL algorithms leave this to TRL/transformers.)"""

import json
import math

import pytest
import torch

from morlaif import ppo, preference, reward
from morlaif.artifacts import read_jsonl
from morlaif.errors import RunError
from morlaif.nonfinite import NonFiniteGuard, nonfinite_names

PROMPTS = ["Tell me a story.", "What is the capital of France?", "How do I bake bread?", "Say something nice."]


def test_guard_counts_warns_and_stops():
    g = NonFiniteGuard("rl", 2, "rl.max_nonfinite_steps")
    assert g.check(1, reward=torch.ones(3), loss=0.5)
    with pytest.warns(RuntimeWarning, match=r"\[rl\] step 2: non-finite reward, step skipped \(1/2"):
        assert not g.check(2, reward=torch.tensor([1.0, float("nan")]), loss=0.1)
    with pytest.warns(RuntimeWarning, match=r"step 5: non-finite loss, grad"):
        assert not g.check(5, loss=float("inf"), grad=torch.tensor(float("-inf")))
    with pytest.raises(RunError, match=r"step 7: non-finite loss; 3 steps skipped for NaN/inf, more than "
                                        r"rl.max_nonfinite_steps=2: stopping"):
        g.check(7, loss=torch.tensor(float("nan")))
    assert g.steps == [2, 5, 7] and g.count == 3
    assert nonfinite_names(a=1.0, b=torch.zeros(2, 2), c=float("nan")) == ["c"]


class NaNScorer:
    """Fake preference models whose rewards are NaN (or inf) in the rollout steps listed in `bad`."""

    objectives = ["len", "one"]

    def __init__(self, bad: dict[int, float]):
        self.bad, self.calls = bad, 0

    def score(self, prompts, responses, followups=None):
        self.calls += 1
        r = torch.tensor([[float(len(t)), 1.0] for t in responses])  # (B, K)
        if self.calls in self.bad:
            r[0, 0] = self.bad[self.calls]
        return r

    def normalize(self, r):
        return r


def _cfg(tiny_cfg, **rl):
    from morlaif.config import Config

    d = tiny_cfg.model_dump()
    d["rl"].update(dict(steps=4, batch_size=2, mini_batch_size=2, max_new_tokens=4, save_every=1,
                        scalarizer="linear"), **rl)
    d["model"]["device"] = "cpu"
    return Config.model_validate(d)


def test_ppo_skips_nonfinite_reward_steps_and_counts_them(tiny_cfg, tmp_path):
    from morlaif import models

    cfg = _cfg(tiny_cfg, max_nonfinite_steps=2)
    stage = tmp_path / "rl"
    with pytest.warns(RuntimeWarning) as w:
        summary = ppo.train(cfg, tmp_path, stage, scorer=NaNScorer({2: float("nan"), 3: float("inf")}),
                            init=models.TINY, prompts=PROMPTS)
    msgs = [str(x.message) for x in w if "non-finite" in str(x.message)]
    assert msgs == ["[rl] step 2: non-finite objective_rewards, scalarized_reward, advantages, step skipped "
                    "(1/2 allowed by rl.max_nonfinite_steps)",
                    "[rl] step 3: non-finite objective_rewards, scalarized_reward, advantages, step skipped "
                    "(2/2 allowed by rl.max_nonfinite_steps)"]
    log = read_jsonl(stage / "log.jsonl")
    assert [(r["step"], r["skipped_nonfinite"]) for r in log] == [(1, 0), (4, 2)]
    assert all(math.isfinite(r["scalarized_reward"]) and math.isfinite(r["policy_loss"]) for r in log)
    assert summary["skipped_nonfinite"] == 2 and summary["skipped_nonfinite_steps"] == [2, 3]
    from safetensors.torch import load_file

    for t in load_file(str(stage / "policy" / "adapter_model.safetensors")).values():
        assert torch.isfinite(t).all()  # nothing non-finite reached the weights


def test_ppo_stops_after_max_nonfinite_steps_and_resume_keeps_the_count(tiny_cfg, tmp_path):
    from morlaif import models

    cfg = _cfg(tiny_cfg, max_nonfinite_steps=1)
    stage = tmp_path / "rl"
    with pytest.warns(RuntimeWarning, match="step 2"), pytest.raises(
            RunError, match=r"\[rl\] step 3: non-finite objective_rewards.*2 steps skipped.*rl.max_nonfinite_steps=1"):
        ppo.train(cfg, tmp_path, stage, scorer=NaNScorer({2: float("nan"), 3: float("nan")}), init=models.TINY,
                  prompts=PROMPTS)
    state = json.loads((stage / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["skipped_nonfinite"] == [2]  # the count survives a resume
    # the resume point holds no pickle: weights, optimizer moments and RNG states are safetensors
    assert sorted(p.name for p in (stage / "checkpoint").iterdir()) == [
        "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "value_head.safetensors"]
    ppo.train(cfg, tmp_path, stage, scorer=NaNScorer({}), init=models.TINY, prompts=PROMPTS)
    log = read_jsonl(stage / "log.jsonl")
    assert [(r["step"], r["skipped_nonfinite"]) for r in log] == [(1, 0), (3, 1), (4, 1)]


def test_ppo_skips_a_nonfinite_loss_before_it_reaches_the_weights(tiny_cfg, tmp_path, monkeypatch):
    from morlaif import models

    real, calls = ppo.value_loss, {"n": 0}

    def nan_on_second_call(*a, **k):
        calls["n"] += 1
        loss, clip = real(*a, **k)
        return (loss * float("nan"), clip) if calls["n"] == 2 else (loss, clip)

    monkeypatch.setattr(ppo, "value_loss", nan_on_second_call)
    cfg = _cfg(tiny_cfg, steps=3, max_nonfinite_steps=3)
    with pytest.warns(RuntimeWarning, match=r"step 2: non-finite value_loss, step skipped"):
        summary = ppo.train(cfg, tmp_path, tmp_path / "rl", scorer=NaNScorer({}), init=models.TINY, prompts=PROMPTS)
    assert summary["skipped_nonfinite_steps"] == [2]
    assert [r["step"] for r in read_jsonl(tmp_path / "rl" / "log.jsonl")] == [1, 3]
    from safetensors.torch import load_file

    for t in load_file(str(tmp_path / "rl" / "value_head.safetensors")).values():
        assert torch.isfinite(t).all()


def test_rm_skips_nonfinite_loss_then_stops(tiny_cfg, tmp_path, monkeypatch):
    from test_reward import CONSTITUTION, write_synthetic_labels

    const = tmp_path / "k.yaml"
    const.write_text(CONSTITUTION)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.constitution.name, cfg.constitution.objectives = str(const), ["alpha", "beta"]
    cfg.rm.baseline, cfg.rm.max_nonfinite_steps = False, 2
    labels = tmp_path / "labels.jsonl"
    write_synthetic_labels(labels, n_pairs=16)
    real, calls = preference.bt_loss, {"n": 0}

    def nan_at(steps):
        def loss(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            return out * float("nan") if calls["n"] in steps else out
        return loss

    monkeypatch.setattr(preference, "bt_loss", nan_at({2, 3}))
    with pytest.warns(RuntimeWarning, match=r"\[rm multihead\] step 2: non-finite loss, step skipped"):
        reward.train(cfg, labels, tmp_path / "rm")
    m = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert m["training"]["multihead"]["skipped_nonfinite"] == 2 and math.isfinite(m["training"]["multihead"]["loss_last"])
    calls["n"] = 0
    monkeypatch.setattr(preference, "bt_loss", nan_at({1, 2, 3}))
    with pytest.warns(RuntimeWarning), pytest.raises(RunError, match=r"step 3: .*more than rm.max_nonfinite_steps=2"):
        reward.train(cfg, labels, tmp_path / "rm2")


def test_cli_prints_a_run_error_on_one_line_and_exits_1(tmp_path, capsys):
    """A judge endpoint that is down: one line, exit 1 (not 2: the input was fine)."""
    from fake_openai import FakeOpenAI

    from conftest import TINY
    from morlaif.cli import main

    with FakeOpenAI() as srv:
        url = srv.base_url  # the server stops here: connections are refused
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "hi", "response_a": "a", "response_b": "b"}\n')
    rc = main(["feedback", "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl"), "--config", str(TINY),
               "--objectives", "honesty", "--set", "feedback.backend=openai", "--set", f"feedback.openai.base_url={url}",
               "--set", "feedback.openai.max_retries=1", "--set", "feedback.openai.backoff_base=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("morlaif: error: openai judge: no valid answer"), err
    assert "ConnectError" in err[0] and not (tmp_path / "o.jsonl").exists()
