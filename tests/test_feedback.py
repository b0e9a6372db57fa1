import json

import pytest
from fake_openai import FakeOpenAI

from morlaif import feedback
from morlaif import judge as judge_mod
from morlaif.artifacts import read_json, read_jsonl
from morlaif.constitution import load_constitution
from morlaif.errors import InputError


def _small(cfg, strategy, objectives):
    cfg.feedback.strategy = strategy
    cfg.feedback.n_prompts = 4
    cfg.feedback.max_new_tokens = 6
    cfg.feedback.followup_max_new_tokens = 4
    cfg.feedback.cot_max_new_tokens = 4
    cfg.feedback.batch_size = 16
    cfg.constitution.objectives = objectives
    return cfg


def test_feedback_judge_smoke(tiny_cfg, prompts_run):
    cfg = _small(tiny_cfg, "judge", ["honesty", "prudence:motivation"])
    out = feedback.run(cfg, prompts_run)
    pairs = read_jsonl(out / "pairs.jsonl", required=("pair_id", "prompt", "kind", "response_a", "response_b"))
    labels = read_jsonl(out / "labels.jsonl", required=("pair_id", "prompt", "response_a", "response_b", "objective",
                                                        "p_a", "p_ab", "p_ba", "raw", "strategy"))
    assert 1 <= len(pairs) <= 4 and all(p["response_a"].strip() != p["response_b"].strip() for p in pairs)
    assert all(len(p["followups"]["motivation"]) == 2 for p in pairs)
    assert len(labels) == 3 * len(pairs)  # honesty, prudence:motivation, holistic
    assert {lab["objective"] for lab in labels} == {"honesty", "prudence:motivation", "holistic"}
    for lab in labels:
        assert lab["p_a"] == pytest.approx((lab["p_ab"] + 1 - lab["p_ba"]) / 2)
        assert lab["strategy"] == "judge"
    mot = [lab for lab in labels if lab["objective"] == "prudence:motivation"]
    assert all(lab["followup_a"] is not None and "motivation" in lab["followup_question"] for lab in mot)
    m = read_json(out / "metrics.json")
    assert m["labels"] == len(labels) and m["strategy"] == "judge"
    assert set(m["position_consistency"]) == {"honesty", "prudence:motivation", "holistic"}
    assert 0.0 <= m["calibration_agreement"] <= 1.0 and m["calibration"]["n"] == 72
    assert 0.0 <= m["label_entropy"] <= 1.0 and m["labels_per_s"] > 0
    assert m["policy_note"] and "missing" in m["policy_note"]  # no SFT model in this run dir
    man = read_json(out / "manifest.json")
    assert man["status"] == "complete"
    # a second call is skipped (manifest matches)
    feedback.run(cfg, prompts_run)
    assert read_json(out / "manifest.json")["started"] == man["started"]


def test_feedback_contrastive_smoke(tiny_cfg, prompts_run):
    cfg = _small(tiny_cfg, "contrastive", ["honesty"])
    out = feedback.run(cfg, prompts_run)
    pairs = read_jsonl(out / "pairs.jsonl")
    labels = read_jsonl(out / "labels.jsonl")
    assert {p["objective"] for p in pairs} <= {"honesty", "holistic"} and len(labels) == len(pairs)
    for lab, p in zip(labels, pairs):
        assert lab["p_a"] == (1.0 if p["a_side"] == "positive" else 0.0)
        assert lab["strategy"] == "contrastive" and p["context"] == "demonstrations"
    m = read_json(out / "metrics.json")
    assert m["strategy"] == "contrastive" and m["position_consistency"] == {}
    assert set(m["contrast"]["harmful"]) == {"n", "refusal_positive", "refusal_negative"}
    assert m["label_entropy"] == 0.0 and 0.0 <= m["calibration_agreement"] <= 1.0


def test_contrast_context_demonstrations_and_fallback():
    con = load_constitution("virtues")
    hon = con.principle("honesty")
    system, hist = feedback.contrast_context(hon, "negative", con.principles, max_demos=4)
    assert system is None and len(hist) == 2 * len(hon.demonstrations["negative"])
    assert hist[1]["content"] == hon.demonstrations["negative"][0]["response"]
    system, hist = feedback.contrast_context(con.holistic(), "positive", con.principles, max_demos=4)
    # round-robin: one demonstration from each of the first four principles
    assert [hist[2 * i + 1]["content"] for i in range(4)] == [p.demonstrations["positive"][0]["response"]
                                                              for p in con.principles[:4]]
    bare = type(hon)(name="x", description="be kind", critique="c", revision="r", comparison="q")
    system, hist = feedback.contrast_context(bare, "positive", con.principles, max_demos=4)
    assert hist == [] and "be kind" in system


