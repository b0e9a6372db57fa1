"""Preference models (stage rm): pure functions exact, and a synthetic separable task on the tiny model."""

import json
import math
import random

import pytest
import torch

from morlaif import bestof, preference, promptsets, reward, stats
from morlaif.artifacts import set_aside
from morlaif.errors import InputError
from morlaif.human import cv_accuracy, rl_weights

# --------------------------------------------------------------------------- pure functions


def test_bt_loss_exact_values():
    ra, rb = torch.tensor([0.0, 2.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    p = torch.tensor([0.5, 1.0, 0.25])
    per_row = [
        math.log(2.0),  # equal rewards: -log σ(0) whatever p
        -math.log(1 / (1 + math.exp(-2.0))),  # p = 1: -log σ(2)
        -(0.25 * math.log(1 / (1 + math.exp(2.0))) + 0.75 * math.log(1 / (1 + math.exp(-2.0)))),
    ]
    assert preference.bt_loss(ra, rb, p).item() == pytest.approx(sum(per_row) / 3, abs=1e-6)
    mask = torch.tensor([0.0, 1.0, 1.0])
    assert preference.bt_loss(ra, rb, p, mask).item() == pytest.approx((per_row[1] + per_row[2]) / 2, abs=1e-6)
    # Symmetry: swapping sides and p gives the same loss; huge margins stay finite.
    assert preference.bt_loss(rb, ra, 1 - p).item() == pytest.approx(sum(per_row) / 3, abs=1e-6)
    big = preference.bt_loss(torch.tensor([1e4]), torch.tensor([-1e4]), torch.tensor([0.0]))
    assert math.isfinite(big.item()) and big.item() == pytest.approx(2e4)


def test_bt_loss_gradient_is_sigmoid_minus_p():
    d = torch.tensor([0.7], requires_grad=True)
    preference.bt_loss(d, torch.zeros(1), torch.tensor([0.3])).backward()
    assert d.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(0.7)).item() - 0.3, abs=1e-6)


def test_pairwise_accuracy_excludes_ties_and_halves_equal_rewards():
    acc, n = stats.pairwise_accuracy([1.0, 0.0, 2.0, 5.0, 1.0], [0.0, 1.0, 2.0, 0.0, 0.0], [0.9, 0.8, 0.2, 0.5, 0.1])
    # rows: right, wrong, equal rewards (0.5), label tie (excluded), wrong
    assert n == 4 and acc == pytest.approx(1.5 / 4)
    assert stats.pairwise_accuracy([1.0], [0.0], [0.5]) == (None, 0)


def test_correlation_exact():
    s = torch.tensor([[1.0, 2.0, 5.0], [2.0, 4.0, 5.0], [3.0, 0.0, 5.0]])
    c = stats.correlation(s)
    assert c[0][0] == pytest.approx(1.0) and c[0][1] == pytest.approx(-0.5) and c[1][0] == pytest.approx(-0.5)
    assert c[2][2] is None and c[0][2] is None  # a constant column has no correlation


def test_logistic_regression_exact():
    # One feature, x = ±1, soft targets 0.75/0.25, no L2: σ(w) = 0.75 -> w = log 3.
    w = stats.logistic_regression([[1.0], [-1.0]], [0.75, 0.25], l2=0.0)
    assert w.item() == pytest.approx(math.log(3.0), abs=1e-8)
    # With L2 the optimum solves σ(w) - 0.75 + l2 w = 0; two features, the useless one stays 0.
    w = stats.logistic_regression([[1.0, 0.0], [-1.0, 0.0]], [0.75, 0.25], l2=0.1)
    assert torch.sigmoid(w[0]).item() - 0.75 + 0.1 * w[0].item() == pytest.approx(0.0, abs=1e-9)
    assert w[1].item() == 0.0


def test_split_pairs_seeded_disjoint():
    ids = [str(i) for i in range(20)]
    tr, ev = reward.split_pairs(ids, 0.25, seed=3)
    assert len(ev) == 5 and not tr & ev and tr | ev == set(ids)
    assert reward.split_pairs(ids, 0.25, seed=3) == (tr, ev)
    assert reward.split_pairs(ids, 0.25, seed=4)[1] != ev


