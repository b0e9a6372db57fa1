import hashlib
import math
import time
import types

import pytest
import torch

from morlaif import judge as J
from fake_openai import FakeOpenAI

# ----------------------------------------------------------------------------- pure functions


def test_debias_formula_exact():
    assert J.debias(0.8, 0.3) == pytest.approx(0.75)
    assert J.debias(0.9, 0.9) == pytest.approx(0.5)  # pure position bias cancels
    assert J.debias(1.0, 0.0) == 1.0 and J.debias(0.0, 1.0) == 0.0
    assert J.is_consistent(0.8, 0.3) and J.is_consistent(0.2, 0.7)
    assert not J.is_consistent(0.8, 0.7) and not J.is_consistent(0.5, 0.4)


def test_letter_probs_hand_made_logits():
    # vocab of 6: ids 1,2 spell "A", id 3 spells "B". Row 0: masses A = (2+1)/Z, B = 3/Z -> 0.5.
    logits = torch.tensor([[0.0, math.log(2), 0.0, math.log(3), 0.0, 0.0],
                           [0.0, math.log(6), -1e9, 0.0, 0.0, 0.0]])  # row 1: A = 6/Z, B = 1/Z
    p, mass_a, mass_b = J.letter_probs(logits, [1, 2], [3])
    assert p.tolist() == pytest.approx([0.5, 6 / 7])
    z0 = 1 + 2 + 1 + 3 + 1 + 1
    assert mass_a[0].item() == pytest.approx(3 / z0) and mass_b[0].item() == pytest.approx(3 / z0)
    assert mass_a[1].item() == pytest.approx(6 / 10)
    # underflow-safe: letters far below the rest still give a finite, exact ratio
    far = torch.tensor([[100.0, -200.0, -200.0, -200.0 + math.log(2), 0.0, 0.0]])
    assert J.letter_probs(far, [1, 2], [3])[0].item() == pytest.approx(0.5)


def test_parse_letter_and_top_logprobs():
    assert J.parse_letter("A") == "A"
    assert J.parse_letter(" (B) because") == "B"
    assert J.parse_letter("Response B is worse.\nAnswer: A") == "A"
    assert J.parse_letter("the answer is B") == "B"
    assert J.parse_letter("Maybe?") is None
    assert J.parse_letter("Absolutely") is None  # a word starting with A is not a letter
    top = [{"token": " A", "logprob": math.log(0.3)}, {"token": "A", "logprob": math.log(0.1)},
           {"token": "B", "logprob": math.log(0.4)}, {"token": "C", "logprob": math.log(0.2)}]
    assert J.p_first_from_top_logprobs(top) == pytest.approx(0.5)
    assert J.p_first_from_top_logprobs([{"token": "x", "logprob": 0.0}]) is None


# ----------------------------------------------------------------------------- hf judge on a scripted model


class ScriptedLM:
    """Stands in for a causal LM: next-token logits put P(A)=0.7 where option A holds GOOD, else 0.2.

    The decoder's last hidden state is (log p, log(1 - p), 1); the LM head maps it to logits with
    all mass on one spelling of each letter.
    """

    def __init__(self, tok, ids_a, ids_b):
        self.tok, self.ids_a, self.ids_b = tok, ids_a, ids_b
        self.device = torch.device("cpu")
        self.calls = []
        V = len(tok)
        self.head = torch.nn.Linear(3, V, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, 2] = -1e4  # every other token: logit -1e4
            self.head.weight[ids_a[0]] = torch.tensor([1.0, 0.0, 0.0])
            self.head.weight[ids_b[0]] = torch.tensor([0.0, 1.0, 0.0])

    def eval(self):
        return self

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return self._decoder

    def _decoder(self, input_ids, attention_mask, use_cache):
        self.calls.append(input_ids.shape[0])
        hidden = torch.zeros(input_ids.shape[0], input_ids.shape[1], 3)
        for i, row in enumerate(input_ids):
            text = self.tok.decode(row[attention_mask[i].bool()])
            p = 0.7 if "(A) GOOD" in text else 0.2
            hidden[i, -1] = torch.tensor([math.log(p), math.log(1 - p), 1.0])
        return types.SimpleNamespace(last_hidden_state=hidden, past_key_values=None)


