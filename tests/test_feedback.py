import json

import pytest
from fake_openai import FakeOpenAI

from morlaif import distributed_ray, feedback
from morlaif import judge as judge_mod
from morlaif.artifacts import read_json, read_jsonl
from morlaif.constitution import load_constitution
from morlaif.errors import InputError
from morlaif.refusal import is_refusal


def _small(cfg, strategy, objectives, pairs="policy_samples"):
    cfg.feedback.strategy = strategy
    cfg.feedback.pairs = pairs  # policy_samples needs no SFT stage in the run
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
        # the side each order names, and consistency = both orders name the same side
        assert lab["winner_ab"] == ("a" if lab["p_ab"] > 0.5 else "b")
        assert lab["winner_ba"] == ("b" if lab["p_ba"] > 0.5 else "a")
        assert lab["consistent"] == (lab["winner_ab"] == lab["winner_ba"])
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


def test_feedback_policy_vs_target_pairs(tiny_cfg, prompts_run):
    """One policy sample against the SL target of the same prompt, the target's side drawn per pair;
    metrics say how often the judge preferred the target, per prompt kind."""
    from morlaif.artifacts import write_jsonl
    from morlaif.promptsets import train_prompts

    rows = train_prompts(prompts_run)[:6]
    targets = {r["prompt"]: f"Target answer {i}: I can't help with that." for i, r in enumerate(rows)}
    write_jsonl(prompts_run / "sft" / "data.jsonl", [{"prompt": r["prompt"], "kind": r["kind"],
                                                      "revision": targets[r["prompt"]]} for r in rows])
    cfg = _small(tiny_cfg, "judge", ["honesty"], pairs="policy_vs_target")
    out = feedback.run(cfg, prompts_run)
    pairs = read_jsonl(out / "pairs.jsonl")
    assert len(pairs) == 6 and all(p["prompt"] in targets for p in pairs)  # every SFT row (only they have targets)
    for p in pairs:
        t = p["sources"].index("target")
        assert sorted(p["sources"]) == ["policy", "target"]
        assert [p["response_a"], p["response_b"]][t] == targets[p["prompt"]]
    assert {p["sources"][0] for p in pairs} == {"target", "policy"}  # both orders occur (seeded)
    labels = read_jsonl(out / "labels.jsonl")
    m = read_json(out / "metrics.json")
    for kind in ("harmful", "benign"):
        got = m["target_preferred"][kind]
        for obj, v in got.items():
            want = [lab["p_a"] if next(p for p in pairs if p["pair_id"] == lab["pair_id"])["sources"][0] == "target"
                    else 1 - lab["p_a"] for lab in labels if lab["kind"] == kind and lab["objective"] == obj]
            assert v == pytest.approx(sum(want) / len(want))
            wins = [float(w > 0.5) for w in want]
            assert m["target_wins"][kind][obj] == pytest.approx(sum(wins) / len(wins))
    assert m["decisive_share"] == pytest.approx(sum(abs(lab["p_a"] - 0.5) > 0.2 for lab in labels) / len(labels))
    assert m["mean_margin"] == pytest.approx(sum(abs(lab["p_a"] - 0.5) for lab in labels) / len(labels))
    assert m["pairs_kind"] == "policy_vs_target"
    # the SFT targets are an input of the stage: changing them is a change of input
    man = read_json(out / "manifest.json")
    assert "data.jsonl" in " ".join(man["inputs"])


