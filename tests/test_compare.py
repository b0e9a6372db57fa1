"""The commands that measure a finished run: `morlaif compare` (arms side by side on one yardstick),
`morlaif steer` (best-of-N weight sweeps), the holistic baseline as an rl setting, and `eval --prompts`
on a dataset folder. One tiny run serves them all; tiny numbers mean nothing, so the tests check that
each number is the one its artifacts hold, that RUN's own stages are never touched, and that reruns
reuse what is done."""

import json

import pytest
import torch

from morlaif import compare, models, rl, steer
from morlaif.artifacts import read_json, read_jsonl, sha256_file
from morlaif.cli import main
from morlaif.config import load_config
from morlaif.errors import InputError
from morlaif.scalarize import WEIGHTED, Scalarizer

from conftest import TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("measure") / "run"
    assert main(["run", "--config", str(TINY), "--out", str(out)]) == 0
    return out


def _fingerprint(run):
    """Content of the run's own rl/ and eval/ stages: compare must never change them."""
    return {d: sha256_file(run / d) for d in ("rl", "eval")} | {
        d: read_json(run / d / "manifest.json")["started"] for d in ("rl", "eval")}


def test_compare_arms_on_one_yardstick(tiny_run, capsys):
    before = _fingerprint(tiny_run)
    argv = ["compare", "--run", str(tiny_run), "--scalarizers", "soft_max_min,linear", "--baseline"]
    assert main(argv) == 0
    out = tiny_run / "compare"
    res = json.loads((out / "compare.json").read_text())
    assert list(res["arms"]) == ["soft_max_min", "linear", "holistic"] and res["baseline_arm"] == "holistic"
    assert _fingerprint(tiny_run) == before  # RUN/rl and RUN/eval read, never written
    # the run's own arm (its scalarizer, same config and inputs) is RUN/rl and RUN/eval, not retrained
    own = res["arms"]["soft_max_min"]
    assert own["reused_run_rl"] and own["policy"] == str(tiny_run / "rl" / "policy")
    assert own["eval_dir"] == str(tiny_run / "eval") and not (out / "soft_max_min" / "rl").exists()
    for arm in ("linear", "holistic"):
        a = res["arms"][arm]
        assert not a["reused_run_rl"] and a["policy"] == str(out / arm / "rl" / "policy")
        for stage in ("rl", "eval"):
            assert read_json(out / arm / stage / "manifest.json")["status"] == "complete"
        assert a["train_s"] == read_json(out / arm / "rl" / "manifest.json")["wall_time_s"]
    # every number is its eval stage's, and every eval used the run's yardstick on the same prompts
    hashes = set()
    for arm, a in res["arms"].items():
        m = read_json(f"{a['eval_dir']}/metrics.json")
        assert a["scalarized"] == m["reward"]["aligned"]["scalarized"]
        assert a["per_objective"] == m["reward"]["aligned"]["per_objective"]
        assert a["refusal"] == {k: m["refusal_rate"][k]["aligned"] for k in ("harmful", "benign")}
        assert (a["kl_to_base"], a["mean_response_tokens"]) == (m["kl_to_base"], m["mean_response_tokens"]["aligned"])
        assert a["win_rate_vs_base"]["rate"] == m["win_rate"]["aligned_vs_base"] and a["win_rate_vs_base"]["n"] == 8
        assert m["scalarizer"] == "soft_max_min" and m["reward"]["base"]["scalarized"] == res["base"]["scalarized"]
        hashes.add(read_json(f"{a['eval_dir']}/manifest.json")["config_hash"])
    assert len(hashes) == 1
    # what each arm learnt from: its own scalarizer, or the holistic model alone
    assert read_json(out / "linear" / "rl" / "metrics.json")["scalarizer"] == "linear"
    hol = read_json(out / "holistic" / "rl" / "metrics.json")
    assert hol["reward_model"] == "holistic" and hol["objectives"] == ["holistic"]
    assert all(set(r["objective_rewards"]) == {"holistic"} for r in read_jsonl(out / "holistic" / "rl" / "log.jsonl"))
    # win rates against the baseline arm: each from its own judged stage; none for the baseline itself
    for arm in ("soft_max_min", "linear"):
        w = read_json(out / arm / "vs_baseline" / "win_rate.json")
        assert res["arms"][arm]["win_rate_vs_baseline"]["rate"] == w["aligned_vs_base"] and w["n"] == 8
    assert res["arms"]["holistic"]["win_rate_vs_baseline"] is None
    # the page and the run's report link it
    page = (out / "compare.html").read_text()
    assert all(f"<td>{arm}</td>" in page for arm in res["arms"]) and (out / "compare_objectives.png").is_file()
    assert "compare/compare.html" in (tiny_run / "report.html").read_text()
    printed = capsys.readouterr().out
    assert "holistic" in printed and "win vs baseline" in printed

    # a rerun trains and evaluates nothing again
    started = {arm: read_json(out / arm / "rl" / "manifest.json")["started"] for arm in ("linear", "holistic")}
    assert main(argv) == 0
    assert started == {arm: read_json(out / arm / "rl" / "manifest.json")["started"] for arm in started}