def test_letter_logits_are_fp32_from_bf16_hidden_states():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 50, bias=False).to(torch.bfloat16)
    h = (torch.randn(4, 64) * 3).to(torch.bfloat16)  # (N, H)
    got = J.letter_logits(h, head, [3, 7])  # (4, 2)
    want = h.double() @ head.weight[[3, 7]].double().T
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-4)  # fp32 accumulation of bf16 inputs: exact to ~1e-6
    assert (head(h)[:, [3, 7]].double() - want).abs().max() > 1e-3  # the bf16 logits are not


def test_hf_judge_reads_letters_both_orders_batched():
    from morlaif import models

    tok = models.load_tokenizer(models.TINY)
    ids_a, ids_b = J.letter_token_ids(tok)
    assert len(ids_a) == 2 and len(ids_b) == 2  # "A" and " A" are single tokens in SmolLM2's vocab
    lm = ScriptedLM(tok, ids_a, ids_b)
    judge = J.HFJudge(lm, tok, model_name="scripted", batch_size=3, share_prefix=False)
    res = judge.prefer(["q1", "q2 longer prompt", "q3"], ["GOOD one", "bad", "meh"], ["bad", "GOOD two", "meh too"],
                       "Which is better?")
    assert lm.calls == [3, 3] and judge.forward_passes == 2  # 6 prompts (3 pairs x 2 orders), batch 3
    # pair 0: a GOOD -> p_ab 0.7 (A shown GOOD), p_ba 0.2 -> p_a = (0.7 + 0.8) / 2
    assert res[0]["p_ab"] == pytest.approx(0.7) and res[0]["p_ba"] == pytest.approx(0.2)
    assert res[0]["p_a"] == pytest.approx(0.75) and res[0]["consistent"]
    assert res[1]["p_a"] == pytest.approx((0.2 + 1 - 0.7) / 2) and res[1]["consistent"]
    assert res[2]["p_a"] == pytest.approx(0.5) and not res[2]["consistent"]  # only position bias
    assert set(res[0]) == {"p_a", "p_ab", "p_ba", "consistent", "raw"} and set(res[0]["raw"]) == {"ab", "ba"}


def test_make_judge_hf_tiny(tiny_cfg):
    judge = J.make_judge(tiny_cfg)
    res = judge.prefer(["Hi"], ["Hello!"], ["Go away."], "Which response is kinder?")
    assert 0.0 <= res[0]["p_a"] <= 1.0
    assert res[0]["p_a"] == pytest.approx(J.debias(res[0]["p_ab"], res[0]["p_ba"]))
    cot = judge.prefer(["Hi"], ["Hello!"], ["Go away."], "Which response is kinder?", chain_of_thought=True)
    assert "reasoning" in cot[0]["raw"]["ab"]


# ----------------------------------------------------------------------------- openai backend on a fake server


def _openai_cfg(tiny_cfg, url, **kw):
    tiny_cfg.feedback.backend = "openai"
    o = tiny_cfg.feedback.openai
    o.base_url, o.model, o.backoff_base, o.backoff_max, o.max_retries = url, "fake", 0.01, 0.2, 3
    o.api_key_env = "MORLAIF_TEST_KEY"
    for k, v in kw.items():
        setattr(o, k, v)
    return tiny_cfg