def test_feedback_base_vs_target_pairs_sample_the_base_policy(tiny_cfg, prompts_run):
    """base_vs_target: the sampled side comes from model.policy even where an SFT policy exists."""
    from morlaif import models
    from morlaif.artifacts import write_jsonl
    from morlaif.promptsets import train_prompts

    rows = train_prompts(prompts_run)[:4]
    write_jsonl(prompts_run / "sft" / "data.jsonl", [{"prompt": r["prompt"], "kind": r["kind"],
                                                      "revision": f"Target {i}."} for i, r in enumerate(rows)])
    sft_dir = prompts_run / "sft" / "model"  # a stand-in SFT policy: it must not be the one sampled
    model, tok = models.load_model(tiny_cfg.model.policy, device="cpu"), models.load_tokenizer(tiny_cfg.model.policy)
    models.save_model(model, tok, sft_dir)
    cfg = _small(tiny_cfg, "judge", ["honesty"], pairs="base_vs_target")
    out = feedback.run(cfg, prompts_run)
    pairs = read_jsonl(out / "pairs.jsonl")
    assert pairs and all(sorted(p["sources"]) == ["base", "target"] for p in pairs)
    m = read_json(out / "metrics.json")
    assert m["policy"] == cfg.model.policy and m["policy_note"] is None and m["pairs_kind"] == "base_vs_target"
    assert set(m["target_wins"]) == {"harmful", "benign"}
    # the SFT weights are not an input of these labels (a new SFT model leaves them valid); the targets are
    inputs = read_json(out / "manifest.json")["inputs"]
    assert "sft/data.jsonl" in inputs and not any(k.startswith("sft/model") for k in inputs)
    cfg.feedback.pairs = "policy_vs_target"  # the SFT policy samples: its weights are an input
    ins = feedback.stage_inputs(cfg, prompts_run)
    assert any(p.relative_to(prompts_run).parts[:2] == ("sft", "model") for p in ins)


def test_feedback_policy_vs_base_pairs_sample_the_feedback_prompts(tiny_cfg, prompts_run):
    """The default pairs: on the feedback stage's own prompts (none of the SL stage's), an SFT-policy sample
    against a base-policy sample; metrics say per kind how often each side refuses and the judge is consistent."""
    from morlaif import models
    from morlaif.promptsets import train_prompts

    sft_dir = prompts_run / "sft" / "model"  # a stand-in SFT policy: a full model (the base loads beside it)
    model, tok = models.load_model(tiny_cfg.model.policy, device="cpu"), models.load_tokenizer(tiny_cfg.model.policy)
    models.save_model(model, tok, sft_dir)
    cfg = _small(tiny_cfg, "judge", ["honesty"], pairs="policy_vs_base")
    out = feedback.run(cfg, prompts_run)
    pairs = read_jsonl(out / "pairs.jsonl")
    mine = {r["prompt"] for r in train_prompts(prompts_run, stage="feedback")}
    assert pairs and all(p["prompt"] in mine for p in pairs)
    assert not mine & {r["prompt"] for r in train_prompts(prompts_run, stage="sft")}
    assert all(sorted(p["sources"]) == ["base", "policy"] for p in pairs)
    m = read_json(out / "metrics.json")
    assert m["pairs_kind"] == "policy_vs_base" and m["policy"] == str(sft_dir)
    labels = read_jsonl(out / "labels.jsonl")
    for kind, rep in m["pairs_by_kind"].items():
        ps = [p for p in pairs if p["kind"] == kind]
        assert rep["pairs"] == len(ps)
        base = [is_refusal(p["response_a"] if p["sources"][0] == "base" else p["response_b"]) for p in ps]
        assert rep["refusal_by_source"]["base"] == pytest.approx(sum(base) / len(base))
        labs = [lab for lab in labels if lab["kind"] == kind and lab["objective"] == "honesty"
                and lab["strategy"] == "judge"]  # one-refusal pairs take the feedback model's decision
        assert rep["consistent"]["honesty"] == pytest.approx(sum(lab["consistent"] for lab in labs) / len(labs))
    assert m["consistent_share"] == pytest.approx(sum(bool(lab["consistent"]) for lab in labels) / len(labels))
    # the SFT policy samples, so its weights are an input
    assert any(k.startswith("sft/model") for k in read_json(out / "manifest.json")["inputs"])