def test_last_token_hidden_uses_mask_not_pad_ids():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (N, T, H)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert preference.last_token_hidden(h, right)[:, 0].tolist() == [1.0, 7.0]
    assert preference.last_token_hidden(h, left)[:, 0].tolist() == [3.0, 7.0]


# --------------------------------------------------------------------------- synthetic preference set

WORDS = "the a cat dog sat ran on under mat tree red blue green small big quiet loud river hill road".split()
CONSTITUTION = """name: synthetic
description: two objectives for tests
principles:
  - {name: alpha, description: d, critique: c, revision: r, comparison: "Which has the marker?"}
  - {name: beta, description: d, critique: c, revision: r, comparison: "Which is random?"}
  - {name: gamma, description: d, critique: c, revision: r, comparison: "Which is never labelled?"}
"""


def _sentence(rng, marker: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 8))]
    if marker:
        words.insert(rng.randint(0, len(words)), "zebra")
    return " ".join(words)


def write_synthetic_labels(path, n_pairs: int = 60, seed: int = 0, holistic: bool = True) -> None:
    """alpha: the response with the marker word 'zebra' is preferred (soft 0.9); beta: coin flips."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_pairs):
        a_has = rng.random() < 0.5
        prompt = "Say something about " + rng.choice(WORDS)
        a, b = _sentence(rng, a_has), _sentence(rng, not a_has)
        base = {"pair_id": i, "prompt": prompt, "response_a": a, "response_b": b}
        # alpha: both judge orders agree; beta: they never do (its labels weigh rm.inconsistent_weight)
        rows.append({**base, "objective": "alpha", "p_a": 0.9 if a_has else 0.1, "consistent": True})
        rows.append({**base, "objective": "beta", "p_a": rng.choice([0.1, 0.9]), "consistent": False})
        if holistic:
            rows.append({**base, "objective": "holistic", "p_a": 0.8 if a_has else 0.2})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def synth_cfg(tiny_cfg, tmp_path):
    const = tmp_path / "synthetic.yaml"
    const.write_text(CONSTITUTION)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.constitution.name = str(const)
    cfg.constitution.objectives = ["alpha", "beta"]
    cfg.rm.epochs = 4.0  # 36 train pairs -> 18 steps of 8 pairs
    cfg.rm.eval_fraction = 0.4  # 24 held-out pairs: accuracy >= 0.9 tolerates 2 misses
    cfg.rm.batch_size = 8
    cfg.rm.learning_rate = 1e-2
    cfg.rm.max_length = 64
    return cfg


def _train(cfg, run_dir, layout):
    cfg = cfg.model_copy(deep=True)
    cfg.rm.layout = layout
    write_synthetic_labels(run_dir / "feedback" / "labels.jsonl")
    reward.run(cfg, run_dir)
    return cfg, json.loads((run_dir / "rm" / "metrics.json").read_text())




def test_multihead_learns_separable_objective(synth_cfg, run_dir):
    from safetensors.torch import load_file

    from morlaif import models

    cfg, m = _train(synth_cfg, run_dir, "multihead")
    rm = run_dir / "rm"
    # §8 keys and ours
    for k in ("accuracy", "single_objective_accuracy", "correlation", "regression_weights", "objectives", "layout",
              "train_time_s"):
        assert k in m, k
    assert m["objectives"] == ["alpha", "beta"] and m["layout"] == "multihead"
    assert m["accuracy"]["alpha"] >= 0.9, m
    # the yardstick on labels both orders agree on: alpha's all are, beta's none
    assert m["accuracy_consistent"]["alpha"] == m["accuracy"]["alpha"] and m["accuracy_consistent"]["beta"] is None
    assert m["n_eval_consistent"]["alpha"] == 24 and m["n_eval_consistent"]["beta"] == 0
    assert m["mean_accuracy_consistent"] == m["accuracy_consistent"]["alpha"]
    assert m["calibration_agreement"] == {}  # no calibration pair is labelled for alpha or beta
    assert m["single_objective_accuracy"] >= 0.9, m  # holistic follows the marker too
    assert len(m["correlation"]) == 2 and all(len(r) == 2 for r in m["correlation"])
    assert set(m["regression_weights"]) == {"alpha", "beta"}
    assert m["regression_weights"]["alpha"] > abs(m["regression_weights"]["beta"])
    # parameters changed: LoRA B starts at zero, heads start from a seeded init
    heads = load_file(str(rm / "heads.safetensors"))
    assert set(heads) == {"multihead.weight", "holistic.weight"}
    init = preference.make_head(heads["multihead.weight"].shape[1], 2, cfg.seed).weight
    assert not torch.allclose(heads["multihead.weight"], init)
    lora = load_file(str(rm / "model" / "multihead" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())
    assert not list(rm.rglob("*.bin")) and not list(rm.rglob("*.pt"))  # safetensors only
    norm = json.loads((rm / "norm.json").read_text())
    assert set(norm["mean"]) == {"alpha", "beta"} and all(v > 0 for v in norm["std"].values())
    assert json.loads((rm / "manifest.json").read_text())["status"] == "complete"

    # The loader: same objectives, normalised stats, one forward pass for K rewards.
    scorer = preference.RewardScorer.load(run_dir, cfg)
    assert scorer.objectives == ["alpha", "beta"] and scorer.device == models.pick_device(cfg.model.device)
    r = scorer.score(["Say something about cats"] * 2, ["the zebra sat on the mat", "the cat sat on the mat"])
    assert r.shape == (2, 2) and r[0, 0] > r[1, 0]  # the marker is preferred on the easy objective
    assert r.dtype == torch.float32
    z = scorer.normalize(r)
    mean, std = torch.tensor(list(norm["mean"].values())), torch.tensor(list(norm["std"].values()))
    assert torch.allclose(z, (r - mean) / std, atol=1e-5)
    # batching must not change a reward (right padding + mask-based last token)
    one = scorer.score(["Say something about cats"], ["the cat sat on the mat"])
    assert torch.allclose(one[0], r[1], atol=1e-4)

    # A subset of trained objectives in another order is fine; an untrained one is refused.
    cfg2 = cfg.model_copy(deep=True)
    cfg2.constitution.objectives = ["beta", "alpha"]
    r2 = preference.RewardScorer.load(run_dir, cfg2).score(["Say something about cats"] * 2,
                                                       ["the zebra sat on the mat", "the cat sat on the mat"])
    assert torch.allclose(r2, r[:, [1, 0]], atol=1e-4)
    cfg3 = cfg.model_copy(deep=True)
    cfg3.constitution.objectives = ["alpha", "gamma"]
    with pytest.raises(InputError) as e:
        preference.RewardScorer.load(run_dir, cfg3)
    assert e.value.key == "constitution.objectives" and "gamma" in str(e.value)

    # Stage skip: same config and labels -> nothing retrained.
    before = (rm / "heads.safetensors").stat().st_mtime_ns
    reward.run(cfg, run_dir)
    assert (rm / "heads.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_separate_agrees_with_multihead_on_easy_objective(synth_cfg, tmp_path):
    accs = {}
    for layout in ("multihead", "separate"):
        d = tmp_path / layout
        d.mkdir()
        cfg, m = _train(synth_cfg, d, layout)
        accs[layout] = m["accuracy"]
        if layout == "separate":
            assert m["layout"] == "separate" and m["accuracy"]["alpha"] >= 0.9
            scorer = preference.RewardScorer.load(d, cfg)
            assert scorer.adapters == ["rm_0", "rm_1"]
            r = scorer.score(["Say something about cats"] * 2, ["the zebra sat on the mat", "the cat sat on the mat"])
            assert r.shape == (2, 2) and r[0, 0] > r[1, 0]
    easy = {layout: max(a, key=a.get) for layout, a in accs.items()}
    assert easy["multihead"] == easy["separate"] == "alpha", accs


def test_no_holistic_skips_baseline_and_says_so(synth_cfg, run_dir):
    cfg = synth_cfg.model_copy(deep=True)
    cfg.rm.epochs = 1.0
    write_synthetic_labels(run_dir / "feedback" / "labels.jsonl", n_pairs=12, holistic=False)
    reward.run(cfg, run_dir)
    m = json.loads((run_dir / "rm" / "metrics.json").read_text())
    assert m["single_objective_accuracy"] is None and m["regression_weights"] is None
    assert any("no 'holistic' labels" in n for n in m["notes"])
    with pytest.raises(InputError) as e:
        preference.RewardScorer.load(run_dir, cfg, baseline=True)
    assert e.value.key == "rm.baseline"


def test_bad_labels_named(synth_cfg, run_dir):
    labels = run_dir / "feedback" / "labels.jsonl"
    write_synthetic_labels(labels, n_pairs=4)
    lines = labels.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["p_a"] = 1.5
    lines[2] = json.dumps(bad)
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        reward.run(synth_cfg, run_dir)
    assert e.value.line == 3 and e.value.key == "p_a"
    # An objective the config asks for but the labels lack (another config: the failed stage is refused
    # unless it is set aside first, as --force does).
    write_synthetic_labels(labels, n_pairs=4)
    cfg = synth_cfg.model_copy(deep=True)
    cfg.constitution.objectives = ["alpha", "gamma"]
    with pytest.raises(InputError, match="constitution.objectives"):
        reward.run(cfg, run_dir)
    set_aside(run_dir / "rm")
    with pytest.raises(InputError) as e:
        reward.run(cfg, run_dir)
    assert e.value.key == "constitution.objectives" and "gamma" in str(e.value)
    with pytest.raises(InputError):
        reward.run(cfg, run_dir / "nowhere")


def test_score_prints_rewards(synth_cfg, run_dir, capsys):
    cfg = synth_cfg.model_copy(deep=True)
    cfg.rm.epochs = 1.0
    cfg.rm.baseline = False
    write_synthetic_labels(run_dir / "feedback" / "labels.jsonl", n_pairs=12)
    reward.run(cfg, run_dir)
    cfg.rl.scalarizer = "linear"
    cfg.rl.weights = {"alpha": 1.0}
    res = bestof.score(cfg, run_dir, "Say something", "the zebra ran")
    bestof.print_score(res)
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()}
    assert set(lines) >= {"alpha", "beta", "scalarized"}
    # linear with weight only on alpha: the scalarized reward is alpha's normalised reward
    assert float(out.strip().split()[-1]) == pytest.approx(float(lines["alpha"][2]), abs=1e-3)
    assert res["scalarized"] == pytest.approx(res["normalized"][0], abs=1e-6)


# --------------------------------------------------------------------------- statistics for the measuring commands


def test_spearman_wilson_and_bootstrap_exact():
    assert stats.ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]  # ties share the mean rank
    assert stats.spearman([0, 0.5, 1], [1, 2, 3]) == pytest.approx(1.0)
    assert stats.spearman([0, 0.5, 1], [3, 1, 2]) == pytest.approx(-0.5)
    assert stats.spearman([0, 1, 2, 3], [1, 1, 2, 2]) == pytest.approx(0.894427, abs=1e-6)  # 2/sqrt(5)
    assert stats.spearman([0, 1], [5, 5]) is None and stats.spearman([1], [1]) is None
    lo, hi = stats.wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.490162, abs=1e-6), pytest.approx(0.943318, abs=1e-6))
    assert stats.wilson_interval(0, 4)[0] == 0.0 and stats.wilson_interval(0, 0) == [None, None]
    assert stats.bootstrap_mean_ci([2.0] * 5) == [2.0, 2.0]
    lo, hi = stats.bootstrap_mean_ci([0.0, 1.0] * 20, seed=3)
    assert lo < 0.5 < hi and stats.bootstrap_mean_ci([0.0, 1.0] * 20, seed=3) == [lo, hi]  # seeded
    assert stats.bootstrap_mean_ci([]) == [None, None]


def test_human_agreement_and_fitted_weights_pure():
    a = stats.agreement(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert a["accuracy"] == 0.5 and a["n"] == 3  # a win, a tie (half), a loss
    assert rl_weights({"a": 2.0, "b": -1.0, "c": 2.0}) == {"a": 0.5, "b": 0.0, "c": 0.5}
    assert rl_weights({"a": -2.0, "b": 0.0}) is None
    # held-out agreement of the regression: a label that follows column 0 is predicted on every fold
    X = torch.tensor([[1.0, 0.3], [-2.0, 0.1], [0.5, -1.0], [-0.7, 0.4], [1.5, 0.2]] * 4)  # (20, 2)
    assert cv_accuracy(X, (X[:, 0] > 0).double()) == 1.0
    assert cv_accuracy(X[:3], torch.ones(3)) is None  # fewer pairs than folds


def test_rm_human_on_labelled_pairs(synth_cfg, run_dir, tmp_path, capsys):
    """`morlaif rm --human`: the preference models against labels that follow the marker (alpha's signal),
    prompts of longer dialogues scored as turns, the fitted weights usable as rl.weights."""
    from morlaif.cli import main
    from morlaif.config import load_config

    write_synthetic_labels(run_dir / "feedback" / "labels.jsonl")
    reward.run(synth_cfg, run_dir)
    (run_dir / "config.yaml").write_text(synth_cfg.to_yaml())
    rng = random.Random(7)
    rows = []
    for i in range(40):
        a_has = rng.random() < 0.5
        prompt = "Say something about " + rng.choice(WORDS)
        if i % 2:  # a longer dialogue, written as the shared HH-RLHF set writes it
            prompt = f"hello\nAssistant: hi, what do you need?\n\nUser: {prompt}"
        rows.append({"prompt": prompt, "response_a": _sentence(rng, a_has), "response_b": _sentence(rng, not a_has),
                     "preferred": "a" if a_has else "b", "objective": "harmless"})
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["rm", "--run", str(run_dir), "--human", str(human)]) == 0
    res = json.loads((run_dir / "human" / "human.json").read_text())
    ag = res["agreement"]
    assert res["n"] == 40 and res["multi_turn_prompts"] == 20 and res["label_objectives"] == {"harmless": 40}
    assert ag["per_objective"]["alpha"]["accuracy"] >= 0.9 and ag["holistic"]["accuracy"] >= 0.9
    lo, hi = ag["per_objective"]["alpha"]["ci95"]
    assert lo < ag["per_objective"]["alpha"]["accuracy"] <= hi and ag["per_objective"]["alpha"]["n"] == 40
    # the same numbers from the models directly: a dialogue is scored as its turns
    scorer = preference.RewardScorer.load(run_dir, synth_cfg)
    turns = [promptsets.dialogue_turns(r["prompt"]) for r in rows]
    ra = scorer.score(turns, [r["response_a"] for r in rows])[:, 0]
    rb = scorer.score(turns, [r["response_b"] for r in rows])[:, 0]
    y = [1.0 if r["preferred"] == "a" else 0.0 for r in rows]
    assert ag["per_objective"]["alpha"]["accuracy"] == stats.pairwise_accuracy(ra, rb, y)[0]
    coef = res["fitted"]["coefficients"]
    assert coef["alpha"] > abs(coef["beta"]) and res["fitted"]["accuracy_cv5"] >= 0.8
    w = res["fitted"]["rl_weights"]
    assert w == rl_weights(coef) and sum(w.values()) == pytest.approx(1.0, abs=1e-3)
    # the printed --set line and the written recipe fragment both load as config
    out = capsys.readouterr().out
    set_line = next(ln for ln in out.splitlines() if "--set" in ln).split("--set '")[1].split("'")[0]
    assert load_config(None, [set_line]).rl.weights == w
    assert load_config(res["weights_file"]).rl.weights == w
    # a bad label exits 2 naming file and line
    human.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "preferred": "c"}) + "\n")
    assert main(["rm", "--run", str(run_dir), "--human", str(human)]) == 2
    assert f"{human}:2: key 'preferred'" in capsys.readouterr().err


def test_preference_model_trainer_settings(synth_cfg, run_dir, tmp_path):
    """rm.lr_scheduler_type / warmup_steps shape the learning rate (TensorBoard lr/ADAPTER follows
    training.lr_factors); activation checkpointing only recomputes: the same losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from morlaif import training

    cfg = synth_cfg.model_copy(deep=True)
    cfg.rm.epochs, cfg.rm.baseline = 1.0, False
    cfg.rm.lr_scheduler_type, cfg.rm.warmup_steps = "linear", 2
    cfg.logging.report_to = "tensorboard"
    write_synthetic_labels(run_dir / "feedback" / "labels.jsonl")
    reward.run(cfg, run_dir)
    plain = json.loads((run_dir / "rm" / "metrics.json").read_text())["training"]["multihead"]
    acc = EventAccumulator(str(run_dir / "rm" / "tensorboard"))
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("lr/multihead")]
    want = [cfg.rm.learning_rate * f for f in training.lr_factors("linear", 2, plain["steps"])]
    assert lrs == pytest.approx(want) and lrs[0] == 0.0
    assert len(acc.Scalars("loss/multihead")) == plain["steps"]

    other = tmp_path / "other"
    (other / "feedback").mkdir(parents=True)
    write_synthetic_labels(other / "feedback" / "labels.jsonl")
    cfg.rm.activation_checkpointing = True
    reward.run(cfg, other)
    ckpt = json.loads((other / "rm" / "metrics.json").read_text())["training"]["multihead"]
    assert ckpt["loss_first"] == pytest.approx(plain["loss_first"], abs=1e-6)
    assert ckpt["loss_last"] == pytest.approx(plain["loss_last"], abs=1e-5)


