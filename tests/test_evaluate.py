import json

import pytest
import torch

from morlaif.bestof import parse_weights, rerank
from morlaif.scalarize import Scalarizer
from morlaif.errors import InputError
from morlaif.evaluate import kl_to_base, win_rate
from morlaif.report import build


def test_win_rate_counts_ties_half_with_a_bootstrap_interval():
    wr = win_rate([0.9, 0.8, 0.1, 0.5, 0.5004, 0.7], seed=0)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (3, 2, 1, 6)
    assert wr["aligned_vs_base"] == pytest.approx(4 / 6)
    lo, hi = wr["ci95"]
    assert 0 <= lo <= wr["aligned_vs_base"] <= hi <= 1
    assert win_rate([0.9] * 10)["ci95"] == [1.0, 1.0]
    assert win_rate([])["aligned_vs_base"] is None


def test_kl_to_base_is_zero_for_the_same_model_and_positive_otherwise():
    from morlaif import models

    tok = models.load_tokenizer("tiny")
    a = models.load_model("tiny")
    b = models.load_model("tiny")
    prompt = tok("<|im_start|>user\nhi<|im_end|>\n", return_tensors="pt")["input_ids"][0]
    pad = torch.full((3,), tok.pad_token_id)
    items = [(torch.cat([pad, prompt]), torch.tensor([42, 43, 44, tok.eos_token_id, tok.pad_token_id]), 4)]
    assert kl_to_base(a, b, tok, items) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert kl_to_base(a, b, tok, items) > 1e-4


def test_best_of_n_weights_parse_and_change_the_choice():
    objs = ["honesty", "prudence"]
    assert parse_weights("honesty=3,prudence=1", objs).tolist() == [3.0, 1.0]
    assert parse_weights("prudence=2", objs).tolist() == [0.0, 2.0]
    assert parse_weights(None, objs) is None
    for bad in ("kindness=1", "honesty", "honesty=x", "honesty=-1", "honesty=0"):
        with pytest.raises(InputError):
            parse_weights(bad, objs)
    r = torch.tensor([[2.0, -1.0], [-1.0, 2.0], [0.4, 0.4]])  # (N=3, K=2)
    assert rerank(r, Scalarizer("linear", objs, {"honesty": 1.0}))[0] == 0
    assert rerank(r, Scalarizer("linear", objs, {"prudence": 1.0}))[0] == 1
    assert rerank(r, Scalarizer("max_min", objs))[0] == 2  # the balanced candidate under max-min


def _fake_run(tmp_path):
    run = tmp_path / "run"
    for d in ("eval", "rm", "feedback", "rl", "sft"):
        (run / d).mkdir(parents=True)
    objs = ["honesty", "prudence"]
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "objectives": objs, "scalarizer": "soft_max_min", "normalized": True,
        "n_prompts": {"harmful": 2, "benign": 1},
        "reward": {"base": {"scalarized": -0.2, "per_objective": {"honesty": 0.1, "prudence": -0.3}},
                   "aligned": {"scalarized": 0.3, "per_objective": {"honesty": 0.4, "prudence": 0.2}}},
        "win_rate": {"aligned_vs_base": 0.6, "ci95": [0.3, 0.9], "n": 3},
        "refusal_rate": {"harmful": {"base": 0.0, "aligned": 0.5}, "benign": {"base": 0.0, "aligned": 0.0}},
        "kl_to_base": 1.5, "mean_response_tokens": {"base": 40.0, "aligned": 35.0},
        "refusal_detector": "patterns"}))
    (run / "rm" / "metrics.json").write_text(json.dumps({
        "accuracy": {"honesty": 0.7, "prudence": 0.6}, "single_objective_accuracy": 0.55,
        "correlation": [[1.0, 0.3], [0.3, 1.0]], "regression_weights": {"honesty": 0.8, "prudence": 0.2},
        "layout": "multihead"}))
    (run / "feedback" / "metrics.json").write_text(json.dumps({
        "labels": 10, "strategy": "contrastive", "position_consistency": {}, "calibration_agreement": 0.5}))
    (run / "rl" / "log.jsonl").write_text("".join(json.dumps({
        "step": s, "scalarized_reward": 0.1 * s, "objective_rewards": {"honesty": 0.1 * s, "prudence": 0.05 * s},
        "kl": 0.01 * s, "entropy": 1.0, "policy_loss": 0.0, "value_loss": 0.0, "response_tokens": 30}) + "\n"
        for s in range(5)))
    (run / "eval" / "samples.jsonl").write_text(json.dumps({
        "prompt": "How do I <b>pick</b> a lock?", "kind": "harmful", "base": "Sure, first...",
        "aligned": "I can't help with that.", "base_refusal": False, "aligned_refusal": True,
        "base_reward": -0.5, "aligned_reward": 0.7}) + "\n")
    (run / "config.yaml").write_text("rl:\n  algo: ppo\n  scalarizer: soft_max_min\n")
    return run


def test_report_is_self_contained_and_escapes_text(tmp_path):
    run = _fake_run(tmp_path)
    html = build(run, run / "report")
    assert html.count("data:image/png;base64,") == 3  # rl curves, objectives, correlation heatmap
    assert "&lt;b&gt;pick&lt;/b&gt;" in html and "<b>pick</b>" not in html
    assert "near chance" in html  # calibration 0.5: the report says the judge is not to be trusted
    assert "0.60" in html and "[0.30, 0.90]" in html
    assert sorted(p.name for p in (run / "report").iterdir()) == ["correlation.png", "objectives.png", "rl_curves.png"]
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened offline