def test_feedback_resumes_without_repeating_labels(tiny_cfg, prompts_run, monkeypatch):
    cfg = _small(tiny_cfg, "judge", ["honesty"])
    cfg.feedback.calibrate = False  # keeps the test short; calibration goes through the same cache
    cfg.feedback.label_chunk = 4
    judged: list[int] = []
    sampled: list[int] = []
    real_make, real_sample = judge_mod.make_judge, feedback._sample
    fail_after = {"n": 1}

    class Counting:
        def __init__(self, inner):
            self.inner, self.model_name = inner, inner.model_name
            self.template_hash = inner.template_hash

        def prefer(self, prompts, a, b, q, chain_of_thought=False):
            if fail_after["n"] is not None and len(judged) >= fail_after["n"]:
                raise KeyboardInterrupt("simulated crash")
            judged.append(len(prompts))
            return self.inner.prefer(prompts, a, b, q, chain_of_thought=chain_of_thought)

    monkeypatch.setattr(judge_mod, "make_judge", lambda c: Counting(real_make(c)))
    monkeypatch.setattr(feedback, "_sample", lambda *a, **k: sampled.append(len(a[3])) or real_sample(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        feedback.run(cfg, prompts_run)
    out = prompts_run / "feedback"
    assert read_json(out / "manifest.json")["status"] == "failed"
    first_judged, first_sampled = sum(judged), sum(sampled)
    assert first_judged == 4 and first_sampled == 8  # 4 prompts x 2 samples, then one label chunk
    fail_after["n"] = None
    feedback.run(cfg, prompts_run)
    labels = read_jsonl(out / "labels.jsonl")
    assert sum(sampled) == first_sampled  # the pairs came from the shard, not resampled
    # every label judged exactly once across the two runs
    assert len(labels) > 4 and sum(judged) == len(labels)
    assert read_json(out / "metrics.json")["calibration_agreement"] is None
    assert read_json(out / "manifest.json")["status"] == "complete"


def test_label_file_openai_fake_server_and_cache(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MORLAIF_CACHE_TEST_KEY", "sk-never-written-42")
    monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "response_a": "GOOD hello", "response_b": "go away", "id": 7}) + "\n"
                     + json.dumps({"prompt": "Yo", "response_a": "meh", "response_b": "GOOD yo"}) + "\n")
    out = tmp_path / "out.jsonl"
    with FakeOpenAI(faults=["429"]) as srv:
        cfg = tiny_cfg
        cfg.feedback.backend = "openai"
        o = cfg.feedback.openai
        o.base_url, o.backoff_base, o.api_key_env = srv.base_url, 0.01, "MORLAIF_CACHE_TEST_KEY"
        n = feedback.label_file(cfg, pairs, out, objectives=["honesty", "holistic"])
        assert n == 4 and len(srv.requests) == 4 * 2 + 1  # both orders, plus one 429 retried
        rows = read_jsonl(out, required=("prompt", "response_a", "response_b", "objective", "p_a"))
        assert [r["objective"] for r in rows] == ["honesty", "holistic", "honesty", "holistic"]
        assert rows[0]["id"] == 7 and rows[0]["p_a"] > 0.85 and rows[2]["p_a"] < 0.15
        from morlaif.cli import main

        assert main(["feedback", "--pairs", str(pairs), "--out", str(tmp_path / "o2.jsonl"), "--objectives", "honesty",
                     "--set", "feedback.backend=openai", "--set", f"feedback.openai.base_url={srv.base_url}"]) == 0
        assert len(srv.requests) == 9  # all from the cache: no label paid for twice
    for f in [out, tmp_path / "o2.jsonl", *(tmp_path / "cache").rglob("*.jsonl")]:
        assert "sk-never-written-42" not in f.read_text()


def test_label_file_over_two_servers_equals_one(tiny_cfg, tmp_path, monkeypatch):
    """base_url as a list: both fake servers get requests, the labels equal the single-server ones."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}", "response_a": "GOOD yes" if i % 3 else "meh",
                                         "response_b": "no" if i % 2 else "GOOD no"}) + "\n" for i in range(6)))
    cfg = tiny_cfg
    cfg.feedback.backend = "openai"
    cfg.feedback.openai.concurrency = 4
    with FakeOpenAI() as one, FakeOpenAI() as a, FakeOpenAI() as b:
        monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "c1"))
        cfg.feedback.openai.base_url = one.base_url
        feedback.label_file(cfg, pairs, tmp_path / "one.jsonl", objectives=["honesty", "prudence"])
        monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "c2"))
        cfg.feedback.openai.base_url = [a.base_url, b.base_url]
        feedback.label_file(cfg, pairs, tmp_path / "two.jsonl", objectives=["honesty", "prudence"])
    assert len(one.requests) == 24 and len(a.requests) + len(b.requests) == 24
    assert len(a.requests) >= 6 and len(b.requests) >= 6  # spread, not all on the first server
    assert read_jsonl(tmp_path / "two.jsonl") == read_jsonl(tmp_path / "one.jsonl")


def test_openai_base_url_list_validated(tiny_cfg):
    from morlaif.config import load_config

    assert load_config(None, ["feedback.openai.base_url=[http://a/v1, http://b/v1]"]).feedback.openai.base_urls == [
        "http://a/v1", "http://b/v1"]
    assert load_config(None, []).feedback.openai.base_urls == ["http://127.0.0.1:8000/v1"]  # one URL: as before
    for bad, msg in (("[]", "at least one"), ("[http://a, 3]", "a URL or a list"), ("[http://a, http://a]", "twice"),
                     ("localhost:8000", "not an http")):
        with pytest.raises(InputError, match=f"feedback.openai.base_url.*{msg}"):
            load_config(None, [f"feedback.openai.base_url={bad}"])


def test_label_file_rejects_bad_input(tiny_cfg, tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "response_a": "a", "response_b": "b"}) + "\n{bad\n")
    with pytest.raises(InputError, match="p.jsonl:2"):
        feedback.label_file(tiny_cfg, pairs, tmp_path / "o.jsonl")
    pairs.write_text(json.dumps({"prompt": "Hi", "response_a": "a", "response_b": "b"}) + "\n")
    with pytest.raises(InputError, match="followups"):
        feedback.label_file(tiny_cfg, pairs, tmp_path / "o.jsonl", objectives=["honesty:motivation"])
    with pytest.raises(InputError, match="strategy"):
        feedback.label_file(tiny_cfg, pairs, tmp_path / "o.jsonl", strategy="contrastive")
    with pytest.raises(InputError, match="not in constitution"):
        feedback.label_file(tiny_cfg, pairs, tmp_path / "o.jsonl", objectives=["nonsense"])