def test_feedback_policy_vs_refusal_pairs_labelled_by_the_teachers_decisions(tiny_cfg, prompts_run, monkeypatch):
    """The default pairs and labels: every SFT-policy sample faces the other side of refusing (its own answer
    begun with feedback.refusal_opening, or a base sample where it refuses); a pair where exactly one side
    refuses takes the feedback model's own decision on the prompt, for every action objective; the rest the judge."""
    from morlaif import models
    from morlaif.promptsets import train_prompts

    sft_dir = prompts_run / "sft" / "model"  # a stand-in SFT policy: a full model (the base loads beside it)
    model, tok = models.load_model(tiny_cfg.model.policy, device="cpu"), models.load_tokenizer(tiny_cfg.model.policy)
    models.save_model(model, tok, sft_dir)
    asked = []

    def answer(self, prompts, max_new_tokens):  # a feedback model that refuses the prompts of even length
        asked.append((list(prompts), max_new_tokens))
        return ["I'm sorry, but I can't help with that." if len(p) % 2 == 0 else "Sure: step one." for p in prompts]

    monkeypatch.setattr(judge_mod.HFJudge, "answer", answer)
    cfg = _small(tiny_cfg, "judge", ["honesty", "prudence:motivation"], pairs="policy_vs_refusal")
    cfg.feedback.decision_tokens = 5
    assert cfg.feedback.refusal_labels == "teacher"  # the default
    out = feedback.run(cfg, prompts_run)
    pairs = read_jsonl(out / "pairs.jsonl")
    assert {p["prompt"] for p in pairs} <= {r["prompt"] for r in train_prompts(prompts_run, stage="feedback")}
    opening = cfg.feedback.refusal_opening
    for p in pairs:
        i = 1 - p["sources"].index("policy")
        mine, other = [p["response_a"], p["response_b"]][1 - i], [p["response_a"], p["response_b"]][i]
        assert p["sources"][i] in ("refusal", "base")
        if p["sources"][i] == "refusal":  # the policy's answer did not refuse: its own words after the opening
            assert other.startswith(opening) and is_refusal(other) and not is_refusal(mine)
        else:
            assert is_refusal(mine)
    assert any(p["sources"][1 - p["sources"].index("policy")] == "refusal" for p in pairs)
    decided = [p for p in pairs if is_refusal(p["response_a"]) != is_refusal(p["response_b"])]
    assert decided
    # the feedback model was asked once: the distinct prompts of the one-refusal pairs, then every rl prompt
    # (the refusal rule's, rl.refusal_reward)
    rl_rows = train_prompts(prompts_run, stage="rl")
    assert asked == [(list(dict.fromkeys(p["prompt"] for p in decided)) + [r["prompt"] for r in rl_rows], 5)]
    rows = read_jsonl(out / "decisions.jsonl")
    assert [r["split"] for r in rows] == ["feedback"] * (len(rows) - len(rl_rows)) + ["rl"] * len(rl_rows)
    dec = {d["prompt"]: d for d in rows if d["split"] == "feedback"}
    assert {k: d["refuses"] for k, d in dec.items()} == {p["prompt"]: len(p["prompt"]) % 2 == 0 for p in decided}
    assert all(d["refuses"] == (len(d["prompt"]) % 2 == 0) for d in rows)
    labels = read_jsonl(out / "labels.jsonl")
    by = {(lab["pair_id"], lab["objective"]): lab for lab in labels}
    for p in pairs:
        for obj in ("honesty", "holistic"):
            lab = by[(p["pair_id"], obj)]
            if p in decided:
                refusal_wins = len(p["prompt"]) % 2 == 0
                assert lab["p_a"] == (1.0 if is_refusal(p["response_a"]) == refusal_wins else 0.0)
                assert lab["strategy"] == "teacher_decision" and lab["consistent"] is True
                assert lab["p_ab"] is None and lab["winner_ab"] is None
            else:
                assert lab["strategy"] == "judge"
        # an aspect objective judges the follow-up answers: always the judge's letters
        assert by[(p["pair_id"], "prudence:motivation")]["strategy"] == "judge"
    m = read_json(out / "metrics.json")
    assert m["decisions"] == {"prompts": len(dec), "refuses": sum(d["refuses"] for d in dec.values()),
                              "labels": 2 * len(decided)}
    assert m["rl_decisions"] == {k: {"prompts": sum(r["kind"] == k for r in rl_rows),
                                     "refuses": sum(r["kind"] == k and len(r["prompt"]) % 2 == 0 for r in rl_rows)}
                                 for k in dict.fromkeys(r["kind"] for r in rl_rows)}
    for kind, rep in m["pairs_by_kind"].items():
        mine = [p for p in decided if p["kind"] == kind]
        assert rep["decided_pairs"] == len(mine)
        if mine:
            assert rep["decision_prefers_refusal"] == pytest.approx(
                sum(len(p["prompt"]) % 2 == 0 for p in mine) / len(mine))
    assert m["labels"] == len(labels) == 3 * len(pairs)