def test_compare_bad_input_exits_2(tiny_run, tmp_path, capsys):
    assert main(["compare", "--run", str(tiny_run), "--scalarizers", "linear,best"]) == 2
    assert "key '--scalarizers': unknown scalarizer(s) ['best']" in capsys.readouterr().err
    assert main(["compare", "--run", str(tmp_path / "none")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    # the baseline arm needs an algorithm that learns from a preference model: refused before any arm trains
    assert main(["compare", "--run", str(tiny_run), "--scalarizers", "max_min", "--baseline", "--set", "rl.algo=dpo"]) == 2
    assert "key 'rl.reward_model'" in capsys.readouterr().err and not (tiny_run / "compare" / "max_min").exists()
    assert compare.parse_scalarizers(None) == list(compare.NAMES)
    assert compare.parse_scalarizers("linear, max_min,linear") == ["linear", "max_min"]


def test_holistic_baseline_is_one_config_key(tiny_run):
    """rl.reward_model: holistic trains on the holistic preference model alone: one objective, passed on as
    it is (linear, no weights), whatever the run's scalarizer and weights say."""
    cfg = load_config(tiny_run / "config.yaml", ["rl.reward_model=holistic", "rl.scalarizer=bernoulli_nash",
                                                 "rl.weights={honesty: 1}"])
    algo_cfg = rl.algorithm_config(cfg)
    assert (algo_cfg.rl.scalarizer, algo_cfg.rl.weights, cfg.rl.scalarizer) == ("linear", None, "bernoulli_nash")
    assert Scalarizer.from_config(algo_cfg.rl, ["holistic"])(torch.tensor([[-1.5], [2.0]])).tolist() == [-1.5, 2.0]
    assert rl.algorithm_config(load_config(tiny_run / "config.yaml")).rl.scalarizer == "soft_max_min"
    # offline algorithms learn from labels, not from a preference model: refused before anything is written
    before = _fingerprint(tiny_run)
    dpo = load_config(tiny_run / "config.yaml", ["rl.reward_model=holistic", "rl.algo=dpo"])
    with pytest.raises(InputError) as e:
        rl.run(dpo, tiny_run)
    assert e.value.key == "rl.reward_model" and _fingerprint(tiny_run) == before


def test_eval_prompts_from_a_dataset_folder(tiny_run, tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a"} for i in range(5)]).save_to_disk(
        str(tmp_path / "hh"))
    out = tmp_path / "res.json"
    assert main(["eval", "--run", str(tiny_run), "--prompts", f"{tmp_path / 'hh'}?limit=3&kind=benign",
                 "--out", str(out)]) == 0
    assert read_json(out)["n_prompts"] == {"harmful": 0, "borderline": 0, "benign": 3}
    assert [r["prompt"] for r in read_jsonl(tmp_path / "res.samples.jsonl")] == [f"question {i}?" for i in range(3)]


# --------------------------------------------------------------------------- steering


def test_weighted_scalarizers_are_the_ones_the_weights_move():
    r = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -0.4]])  # (B, K)
    for name in ("linear", "max_min", "soft_max_min", "uncertainty_weighted", "lower_quantile", "max_median",
                 "bernoulli_nash"):
        a = Scalarizer(name, ["x", "y", "z"], {"x": 1.0, "y": 1.0, "z": 1.0})(r)
        b = Scalarizer(name, ["x", "y", "z"], {"x": 5.0, "y": 1.0, "z": 0.5})(r)
        assert (not torch.allclose(a, b)) == (name in WEIGHTED), name


def test_sweep_weights_and_curve_exact():
    assert steer.sweep_weights(["x", "y", "z"], "y", 0.4) == {"x": 0.3, "y": 0.4, "z": 0.3}
    assert steer.sweep_weights(["x", "y"], "x", 1.0) == {"x": 1.0, "y": 0.0}
    # 2 prompts x 3 candidates x 2 objectives; linear picks the best on y at w=0, on x at w=1
    z = torch.tensor([[[2.0, -1.0], [-1.0, 2.0], [0.0, 0.0]],
                      [[1.0, 1.0], [3.0, -3.0], [-2.0, 4.0]]])
    objs = ["x", "y"]
    scals = [Scalarizer("linear", objs, steer.sweep_weights(objs, "x", w)) for w in (0.0, 1.0)]
    yard = Scalarizer("linear", objs)  # uniform
    pts = steer.curve(z, scals, yard, 0)
    assert pts[0]["per_prompt"] == [-1.0, -2.0] and pts[1]["per_prompt"] == [2.0, 3.0]
    assert (pts[0]["objective_reward"], pts[1]["objective_reward"]) == (-1.5, 2.5)
    assert pts[0]["per_objective"] == {"x": -1.5, "y": 3.0} and pts[0]["scalarized"] == pytest.approx(0.75)
    assert pts[1]["scalarized"] == pytest.approx(0.25)  # ((2 - 1)/2 + (3 - 3)/2) / 2
    assert steer.verdict("x", 1.0, [0.5, 1.0]).startswith("rises: x's reward")
    assert steer.verdict("x", -1.0, [-2.0, -0.1]).startswith("falls")
    assert steer.verdict("x", 1.0, [-0.1, 0.3]).startswith("not clear") and steer.verdict("x", None, [None, None])