def test_training_targets_standardize_log_odds_per_objective_exactly():
    P = reward.Pair
    pairs = [P("1", "q", "a", "b", {"x": 0.6, "y": 0.5}), P("2", "q", "a", "b", {"x": 0.4, "y": 0.9}),
             P("3", "q", "a", "b", {"x": 0.5, "y": 0.1})]
    assert reward.training_targets(pairs, "soft") == (pairs, None)
    std, rms = reward.training_targets(pairs, "standardized")
    # x: log-odds ±0.405465 and 0 -> RMS 0.405465 * sqrt(2/3); y: ±2.197225 and 0 -> 2.197225 * sqrt(2/3)
    assert rms["x"] == pytest.approx(math.log(1.5) * math.sqrt(2 / 3))
    assert rms["y"] == pytest.approx(math.log(9) * math.sqrt(2 / 3))
    s = 1 / (1 + math.exp(-math.sqrt(1.5)))  # σ(±sqrt(3/2)) for both objectives: the same unit scale
    assert [pr.p["x"] for pr in std] == pytest.approx([s, 1 - s, 0.5])
    assert [pr.p["y"] for pr in std] == pytest.approx([0.5, s, 1 - s])
    assert [pr.p for pr in pairs][0] == {"x": 0.6, "y": 0.5}  # the labels themselves are untouched
    hard, _ = reward.training_targets(pairs, "hard")
    assert all(pr.weight == {} for pr in hard)  # every label weighs 1
    assert [pr.p for pr in hard] == [{"x": 1.0, "y": 0.5}, {"x": 0.0, "y": 1.0}, {"x": 0.5, "y": 0.0}]


