"""RAFT (rl.algo raft): the selection and the SFT batch exactly, a policy that learns a known reward, the
refusal rule deciding what is kept, and the rl stage end to end on the tiny model."""

import json

import pytest
import torch

import learning
from morlaif import models, raft, rl
from morlaif.artifacts import read_jsonl, write_json, write_jsonl
from morlaif.config import Config
from morlaif.errors import InputError

PROMPTS = learning.PROMPTS


@pytest.fixture(scope="module")
def half_vocab_model(tmp_path_factory):
    return learning.half_vocab_model(tmp_path_factory.mktemp("halfvocab"))


def _cfg(tiny_cfg, **rl_keys) -> Config:
    d = tiny_cfg.model_dump()
    d["rl"].update({"algo": "raft", "heldout_every": 0, **rl_keys})
    d["model"]["device"] = "cpu"
    d["logging"]["report_to"] = "none"
    return Config.model_validate(d)


def test_best_of_groups_keeps_each_prompts_best_unless_it_breaks_the_rule():
    reward = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 0.0], [0.0, 0.5, 0.4]])  # (P=3, N=3)
    assert raft.best_of_groups(reward, None) == [1, 0, 1]
    rule = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert raft.best_of_groups(reward, rule) == [1, None, 1]
    nan = torch.tensor([[float("nan"), 0.2], [float("nan"), float("inf")], [float("nan"), float("nan")]])
    assert raft.best_of_groups(nan, None) == [1, None, None]  # a non-finite reward is never the best


def test_balanced_repeats_the_rarer_decision_in_turn():
    assert raft.balanced([True, False, False, False]) == [1, 2, 3, 0, 0, 0]
    assert raft.balanced([True, True, False, True, True]) == [0, 1, 3, 4, 2, 2, 2, 2]
    assert raft.balanced([False, True]) == [1, 0]  # as many: each once (refusals first on a tie)
    assert raft.balanced([True, True]) == [0, 1] and raft.balanced([]) == []  # one kind only


@pytest.mark.parametrize("balance", [True, False])
def test_raft_trains_on_the_balanced_kept_samples(half_vocab_model, tiny_cfg, tmp_path, monkeypatch, balance):
    """With every sample taken as following the rule, each prompt keeps its best; a quarter of the prompts were
    refused by the feedback model, so balancing repeats their samples until they are as many as the answers."""
    model_dir, tok, in_s = half_vocab_model
    monkeypatch.setattr(raft, "rule_reward", lambda samples, decisions: [1.0] * len(samples))
    refuses = {p: i % 4 == 0 for i, p in enumerate(PROMPTS)}
    cfg = _cfg(tiny_cfg, steps=1, num_generations=2, max_new_tokens=3, refusal_reward=1.0, balance_kept=balance)
    raft.train(cfg, tmp_path, tmp_path / "rl", scorer=learning.HalfVocabScorer(tok, in_s), init=model_dir,
               prompts=PROMPTS, should_refuse=refuses)
    (row,) = read_jsonl(tmp_path / "rl" / "log.jsonl")
    n_ref = sum(refuses.values())
    assert 0 < n_ref < len(PROMPTS) - n_ref
    assert row["kept"] == len(PROMPTS) and row["kept_refusals"] == n_ref
    assert row["train_rows"] == (2 * (len(PROMPTS) - n_ref) if balance else len(PROMPTS))


def test_sft_batch_trains_on_the_response_tokens_only():
    tok = models.load_tokenizer(models.TINY)
    p = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    r = [torch.tensor([9, 10]), torch.tensor([11, 12, 13])]
    ids, mask, labels = raft.sft_batch(tok, p, r, "cpu")
    pad = tok.pad_token_id
    assert ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, pad]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, -100, 9, 10], [-100, 11, 12, 13, -100]]


def test_raft_moves_the_policy_towards_a_known_reward(half_vocab_model, tiny_cfg, tmp_path):
    """Three rounds of best-of-8 on the reward 'share of tokens in S' move the first response token's mass onto S,
    measured exactly: 0.70 -> 0.86 here. Keeping each prompt's worst sample instead (argmin in best_of_groups)
    takes it to 0.59, so this fails when the selection is wrong."""
    torch.set_num_threads(2)
    model_dir, tok, in_s = half_vocab_model
    cfg = _cfg(tiny_cfg, steps=3, num_generations=8, batch_size=8, mini_batch_size=8, ppo_epochs=2, max_new_tokens=4,
               learning_rate=5e-3, scalarizer="linear", weights={"share": 1.0, "nonempty": 0.0}, refusal_reward=0.0)
    figures = raft.train(cfg, tmp_path, tmp_path / "rl", scorer=learning.HalfVocabScorer(tok, in_s), init=model_dir,
                         prompts=PROMPTS)
    before = learning.mass_on_s(model_dir, tok, in_s)
    after = learning.mass_on_s(str(tmp_path / "rl" / "policy"), tok, in_s)
    print(f"P(first token in S): {before:.3f} -> {after:.3f}")
    assert after > before + 0.1
    log = read_jsonl(tmp_path / "rl" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["kept"] == len(PROMPTS) and r["rule_agreement"] is None for r in log)  # no rule: every best kept
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # before the first update π_θ is π_ref
    assert log[1]["kl"] > 0.0 and log[2]["kl"] > 0.0
    assert figures["data"] == {"prompts": len(PROMPTS), "samples_per_prompt": 8}


