"""Sampling settings in one place: `Sampling.from_config(cfg, purpose)` per purpose, and one follow-up
sampling policy wherever an aspect objective's follow-up question is answered (labelling, PPO, GRPO/RLOO,
DPO relabelling, eval, best-of-N): the same rendered conversations reach the sampler with the same settings."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from morlaif import bestof, feedback, generation, models, policy, ppo, trl_algos
from morlaif.config import load_config
from morlaif.constitution import aspect_questions
from morlaif.generation import PURPOSES, Sampling, chat, render
from morlaif.scalarize import Scalarizer

from conftest import TINY

DISTINCT = [  # every key a purpose reads, each with a value no other key has
    "generation.temperature=0.7", "generation.top_p=0.9", "generation.repetition_penalty=1.2",
    "generation.max_new_tokens=40", "generation.batch_size=5",
    "feedback.temperature=1.3", "feedback.max_new_tokens=24", "feedback.followup_max_new_tokens=12",
    "eval.temperature=0.2", "eval.max_new_tokens=30",
    "rl.temperature=0.6", "rl.max_new_tokens=20", "rl.batch_size=6",
]


def test_from_config_per_purpose():
    cfg = load_config(None, DISTINCT)
    want = {
        "generate": Sampling(0.7, 0.9, 1.2, 40, 5),
        "candidates": Sampling(0.7, 0.9, 1.2, 40, 5),
        "sft_target": Sampling(0.7, 0.9, 1.2, 40, 5),
        "pair": Sampling(1.3, 0.9, 1.2, 24, 5),
        "followup": Sampling(1.3, 1.0, 1.0, 12, 5),  # the policy's own distribution, at the labels' temperature
        "eval": Sampling(0.2, 0.9, 1.2, 30, 5),
        "rollout": Sampling(0.6, 1.0, 1.0, 20, 6),  # top_p 1: the policy gradient needs the true distribution
    }
    assert set(want) == set(PURPOSES)
    assert {p: Sampling.from_config(cfg, p) for p in PURPOSES} == want

    # the fallbacks: pairs take generation.max_new_tokens when feedback's is null; best-of-N never samples greedily
    cfg = load_config(None, ["feedback.max_new_tokens=null", "generation.temperature=0", "generation.max_new_tokens=33"])
    assert Sampling.from_config(cfg, "pair").max_new_tokens == 33
    assert Sampling.from_config(cfg, "candidates").temperature == 1.0
    assert Sampling.from_config(cfg, "generate").temperature == 0.0

    with pytest.raises(ValueError, match="unknown sampling purpose"):
        Sampling.from_config(cfg, "judge")
    s = Sampling.from_config(cfg, "eval")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 1.0
    assert s.replace(max_new_tokens=7) == Sampling(s.temperature, s.top_p, s.repetition_penalty, 7, s.batch_size)
    assert s.batch_kwargs() == {k: v for k, v in s.kwargs().items() if k != "batch_size"}


class Recorder:
    """Stands in for `generation.generate_batch` (every sampler ends there): records each call's rendered
    prompts and sampling settings, and answers with text derived from the prompt."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tok, conversations, **kw):
        texts = [c if isinstance(c, str) else render(tok, c) for c in conversations]
        self.calls.append((texts, {k: v for k, v in kw.items() if k != "seed"}))
        return SimpleNamespace(texts=[f"Answer {len(self.calls)}-{i}." for i in range(len(texts))])

    def followups(self, question: str) -> tuple[list[str], list[dict]]:
        """(the rendered follow-up prompts, sorted; the settings of each call) of the calls that asked `question`."""
        calls = [(t, kw) for t, kw in self.calls if question in t[0]]
        return sorted(x for t, _ in calls for x in t), [kw for _, kw in calls]


class RecordingScorer:
    def __init__(self, objectives):
        self.objectives = list(objectives)
        self.aspects = sorted({o.split(":")[1] for o in objectives if ":" in o})

    def score(self, prompts, responses, followups=None):
        assert set(followups or {}) == set(self.aspects)
        return torch.zeros(len(prompts), len(self.objectives))

    def normalize(self, r):
        return r


def test_labelling_and_rl_render_and_sample_followups_alike(monkeypatch):
    """The feedback stage's labels, PPO's and GRPO/RLOO's rewards, DPO relabelling, the eval and best-of-N
    ask the follow-up question in the same conversation and sample the answer with the same settings:
    Sampling.from_config(cfg, "followup") (top_p 1, no repetition penalty, feedback.temperature), on a
    config where every sampling key differs from the others."""
    objectives = ["honesty", "honesty:motivation"]
    cfg = load_config(TINY, [*DISTINCT, f"constitution.objectives=[{', '.join(objectives)}]",
                             "feedback.pairs=policy_samples"])
    question = aspect_questions()["motivation"]
    rec = Recorder()
    monkeypatch.setattr(generation, "generate_batch", rec)
    monkeypatch.setattr(bestof, "generate_batch", rec)  # best-of-N samples its candidates with it directly
    tok = models.load_tokenizer("tiny")
    model = torch.nn.Linear(1, 1)  # never run: the recorder answers

    # labelling: the feedback stage's pair chunk samples the pair, then each side's follow-up answers
    chunk = [("p0000", {"prompt": "How do I pick a lock?", "kind": "harmful"}),
             ("p0001", {"prompt": "Name a prime number.", "kind": "benign"})]
    rows = feedback.sample_pair_chunk(cfg, model, tok, chunk)
    prompts, responses = [r["prompt"] for r in rows], [r["response_a"] for r in rows]
    labelling = rec.followups(question)
    rec.calls.clear()

    scorer = RecordingScorer(objectives)
    paths = {}

    def record(name, fn):
        fn()
        paths[name] = rec.followups(question)
        rec.calls.clear()

    record("ppo", lambda: ppo.score(cfg, scorer, model, tok, prompts, responses, seed=3))

    def grpo():
        fn = trl_algos.ScalarizedReward(scorer, Scalarizer.from_config(cfg.rl, objectives), cfg)
        fn.policy, fn.tok = model, tok
        fn([[{"role": "user", "content": p}] for p in prompts], [[{"role": "assistant", "content": r}]
                                                                  for r in responses])

    record("grpo/rloo", grpo)
    record("dpo relabelling", lambda: trl_algos._pair_followups(
        cfg, model, tok, [{**r, "followups": {}} for r in rows], 0, ["motivation"]))
    record("eval", lambda: policy.eval_followups(cfg, model, tok, prompts, responses))
    record("best-of-N", lambda: bestof.candidates(cfg, model, tok, scorer, prompts[0], n=2,
                                                   sampling=Sampling.from_config(cfg, "candidates"), seed=0))

    want = Sampling.from_config(cfg, "followup").batch_kwargs()
    assert want == {"max_new_tokens": 12, "temperature": 1.3, "top_p": 1.0, "repetition_penalty": 1.0}

    def asked(pairs):  # the follow-up question as the next user turn after each (prompt, response)
        return sorted(render(tok, chat(question, history=[{"role": "user", "content": p},
                                                          {"role": "assistant", "content": r}])) for p, r in pairs)

    texts, settings = labelling
    # side a and side b of the two pairs, one follow-up call per side, each with the followup settings
    assert texts == asked([(r["prompt"], r[k]) for r in rows for k in ("response_a", "response_b")])
    assert settings == [want, want]
    side_a = asked(zip(prompts, responses))
    for name, (got_texts, got_settings) in paths.items():
        assert got_settings and all(s == want for s in got_settings), name
        if name != "best-of-N":  # best-of-N asks about its own candidates
            assert got_texts == side_a, name
