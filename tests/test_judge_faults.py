"""The `openai` judge against a fault-injecting endpoint (tests/fake_openai.py).

Transient faults: retried with backoff, then the same answer as a clean server. Persistent faults: a
JudgeError after max_retries + 1 attempts, within a time bound, and nothing becomes a label. Every call
runs under a deadline of its own, so a request loop that never stops fails the test instead of hanging it.
"""

import concurrent.futures
import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_openai import RETRYABLE, FakeOpenAI
from morlaif import feedback
from morlaif import judge as J
from morlaif.artifacts import read_jsonl

KEY = "sk-fault-test-0123456789abcdef"
TIMEOUT = 1.0  # client seconds per attempt; "slow" (3 s) and "trickle" (~30 s) take longer than this
PAIR = (["Say hi"], ["GOOD hello"], ["go away"], "Which is kinder?")
CLEAN = 0.9  # p_a of PAIR from a clean server: (0.9 + 1 - 0.1) / 2


def _cfg(tiny_cfg, url, **kw):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.feedback.backend = "openai"
    o = cfg.feedback.openai
    o.base_url, o.model, o.api_key_env = url, "fake", "MORLAIF_FAULT_KEY"
    o.timeout, o.max_retries, o.backoff_base, o.backoff_max, o.concurrency = TIMEOUT, 3, 0.01, 0.2, 1
    for k, v in kw.items():
        setattr(o, k, v)
    return cfg