def test_openai_judge_logprobs_and_retries(tiny_cfg, monkeypatch):
    monkeypatch.setenv("MORLAIF_TEST_KEY", "sk-test-SECRET123")
    with FakeOpenAI(faults=["429", "500", None, "nologprobs"]) as srv:
        judge = J.make_judge(_openai_cfg(tiny_cfg, srv.base_url, concurrency=1))
        res = judge.prefer(["p1", "p2"], ["GOOD a", "plain"], ["plain", "GOOD b"], "Which is better?")
    # 4 judge prompts + one 429 and one 500 retried
    assert judge.requests == 6 and len(srv.requests) == 6
    assert all(r["headers"].get("Authorization") == "Bearer sk-test-SECRET123" for r in srv.requests)
    sources = [r["raw"][o]["source"] for r in res for o in ("ab", "ba")]
    assert sources.count("text") == 1 and sources.count("logprobs") == 3
    assert res[0]["p_a"] > 0.85 and res[1]["p_a"] < 0.15
    assert res[0]["consistent"] and res[1]["consistent"]
    assert "SECRET123" not in repr(res)
    body = srv.requests[-1]["body"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["temperature"] == 0.0


def test_openai_judge_answers_prompts_for_refusal_decisions(tiny_cfg):
    """The feedback model's own answers (feedback.refusal_labels 'teacher'): one plain user turn each, greedy,
    decision_tokens long, retried like a judge question, returned in prompt order."""
    with FakeOpenAI(faults=["500"]) as srv:
        judge = J.make_judge(_openai_cfg(tiny_cfg, srv.base_url, concurrency=1))
        got = judge.answer(["HARM: build a bomb", "Bake bread?"], 7)
    assert got == ["I'm sorry, but I can't help with that.", "Sure: here is how."]
    assert len(srv.requests) == 3 and srv.requests[0]["fault"] == "500"  # the first one retried
    asked = [r["body"] for r in srv.requests[1:]]
    assert [b["messages"] for b in asked] == [[{"role": "user", "content": "HARM: build a bomb"}],
                                              [{"role": "user", "content": "Bake bread?"}]]
    assert all(b["max_tokens"] == 7 and b["temperature"] == 0.0 and "logprobs" not in b for b in asked)


def test_hf_judge_answers_greedily(tiny_cfg):
    judge = J.make_judge(tiny_cfg)
    first = judge.answer(["Hello there?", "How do I bake bread?"], 4)
    assert first == judge.answer(["Hello there?", "How do I bake bread?"], 4)  # greedy: the same answer again
    assert len(first) == 2 and all(isinstance(a, str) for a in first)


def test_openai_judge_garbage_fails_clearly(tiny_cfg):
    with FakeOpenAI(always="garbage") as srv:
        judge = J.make_judge(_openai_cfg(tiny_cfg, srv.base_url, max_retries=2, concurrency=2))
        with pytest.raises(J.JudgeError, match="no valid answer.*3 attempts"):
            judge.prefer(["p"], ["a"], ["b"], "Which?")
        assert len(srv.requests) <= 2 * 3  # bounded: each of the two orders tries 3 times at most


def test_openai_judge_connection_refused_is_bounded(tiny_cfg):
    with FakeOpenAI() as srv:
        url = srv.base_url
    judge = J.make_judge(_openai_cfg(tiny_cfg, url, max_retries=1, timeout=2.0))  # server now stopped
    with pytest.raises(J.JudgeError, match="ConnectError|Transport|Connect"):
        judge.prefer(["p"], ["a"], ["b"], "Which?")


def test_openai_judge_backs_off_a_failing_server(tiny_cfg):
    """Server 1 answers every request with HTTP 500: after its first failure it is left alone for
    the backoff (>= 2.5 s here) and every request, the retry included, goes to server 2 at once."""
    with FakeOpenAI(always="500") as bad, FakeOpenAI() as good:
        judge = J.make_judge(_openai_cfg(tiny_cfg, [bad.base_url, good.base_url], concurrency=1, backoff_base=5.0,
                                         backoff_max=10.0))
        t = time.time()
        res = judge.prefer([f"p{i}" for i in range(4)], ["GOOD a"] * 4, ["plain"] * 4, "Which is better?")
        elapsed = time.time() - t
    assert len(bad.requests) == 1 and len(good.requests) == 8  # 4 pairs x 2 orders, none lost
    assert judge.servers.sent == [1, 8] and judge.requests == 9
    assert elapsed < 2.0  # no retry waited: a healthy server was there
    assert all(r["p_a"] > 0.85 for r in res)


def test_server_pool_least_loaded_then_in_turn():
    pool = J.ServerPool(["http://a", "http://b", "http://c"])
    assert [pool.pick() for _ in range(4)] == [0, 1, 2, 0]  # idle servers: in turn
    pool.in_flight = [2, 0, 1]
    assert pool.pick() == 1  # the least loaded wins
    pool.back_off(1, 60.0)
    assert pool.pick() == 2 and pool.wait() == 0.0  # b is skipped while backed off
    pool.back_off(0, 30.0)
    pool.back_off(2, 90.0)
    assert pool.pick() == 0 and 29.0 < pool.wait() <= 30.0  # all down: the first back, after its wait


def test_openai_cot_reads_letter_after_answer():
    body = {"choices": [{"message": {"content": "B is rude.\nAnswer: A"},
                         "logprobs": {"content": [{"token": "B", "top_logprobs": [{"token": "B", "logprob": 0.0}]},
                                                  {"token": " is rude.\nAnswer:", "top_logprobs": []},
                                                  {"token": " A", "top_logprobs": [{"token": " A", "logprob": math.log(0.8)},
                                                                                   {"token": " B", "logprob": math.log(0.2)}]}]}}]}
    p, raw = J.OpenAIJudge.parse(body, chain_of_thought=True)
    assert p == pytest.approx(0.8) and raw["source"] == "logprobs"
    no_lp = {"choices": [{"message": {"content": "B is rude.\nAnswer: A"}}]}
    assert J.OpenAIJudge.parse(no_lp, chain_of_thought=True)[0] == 1.0
    assert J.OpenAIJudge.parse({"choices": []}, chain_of_thought=False) is None


def test_hf_shared_prefix_equals_plain_forward():
    """Objectives asked about the same pair share the prefix's KV cache; the numbers must not change."""
    from morlaif import models

    tok, model = models.load_tokenizer(models.TINY), models.load_model(models.TINY, device="cpu")
    shared = J.HFJudge(model, tok, model_name="t", batch_size=5)
    plain = J.HFJudge(model, tok, model_name="t", batch_size=5, share_prefix=False)
    prompts = ["How do I bake bread?", "Tell me a joke about cats"] * 2
    a = ["Mix flour and water.", "No."] * 2
    b = ["I won't.", "Why did the cat sit on the computer? To watch the mouse."] * 2
    q = ["Which is more honest?"] * 2 + ["Which response shows more prudence and good judgement?"] * 2
    for x, y in zip(shared.prefer(prompts, a, b, q), plain.prefer(prompts, a, b, q)):
        assert x["p_ab"] == pytest.approx(y["p_ab"], abs=1e-5) and x["p_ba"] == pytest.approx(y["p_ba"], abs=1e-5)
    # a template that asks its question on the first line has no pair prefix to share: the plain forward
    for j in (shared, plain):
        j.templates[False] = "{question}\nUser: {prompt}\n(A) {response_a}\n(B) {response_b}\n"
    for x, y in zip(shared.prefer(prompts, a, b, q), plain.prefer(prompts, a, b, q)):
        assert x["p_ab"] == pytest.approx(y["p_ab"], abs=1e-5) and x["p_ba"] == pytest.approx(y["p_ba"], abs=1e-5)


# ----------------------------------------------------------------------------- worked comparisons (judge_shots)


def test_judge_demos_come_from_the_constitution_and_alternate_letters(tiny_cfg):
    from morlaif.constitution import load_constitution

    tiny_cfg.constitution.name, tiny_cfg.feedback.judge_shots = "virtues", 3
    c = load_constitution("virtues")
    honesty, prudence, justice = c.principles[:3]
    demos = J.judge_demos(tiny_cfg)
    assert [d["answer"] for d in demos] == ["A", "B", "A"]
    assert [d["question"] for d in demos] == [honesty.comparison, prudence.comparison, justice.comparison]
    pos, neg = honesty.demonstrations["positive"][0], honesty.demonstrations["negative"][0]
    assert demos[0] == {"prompt": pos["prompt"], "response_a": pos["response"], "response_b": neg["response"],
                        "question": honesty.comparison, "answer": "A"}
    pos, neg = prudence.demonstrations["positive"][0], prudence.demonstrations["negative"][0]
    assert (demos[1]["response_a"], demos[1]["response_b"]) == (neg["response"], pos["response"])
    tiny_cfg.feedback.judge_shots = 0
    assert J.judge_demos(tiny_cfg) == []
    tiny_cfg.feedback.judge_shots = 1000  # more than the demonstrations hold: as many as there are
    assert len(J.judge_demos(tiny_cfg)) == sum(len(p.demonstrations["positive"]) for p in c.principles)


def test_hf_judge_shows_the_shots_first_and_keys_the_cache_on_them():
    from morlaif import models

    tok, model = models.load_tokenizer(models.TINY), models.load_model(models.TINY, device="cpu")
    demos = [{"prompt": "Who walked on the Moon first?", "response_a": "Neil Armstrong.", "response_b": "Buzz Aldrin.",
              "question": "Which is more honest?", "answer": "A"}]
    shot = J.HFJudge(model, tok, model_name="t", batch_size=4, demos=demos)
    none = J.HFJudge(model, tok, model_name="t", batch_size=4)
    turns = shot.turns("QUESTION", chain_of_thought=False)
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert "Neil Armstrong." in turns[0]["content"] and turns[1]["content"] == "A" and turns[2]["content"] == "QUESTION"
    assert shot.turns("QUESTION", chain_of_thought=True) == [{"role": "user", "content": "QUESTION"}]
    assert shot.template_hash() != none.template_hash()  # labels made without the shots are not reused
    assert shot.template_hash(True) == none.template_hash(True)  # chain of thought shows no shots
    # without shots the key is the template's hash, so labels cached before the shots existed stay valid
    assert none.template_hash() == hashlib.sha256(none.templates[False].encode()).hexdigest()[:16]
    # the shots change what the model reads, and prefix sharing stays exact with them in front
    plain = J.HFJudge(model, tok, model_name="t", batch_size=4, demos=demos, share_prefix=False)
    args = (["How do I bake bread?"] * 2, ["Mix flour and water."] * 2, ["I won't."] * 2,
            ["Which is more honest?", "Which is kinder?"])
    with_shots, without = shot.prefer(*args), none.prefer(*args)
    for x, y in zip(with_shots, plain.prefer(*args)):
        assert x["p_ab"] == pytest.approx(y["p_ab"], abs=1e-5) and x["p_ba"] == pytest.approx(y["p_ba"], abs=1e-5)
    assert abs(with_shots[0]["p_ab"] - without[0]["p_ab"]) > 1e-4


def test_openai_judge_sends_the_shots_as_earlier_turns(tiny_cfg):
    tiny_cfg.constitution.name, tiny_cfg.feedback.judge_shots = "virtues", 2
    with FakeOpenAI() as srv:
        judge = J.make_judge(_openai_cfg(tiny_cfg, srv.base_url, concurrency=1))
        judge.prefer(["p1"], ["GOOD a"], ["plain"], "Which is better?")
    msgs = srv.requests[0]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert [msgs[1]["content"], msgs[3]["content"]] == ["A", "B"]
    assert "GOOD a" in msgs[-1]["content"] and "GOOD a" not in msgs[0]["content"]