def test_training_targets_sign_weights_inconsistent_labels():
    P = reward.Pair
    pairs = [P("1", "q", "a", "b", {"x": 0.51, "y": 0.5, "z": 0.2}, consistent={"x": True, "y": True, "z": False}),
             P("2", "q", "a", "b", {"x": 0.4, "y": 0.7}, consistent={"x": False, "y": None})]
    sign, rms = reward.training_targets(pairs, "sign", inconsistent_weight=0.5)
    assert rms is None
    # the side, not the margin; a tie is left out; an inconsistent label weighs 0.5, one without orders 1
    assert [pr.p for pr in sign] == [{"x": 1.0, "z": 0.0}, {"x": 0.0, "y": 1.0}]
    assert [pr.weight for pr in sign] == [{"x": 1.0, "z": 0.5}, {"x": 0.5, "y": 1.0}]
    only, _ = reward.training_targets(pairs, "sign", inconsistent_weight=0.0)  # consistent labels only
    assert [pr.p for pr in only] == [{"x": 1.0}, {"y": 1.0}]
    # the weight reaches the loss as the label's mask entry
    _, _, _, p, m = preference.pair_texts(_NoTemplateTok(), sign, ["x", "y", "z"])
    assert m.tolist() == [[1.0, 0.0, 0.5], [0.5, 1.0, 0.0]] and p.tolist() == [[1.0, 0.5, 0.0], [0.0, 1.0, 0.5]]
    # the held-out yardstick keeps only labels whose orders agree
    assert [pr.p for pr in reward.consistent_labels(pairs)] == [{"x": 0.51, "y": 0.5}, {}]