def within(seconds, fn, *args, **kw):
    """fn(*args) under a deadline: the judge's loops must stop by themselves."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kw).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"still running after {seconds} s: the request loop did not stop by itself")
    finally:
        pool.shutdown(wait=False)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("MORLAIF_FAULT_KEY", KEY)


@pytest.mark.parametrize("fault", RETRYABLE)
def test_transient_fault_is_retried_then_answers_like_a_clean_server(tiny_cfg, fault):
    with FakeOpenAI(faults=[fault, fault]) as srv:
        judge = J.make_judge(_cfg(tiny_cfg, srv.base_url))
        t = time.perf_counter()
        res = within(30, judge.prefer, *PAIR)
        wall = time.perf_counter() - t
    # 2 faulty + 1 per order (+1 if a loaded machine stalls a clean reply past the timeout)
    assert srv.injected[fault] == 2 and 4 <= judge.requests <= 5
    assert res[0]["p_a"] == pytest.approx(CLEAN) and res[0]["consistent"]
    assert {res[0]["raw"][o]["source"] for o in ("ab", "ba")} == {"logprobs"}
    # bounded: two failed attempts cost at most 2 x (timeout + longest backoff)
    assert wall < 2 * (TIMEOUT + 0.2) + 5.0
    if fault in ("slow", "trickle"):
        assert wall >= 2 * TIMEOUT * 0.9  # the attempt was abandoned at the deadline, not earlier


@pytest.mark.parametrize("fault", RETRYABLE + ["400"])
def test_persistent_fault_fails_clearly_and_bounded(tiny_cfg, fault):
    with FakeOpenAI(always=fault) as srv:
        judge = J.make_judge(_cfg(tiny_cfg, srv.base_url, max_retries=2, concurrency=2))
        with pytest.raises(J.JudgeError) as e:
            within(30, judge.prefer, *PAIR)
    msg = str(e.value)
    assert "\n" not in msg and KEY not in msg
    if fault == "400":
        assert "HTTP 400" in msg and judge.requests <= 2  # not retryable: one attempt per order at most
    else:
        # max_retries + 1 attempts for the order that failed; the other order is cancelled with it
        assert "3 attempts" in msg and 3 <= judge.requests <= 2 * 3
    if fault == "echokey":
        assert "***" in msg  # the endpoint echoed the key; the message shows it masked


def test_missing_logprobs_is_a_valid_text_answer(tiny_cfg):
    with FakeOpenAI(always="nologprobs") as srv:
        res = within(30, J.make_judge(_cfg(tiny_cfg, srv.base_url)).prefer, *PAIR)
    assert res[0]["p_a"] == 1.0 and {res[0]["raw"][o]["source"] for o in ("ab", "ba")} == {"text"}


def test_retry_after_is_honoured_and_capped(tiny_cfg):
    with FakeOpenAI(faults=["429", "429"], retry_after=0.4) as srv:
        judge = J.make_judge(_cfg(tiny_cfg, srv.base_url, backoff_max=5.0))
        t = time.perf_counter()
        within(30, judge.prefer, *PAIR)
        assert time.perf_counter() - t >= 0.8  # waited Retry-After twice, not the 0.01 s backoff
    with FakeOpenAI(faults=["429"], retry_after=3600) as srv:
        judge = J.make_judge(_cfg(tiny_cfg, srv.base_url, backoff_max=0.3))
        t = time.perf_counter()
        within(30, judge.prefer, *PAIR)
        assert time.perf_counter() - t < 5.0  # an hour-long Retry-After is capped by backoff_max


def test_backoff_grows_exponentially_and_is_capped(tiny_cfg):
    judge = J.make_judge(_cfg(tiny_cfg, "http://127.0.0.1:9/v1", backoff_base=0.1, backoff_max=1.0))
    for attempt, nominal in enumerate([0.1, 0.2, 0.4, 0.8]):
        waits = [judge._backoff(attempt) for _ in range(200)]
        assert nominal * 0.5 <= min(waits) and max(waits) <= min(nominal * 1.5, 1.0)
    assert max(judge._backoff(10) for _ in range(50)) == pytest.approx(1.0)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["choices", "message", "content", "logprobs", "top_logprobs", "token", "logprob", "x"]),
                        c, max_size=4), max_leaves=20),
       st.booleans())
def test_parse_any_json_is_none_or_a_probability(body, cot):
    out = J.OpenAIJudge.parse(body, cot)
    assert out is None or (math.isfinite(out[0]) and 0.0 <= out[0] <= 1.0)


def test_garbage_logprobs_never_become_a_label():
    def body(content, top):
        return {"choices": [{"message": {"content": content},
                             "logprobs": {"content": [{"token": content, "top_logprobs": top}]}}]}

    for bad in (float("nan"), float("inf"), 3.0, "x", True, None):
        assert J.OpenAIJudge.parse(body("A", [{"token": "A", "logprob": bad},
                                              {"token": "B", "logprob": -1.0}]), False) is None
    assert J.OpenAIJudge.parse(body("C", [{"token": "C", "logprob": 0.0}]), False) is None
    assert J.OpenAIJudge.parse({"choices": [{"message": {"content": 7}}]}, False) is None
    ok = J.OpenAIJudge.parse(body("B", [{"token": "A", "logprob": math.log(0.2)},
                                        {"token": "B", "logprob": math.log(0.8)}]), False)
    assert ok[0] == pytest.approx(0.2)


def _pairs(path, n=8):
    rows = [{"prompt": f"Question {i}?", "response_a": ("GOOD " if i % 2 else "") + f"answer {i}",
             "response_b": ("" if i % 2 else "GOOD ") + f"reply {i}", "id": i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_label_file_through_transient_faults_equals_clean_run(tiny_cfg, tmp_path, monkeypatch, capsys):
    """End to end: every fault kind injected into label_file's requests; the labels equal a clean server's."""
    pairs = tmp_path / "pairs.jsonl"
    src = _pairs(pairs)
    objectives = ["honesty", "prudence", "holistic"]

    def label(srv, name):
        monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / f"cache-{name}"))  # no label served from another run
        cfg = _cfg(tiny_cfg, srv.base_url, concurrency=8, max_retries=4)
        cfg.feedback.label_chunk = 10
        out = tmp_path / f"{name}.jsonl"
        n = within(120, feedback.label_file, cfg, pairs, out, objectives=objectives)
        return n, read_jsonl(out), read_jsonl(next((tmp_path / f"cache-{name}" / "feedback").glob("*.jsonl")))

    with FakeOpenAI() as srv:
        n_clean, clean, _ = label(srv, "clean")
    assert n_clean == len(src) * len(objectives)
    table = {f: {"injected": 0, "runs": 0, "survived": 0, "rows_lost": 0, "rows_duplicated": 0} for f in RETRYABLE}
    for seed in range(3):
        # up to 2 faults per request, 4 retries: slack for a clean reply stalled past the timeout by load
        with FakeOpenAI(flaky=(RETRYABLE, 2), seed=seed) as srv:
            n, rows, cache = label(srv, f"flaky{seed}")
        key = lambda r: (r["id"], r["objective"])  # noqa: E731
        got = [key(r) for r in rows]
        lost = len({key(r) for r in clean} - set(got))
        dup = len(got) - len(set(got))
        assert n == n_clean and lost == 0 and dup == 0
        assert len(cache) == len({c["key"] for c in cache}) == n_clean  # each label judged and cached once
        for a, b in zip(rows, clean):  # same rows, same order, same numbers
            assert {k: v for k, v in a.items() if k != "p_a"} == {k: v for k, v in b.items() if k != "p_a"}
            assert a["p_a"] == pytest.approx(b["p_a"], abs=1e-12)
        assert sum(srv.injected.values()) > 20, srv.injected
        for f, c in srv.injected.items():
            t = table[f]
            t["injected"] += c
            t["runs"] += 1
            t["survived"] += 1
            t["rows_lost"] += lost
            t["rows_duplicated"] += dup
    assert all(t["injected"] > 0 for t in table.values()), table  # every kind was exercised
    with capsys.disabled():
        print(f"\nopenai judge, label_file ({n_clean} labels/run, 3 runs, max_retries 4): transient faults")
        print(f"{'fault':12s} {'injected':>8s} {'runs':>5s} {'survived':>8s} {'rows lost':>9s} {'duplicated':>10s}")
        for f, t in table.items():
            print(f"{f:12s} {t['injected']:8d} {t['runs']:5d} {t['survived']:8d} {t['rows_lost']:9d} "
                  f"{t['rows_duplicated']:10d}")


def test_label_file_persistent_failure_writes_no_output_and_keeps_progress(tiny_cfg, tmp_path, monkeypatch):
    """A dead endpoint mid-file: JudgeError, no output file, the labels judged before it are kept (cache)."""
    monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    _pairs(pairs)
    # 8 pairs x 1 objective, chunks of 2 labels (4 requests): 8 answers, then the endpoint only says "Maybe?"
    with FakeOpenAI(faults=[None] * 8, always="garbage") as srv:
        port = srv._server.server_address[1]  # the label cache is per endpoint: come back on the same one
        cfg = _cfg(tiny_cfg, srv.base_url, max_retries=1)
        cfg.feedback.label_chunk = 2
        with pytest.raises(J.JudgeError, match="no valid answer"):
            within(60, feedback.label_file, cfg, pairs, tmp_path / "out.jsonl", objectives=["honesty"])
    assert not (tmp_path / "out.jsonl").exists()
    cache = read_jsonl(next((tmp_path / "cache" / "feedback").glob("*.jsonl")))
    assert len(cache) == 4 and all(0.0 <= c["p_a"] <= 1.0 for c in cache)
    # the endpoint is back: only the 4 missing labels are requested
    with FakeOpenAI(port=port) as srv:
        cfg = _cfg(tiny_cfg, srv.base_url)
        cfg.feedback.label_chunk = 2
        n = within(60, feedback.label_file, cfg, pairs, tmp_path / "out.jsonl", objectives=["honesty"])
    assert n == 8 and len(srv.requests) == 4 * 2