def test_pair_report_exact():
    pairs = [{"pair_id": "p0", "kind": "benign", "sources": ["policy", "base"],
              "response_a": "I'm sorry, but I can't help with that.", "response_b": "Boil the water, add salt."},
             {"pair_id": "p1", "kind": "benign", "sources": ["base", "policy"],
              "response_a": "Here is a recipe.", "response_b": "Sure: mix flour and eggs."}]
    labels = [{"pair_id": "p0", "kind": "benign", "objective": "honesty", "p_a": 0.3, "consistent": True},
              {"pair_id": "p1", "kind": "benign", "objective": "honesty", "p_a": 0.6, "consistent": False}]
    rep = feedback.pair_report(pairs, labels)["benign"]
    assert rep["refusal_by_source"] == {"base": 0.0, "policy": 0.5}
    assert rep["one_side_refuses"] == 0.5
    assert rep["consistent"] == {"honesty": 0.5} and rep["consistent_one_refuses"] == {"honesty": 1.0}
    assert rep["refusal_preferred_consistent"] == {"honesty": 0.0}  # p_a 0.3: the helpful side b wins


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
    cfg.feedback.refusal_labels = "judge"  # every label from the judge's cache (decisions are not cached)
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

        def answer(self, prompts, max_new_tokens):  # the rl prompts' decisions (rl.refusal_reward)
            return self.inner.answer(prompts, max_new_tokens)

    monkeypatch.setattr(distributed_ray, "make_judge", lambda c: Counting(real_make(c)))  # what stage_judge calls
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


class LongerWins:
    """A scripted judge: prefers the longer response with P = 0.8 in both orders (no position bias)."""

    model_name = "longer-wins"

    def template_hash(self, chain_of_thought=False):
        return "t"

    def prefer(self, prompts, a, b, questions, chain_of_thought=False):
        out = []
        for x, y in zip(a, b):
            p = 0.5 if len(x) == len(y) else (0.8 if len(x) > len(y) else 0.2)
            out.append({"p_a": p, "p_ab": p, "p_ba": 1 - p, "consistent": p != 0.5, "raw": {}})
        return out


def test_calibrate_exact_on_a_scripted_judge(tiny_cfg, tmp_path, capsys, monkeypatch):
    rows = [{"prompt": "q", "response_a": "long answer", "response_b": "no", "preferred": "a", "objective": "honesty"},
            {"prompt": "q", "response_a": "no", "response_b": "long answer", "preferred": "a"},
            {"prompt": "q", "response_a": "same", "response_b": "SAME", "preferred": "b", "objective": "honesty"},
            {"prompt": "q", "response_a": "x", "response_b": "yyyy", "preferred": "b", "objective": "harmless"}]
    res = feedback.calibrate(tiny_cfg, LongerWins(), rows, tmp_path / "cache.jsonl", log=lambda m: None)
    # the judge is the longer-response baseline: agreement 1, 0, tie (0.5), 1
    assert res["agreement"] == pytest.approx(2.5 / 4) == pytest.approx(res["longer_response_baseline"])
    assert res["shorter_response_baseline"] == pytest.approx(1.5 / 4)
    assert res["position_consistency"] == pytest.approx(3 / 4) and res["decisive_share"] == pytest.approx(3 / 4)
    assert res["by_objective"] == {"honesty": pytest.approx(0.75), "holistic": 0.0, "harmless": 1.0}
    # the CLI on a file: the table printed, the JSON written, labels cached per judge
    from morlaif.cli import main

    f = tmp_path / "labelled.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(feedback, "stage_judge", lambda cfg: LongerWins())
    assert main(["feedback", "--calibrate", str(f), "--out", str(tmp_path / "cal.json")]) == 0
    assert read_json(tmp_path / "cal.json")["agreement"] == pytest.approx(0.625)
    assert "agreement                    0.625" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "feedback").glob("*.jsonl"))) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "preferred": "c"}) + "\n")
    assert main(["feedback", "--calibrate", str(bad)]) == 2
    assert f"{bad}:1: key 'preferred'" in capsys.readouterr().err
    assert main(["feedback", "--calibrate", "no-such-set"]) == 2