@pytest.mark.parametrize("refuses", [False, True])
def test_raft_keeps_only_samples_that_follow_the_refusal_rule(half_vocab_model, tiny_cfg, tmp_path, refuses):
    """The tiny policy never refuses: where the feedback model answered every prompt, every best sample follows
    the rule and is kept; where it refused every one, none is, and the policy is not trained at all."""
    torch.set_num_threads(2)
    model_dir, tok, in_s = half_vocab_model
    cfg = _cfg(tiny_cfg, steps=1, num_generations=2, max_new_tokens=3, refusal_reward=1.0)
    raft.train(cfg, tmp_path, tmp_path / "rl", scorer=learning.HalfVocabScorer(tok, in_s), init=model_dir,
               prompts=PROMPTS, should_refuse=dict.fromkeys(PROMPTS, refuses))
    (row,) = read_jsonl(tmp_path / "rl" / "log.jsonl")
    assert row["rule_agreement"] == (0.0 if refuses else 1.0)
    assert row["kept"] == (0 if refuses else len(PROMPTS)) and row["kept_refusals"] == 0
    assert row["train_rows"] == row["kept"]  # one decision only: nothing to balance
    assert (row["policy_loss"] is None) == refuses
    after = learning.mass_on_s(str(tmp_path / "rl" / "policy"), tok, in_s)
    assert (after == pytest.approx(learning.mass_on_s(model_dir, tok, in_s), abs=1e-6)) == refuses


def test_raft_refuses_a_conditioned_policy(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, conditioning="prompt", scalarizer="linear")
    with pytest.raises(InputError, match="ppo, grpo or rloo") as e:
        raft.train(cfg, tmp_path, tmp_path / "rl", scorer=object(), prompts=PROMPTS)
    assert e.value.key == "rl.conditioning"


def test_rl_stage_with_raft(half_vocab_model, tiny_cfg, tmp_path, monkeypatch):
    """`morlaif rl` with rl.algo raft: the run's rl prompts and decisions, one log row per round with the rule's
    agreement, the held-out curve before and after, metrics.json in the common schema, a loadable policy."""
    from morlaif import preference, prompts

    torch.set_num_threads(2)
    model_dir, tok, in_s = half_vocab_model
    cfg = _cfg(tiny_cfg, steps=2, num_generations=2, max_new_tokens=3, heldout_every=1, heldout_prompts=4)
    run = tmp_path / "run"
    prompts.run(cfg, run)
    models.save_model(models.load_model(model_dir, device="cpu"), tok, run / "sft" / "model")
    write_json(run / "rm" / "objectives.json", {"objectives": ["share", "nonempty"]})
    for f in ("norm.json", "heads.safetensors", "model/adapter_model.safetensors"):
        (run / "rm" / f).parent.mkdir(parents=True, exist_ok=True)
        (run / "rm" / f).write_text("{}")
    monkeypatch.setattr(rl, "check_trained_objectives", lambda run_dir, cfg: None)  # the stand-in's objectives
    monkeypatch.setattr(preference.RewardScorer, "load",
                        classmethod(lambda cls, run_dir, cfg: learning.HalfVocabScorer(tok, in_s)))
    from morlaif.promptsets import train_prompts

    rl_prompts = [r["prompt"] for r in train_prompts(run, stage="rl")]
    refuses = {p: i % 4 == 0 for i, p in enumerate(rl_prompts)}  # a quarter: the tiny policy never refuses
    write_jsonl(run / "feedback" / "decisions.jsonl", [{"prompt": p, "split": "rl", "answer": "", "refuses": r}
                                                       for p, r in refuses.items()])
    cfg.rl.scalarizer, cfg.rl.weights = "linear", {"share": 1.0, "nonempty": 0.0}
    out = rl.run(cfg, run)
    log = read_jsonl(out / "log.jsonl")
    answered = sum(not r for r in refuses.values()) / len(refuses)
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["rule_agreement"] == pytest.approx(answered) and r["kept"] == sum(not r for r in refuses.values())
               for r in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algo"] == "raft" and metrics["steps"] == 2
    assert metrics["rule_agreement_first"] == pytest.approx(answered)
    assert sorted(metrics["heldout_scalarized_reward"]) == ["0", "1", "2"]
    assert (out / "policy" / "adapter_config.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
