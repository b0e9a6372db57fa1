"""Aspect objectives (`principle:motivation`, `principle:consequence`): the preference model of an aspect
is trained on the transcript (prompt, response, follow-up question, the policy's follow-up answer), and
it must read exactly that transcript when it is used, in PPO as everywhere else.

What the preference model reads is caught where every text enters it: the rm tokenizer's `__call__`.
"""

import json

import pytest
import types

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from morlaif import ppo, preference, reward
from morlaif.config import load_config
from morlaif.constitution import aspect_questions

from conftest import TINY

OBJECTIVES = ["honesty", "honesty:motivation"]
QUESTION = aspect_questions()["motivation"]


def _labels(path, n=8):
    rows = []
    for i in range(n):
        base = {"pair_id": f"p{i}", "prompt": f"Question number {i}?", "response_a": f"Answer A{i}, plainly.",
                "response_b": f"Answer B{i}, evasively."}
        rows.append({**base, "objective": "honesty", "p_a": 0.8})
        rows.append({**base, "objective": "honesty:motivation", "p_a": 0.7, "followup_question": QUESTION,
                     "followup_a": f"Motive {i}: I wanted to be truthful.", "followup_b": f"Motive {i}: to get away."})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class Spy:
    """Records every text a given tokenizer (None: any) is called on."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[object, str]] = []
        real = PreTrainedTokenizerBase.__call__

        def call(tok, text=None, *a, **k):
            for t in [text] if isinstance(text, str) else (text or []):
                self.calls.append((tok, t))
            return real(tok, text, *a, **k)

        monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", call)

    def texts(self, tok=None, containing: str = "") -> list[str]:
        return [t for k, t in self.calls if (tok is None or k is tok) and containing in t]


class FixedAnswer:
    """A policy whose every generation is `answer` then EOS: the follow-up answer is known exactly."""

    def __init__(self, tok, answer: str):
        self.ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.vocab = len(tok)
        self.device, self.training = torch.device("cpu"), False
        self.generation_config = type("G", (), {"eos_token_id": tok.eos_token_id})()
        self.step = 0

    def __call__(self, input_ids, past_key_values=None, **kw):
        """Next-token logits of a decoding step: the answer's next token, whatever came before."""
        self.step = 0 if past_key_values is None else self.step + 1  # the prefill starts a new answer
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, 0, self.ids[min(self.step, len(self.ids) - 1)]] = 1e4  # certain, even when sampled
        return types.SimpleNamespace(logits=logits, past_key_values=object())  # a cache that cannot drop rows

    def eval(self):
        return self

    def train(self, mode=True):
        return self


@pytest.fixture(scope="module")
def aspect_run(tmp_path_factory):
    """The rm stage trained on aspect labels (tiny model), with every text it read recorded."""
    cfg = load_config(TINY, ["model.device=cpu", "rm.epochs=1.0",
                            "feedback.followup_max_new_tokens=16"])  # room for the scripted answers
    cfg.constitution.objectives = OBJECTIVES
    run = tmp_path_factory.mktemp("aspects") / "run"
    _labels(run / "feedback" / "labels.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        reward.run(cfg, run)
    return cfg, run, spy.texts()


def test_aspect_text_scored_in_ppo_is_the_training_text(aspect_run, monkeypatch):
    cfg, run, trained_on = aspect_run
    answer = "Motive 3: I wanted to be truthful."  # pair p3's follow-up answer on side a
    train_text = sorted(set(t for t in trained_on if answer in t))
    assert len(train_text) == 1  # the transcript of (p3, side a, honesty:motivation), read for training and norm stats
    scorer = preference.RewardScorer.load(run, cfg)
    policy = FixedAnswer(scorer.tok, answer)  # the policy answers the follow-up as it did when labelled
    spy = Spy(monkeypatch)
    r = ppo.score(cfg, scorer, policy, scorer.tok, ["Question number 3?"], ["Answer A3, plainly."], seed=0)
    used = spy.texts(scorer.tok, containing=answer)
    assert used == train_text, f"scored at use:\n{used}\ntrained on:\n{train_text}"
    # ...and the reward PPO gets for the aspect is the preference model's reward of that transcript
    assert r.shape == (1, 2)
    direct = scorer.score(["Question number 3?"], ["Answer A3, plainly."],
                          followups={"motivation": [answer]})[:, 1].cpu()
    assert torch.equal(r[:, 1], direct)


def test_ppo_with_aspect_objectives_scores_the_follow_up_transcript(aspect_run, monkeypatch):
    """A PPO run: the aspect reward comes from the 4-turn transcript (and moves with the follow-up answer);
    the action reward ignores the follow-up."""
    cfg, run, _ = aspect_run
    scorer = preference.RewardScorer.load(run, cfg)
    prompts, responses = ["Question number 1?", "Question number 5?"], ["Answer A1, plainly.", "Answer B5, evasively."]
    kind = ppo.score(cfg, scorer, FixedAnswer(scorer.tok, "I wanted to be truthful."), scorer.tok, prompts, responses, 0)
    sly = ppo.score(cfg, scorer, FixedAnswer(scorer.tok, "To get away with it."), scorer.tok, prompts, responses, 0)
    assert torch.allclose(kind[:, 0], sly[:, 0], atol=1e-6)  # honesty (action): the response only
    assert not torch.allclose(kind[:, 1], sly[:, 1])  # honesty:motivation: the follow-up answer changes it

    spy = Spy(monkeypatch)
    cfg = cfg.model_copy(deep=True)
    cfg.rl.steps, cfg.rl.batch_size, cfg.rl.mini_batch_size, cfg.rl.max_new_tokens = 1, 2, 2, 4
    ppo.train(cfg, run, run / "rl", scorer=scorer, init="tiny", prompts=prompts)
    read = spy.texts(scorer.tok)
    log = [json.loads(x) for x in (run / "rl" / "log.jsonl").read_text().splitlines()]
    assert set(log[0]["objective_rewards"]) == set(OBJECTIVES)
    with_question = [t for t in read if QUESTION in t]
    assert len(with_question) == 2  # one transcript per rollout: the aspect, scored on its follow-up turn
    for t in with_question:  # the question is a turn of its own, as in training, not text inside the prompt
        assert f"<|im_start|>user\n{QUESTION}<|im_end|>" in t and "\n\nAssistant: " not in t