class _NoTemplateTok:  # render() writes "Role: text" lines for a tokenizer without a chat template
    chat_template = None


def test_balanced_weights_and_class_shares_exact():
    P = reward.Pair
    pairs = [P("1", "q", "a long answer", "no", {"x": 1.0, "y": 1.0}),  # x, y: the longer side wins
             P("2", "q", "a long answer", "no", {"x": 1.0, "y": 0.0}, weight={"x": 0.5}),  # y: the shorter wins
             P("3", "q", "no", "a long answer", {"x": 0.0, "y": 1.0}),  # x: the longer (b) wins; y: the shorter
             P("4", "q", "same", "same", {"x": 1.0}),  # a tie in length: left as it is
             P("5", "q", "no", "a long answer", {"x": 1.0, "y": 0.5})]  # x: the shorter wins; y: a label tie
    longer = reward.longer_preferred
    assert [longer(pr, "x") for pr in pairs] == [True, True, True, None, False]
    assert reward.class_share(pairs, ["x", "y"], longer) == {"x": 0.75, "y": pytest.approx(1 / 3)}
    out = reward.balanced(pairs, longer)
    # x: longer-wins weigh 1 + 0.5 + 1 = 2.5, shorter-wins 1: each class scaled to half of 3.5
    assert out[0].weight["x"] == pytest.approx(1.75 / 2.5) and out[1].weight["x"] == pytest.approx(0.5 * 1.75 / 2.5)
    assert out[4].weight["x"] == pytest.approx(1.75) and out[3].weight["x"] == 1.0
    # y: longer-wins 1, shorter-wins 2: scaled to 1.5 each; the label tie keeps 1
    assert out[0].weight["y"] == pytest.approx(1.5) and out[1].weight["y"] == pytest.approx(0.75)
    assert out[2].weight["y"] == pytest.approx(0.75) and out[4].weight["y"] == 1.0
    assert [pr.p for pr in out] == [pr.p for pr in pairs]  # the targets themselves unchanged
    # an objective whose labels all fall in one class keeps its weights
    assert reward.balanced([pairs[0]], longer)[0].weight == {"x": 1.0, "y": 1.0}

    # refusal: only pairs where exactly one side refuses have a class
    no = "I'm sorry, but I can't help with that."
    rp = [P("a", "q", no, "Here is how.", {"x": 1.0}), P("b", "q", no, "Sure.", {"x": 0.0}),
          P("c", "q", "Sure.", no, {"x": 0.0}), P("d", "q", no, no, {"x": 1.0})]
    assert [reward.refusal_preferred(pr, "x") for pr in rp] == [True, False, True, None]
    assert reward.class_share(rp, ["x"], reward.refusal_preferred) == {"x": pytest.approx(2 / 3)}
    w = [pr.weight["x"] for pr in reward.balanced(rp, reward.refusal_preferred)]
    assert w == [pytest.approx(0.75), pytest.approx(1.5), pytest.approx(0.75), 1.0]