def test_steer_command_samples_once_and_reranks(tiny_run, monkeypatch, capsys):
    argv = ["steer", "--run", str(tiny_run), "--objective", "honesty", "--n", "3", "--points", "3", "--limit", "4"]
    assert main(argv) == 0
    d = tiny_run / "steer"
    res = read_json(d / "honesty.json")
    assert [p["weight"] for p in res["points"]] == [0.0, 0.5, 1.0] and (res["n"], res["prompts"]) == (3, 4)
    assert (d / "honesty.png").read_bytes()[:4] == b"\x89PNG"
    # the numbers follow from the cached samples: rerank them again by hand
    cache = list(d.glob("candidates-*.jsonl"))
    assert len(cache) == 1
    rows = read_jsonl(cache[0])
    assert [len(r["texts"]) for r in rows] == [3] * 4
    cfg = load_config(tiny_run / "config.yaml")
    from morlaif.preference import RewardScorer

    scorer = RewardScorer.load(tiny_run, cfg)
    raw = torch.tensor([r["raw"] for r in rows])  # (P, N, K)
    z = scorer.normalize(raw.reshape(12, -1)).reshape(raw.shape)
    k = scorer.objectives.index("honesty")
    w1 = Scalarizer.from_config(cfg.rl, scorer.objectives, weights=steer.sweep_weights(scorer.objectives, "honesty", 1.0))
    picks = [int(torch.argmax(w1(z[i]))) for i in range(4)]
    assert res["points"][-1]["objective_reward"] == pytest.approx(float(torch.stack([z[i, j, k] for i, j in
                                                                                    enumerate(picks)]).mean()), abs=1e-6)
    assert res["points"][-1]["objective_reward"] >= res["one_sample"]["objective_reward"] - 1e-9  # best on X alone
    assert "Steering without retraining" in (tiny_run / "report.html").read_text()
    # another objective reuses the samples: no model is loaded, no new cache file
    monkeypatch.setattr(models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled again")))
    assert main([*argv[:4], "prudence", *argv[5:]]) == 0
    assert read_json(d / "prudence.json")["objective"] == "prudence" and len(list(d.glob("candidates-*"))) == 1
    capsys.readouterr()
    for bad, key in ((["--objective", "bravery"], "--objective"), (["--objective", "honesty", "--n", "1"], "--n"),
                     (["--objective", "honesty", "--scalarizer", "max_min"], "--scalarizer")):
        assert main(["steer", "--run", str(tiny_run), *bad]) == 2
        assert f"key '{key}'" in capsys.readouterr().err


def test_conditioned_policy_steers_without_reranking(tiny_run, tmp_path, capsys):
    """rl.conditioning: prompt on the tiny run, then eval (the policy asked at rl.weights) and
    `steer --conditioned` (the one policy asked at each weight): every stage takes the conditioned policy."""
    import shutil

    from morlaif.conditioning import Conditioning

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("steer"))  # other tests sweep tiny_run
    sets = ["--set", "rl.conditioning=prompt", "--set", "rl.scalarizer=linear"]
    assert main(["rl", "--run", str(run), "--force", *sets]) == 0
    assert Conditioning.load(run / "rl" / "policy") is not None
    assert read_json(run / "rl" / "metrics.json")["conditioning"] == "prompt"
    assert main(["eval", "--run", str(run), "--force", *sets]) == 0
    argv = ["steer", "--run", str(run), "--objective", "honesty", "--points", "3", "--limit", "4", "--conditioned", *sets]
    assert main(argv) == 0
    res = read_json(run / "steer" / "honesty-conditioned.json")
    assert res["mode"] == "conditioned" and res["one_sample"] is None and res["prompts"] == 4
    assert [p["weight"] for p in res["points"]] == [0.0, 0.5, 1.0]
    assert res["gain_w1_minus_w0"]["ci95"][0] is not None
    assert not list((run / "steer").glob("candidates-*"))  # no best-of-N sampling
    assert "one conditioned policy" in capsys.readouterr().out
    # an ordinary policy cannot be steered this way
    assert main([*argv, "--model", str(run / "sft" / "model")]) == 2
    assert "key '--conditioned'" in capsys.readouterr().err
