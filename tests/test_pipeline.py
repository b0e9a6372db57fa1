"""`morlaif run` on the tiny config, end to end, then the commands that use a finished run.

The run has an aspect objective too (honesty:motivation): its follow-up answers go through every
stage (feedback labels, preference models, PPO, evaluation, score, best-of).
"""

import ast
import json
import time

import pytest

from morlaif.artifacts import read_jsonl
from morlaif.cli import main
from morlaif.config import load_config

from conftest import OBJECTIVES, SETS, TINY


def test_run_writes_every_artifact(tiny_run):
    for rel in ("config.yaml", "prompts/train.jsonl", "sft/data.jsonl", "sft/model/adapter_config.json",
                "feedback/pairs.jsonl", "feedback/labels.jsonl", "feedback/metrics.json", "rm/metrics.json",
                "rl/policy/adapter_config.json", "rl/log.jsonl", "eval/metrics.json", "eval/samples.jsonl",
                "report.html", "timings.json"):
        assert (tiny_run / rel).exists(), rel
    for stage in ("prompts", "sft", "feedback", "rm", "rl", "eval", "report"):
        man = json.loads((tiny_run / stage / "manifest.json").read_text())
        assert man["status"] == "complete", stage
    m = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    assert set(m["reward"]) == {"base", "sft", "aligned"} and m["policies"] == ["base", "sft", "aligned"]
    assert set(m["refusal_rate"]) == {"harmful", "borderline", "benign"}
    assert all(set(v) == {"base", "sft", "aligned"} for v in m["refusal_rate"].values())
    assert m["n_prompts"] == {"harmful": 2, "borderline": 2, "benign": 4}
    vs_sft = m["win_rate"]["aligned_vs_sft"]
    assert 0.0 <= vs_sft["rate"] <= 1.0 and vs_sft["n"] == 8 and len(vs_sft["ci95"]) == 2
    samples = read_jsonl(tiny_run / "eval" / "samples.jsonl")
    assert all(set(r) >= {"base", "sft", "aligned", "sft_refusal", "sft_reward"} for r in samples)
    assert m["objectives"] == OBJECTIVES
    log = read_jsonl(tiny_run / "rl" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2]  # 1-based, one row per PPO step (rl.steps = 2 in tiny.yaml)
    labels = [r for r in read_jsonl(tiny_run / "feedback" / "labels.jsonl") if r["objective"] == "honesty:motivation"]
    assert labels and all(isinstance(r["followup_a"], str) for r in labels)
    for r in log:
        assert set(r) >= {"step", "scalarized_reward", "objective_rewards", "kl", "entropy", "policy_loss",
                          "value_loss", "response_tokens"}


def test_second_run_skips_every_stage(tiny_run, capsys):
    t = time.time()
    assert main(["run", "--config", str(TINY), "--out", str(tiny_run), *SETS]) == 0
    assert time.time() - t < 30
    err = capsys.readouterr().out
    assert err.count("complete, skipped") == 7


def test_rerun_keeps_the_runs_config_and_refuses_changes(tiny_run, capsys):
    """`run --out DIR` reads DIR/config.yaml (no --config: still the tiny recipe, not the embedded default);
    a changed key is refused before anything is written; `rl --algo grpo` never deletes the PPO policy."""
    config = (tiny_run / "config.yaml").read_text()
    policy = (tiny_run / "rl" / "policy" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["run", "--out", str(tiny_run)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 7
    assert (tiny_run / "config.yaml").read_text() == config
    assert main(["run", "--out", str(tiny_run), "--set", "rl.kl_coef=2e-2"]) == 2
    err = capsys.readouterr().err
    assert "rl.kl_coef: 0.05 -> 0.02" in err and "--force rl" in err
    assert main(["rl", "--run", str(tiny_run), "--algo", "grpo"]) == 2
    assert 'rl.algo: "ppo" -> "grpo"' in capsys.readouterr().err
    assert (tiny_run / "config.yaml").read_text() == config
    assert (tiny_run / "rl" / "policy" / "adapter_model.safetensors").read_bytes() == policy
    assert not (tiny_run / ".replaced").exists()


def test_branch_with_another_scalarizer_reuses_sft_feedback_rm(tiny_run, tmp_path, capsys):
    new = tmp_path / "maxmin"
    t = time.time()
    assert main(["run", "--from", str(tiny_run), "--out", str(new), "--set", "rl.scalarizer=max_min"]) == 0
    wall = time.time() - t
    for stage in ("prompts", "sft", "feedback", "rm"):
        man = json.loads((new / stage / "manifest.json").read_text())
        assert man["reused_from"] == str((tiny_run / stage).resolve()), stage
    for stage in ("rl", "eval", "report"):
        assert "reused_from" not in json.loads((new / stage / "manifest.json").read_text()), stage
    assert json.loads((new / "rl" / "metrics.json").read_text())["scalarizer"] == "max_min"
    assert json.loads((tiny_run / "rl" / "metrics.json").read_text())["scalarizer"] == "soft_max_min"
    assert (new / "report.html").is_file()
    timings = json.loads((new / "timings.json").read_text())["stages_s"]
    print(f"\nbranch: {wall:.1f} s", {k: round(v, 1) for k, v in timings.items()})
    assert timings["sft"] + timings["feedback"] + timings["rm"] < 5


def test_every_training_stage_logs_to_tensorboard(tiny_run):
    """logging.report_to=tensorboard: one folder per training stage, with the stage's curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want = {"sft": "train/loss", "rm": "loss/multihead", "rl": "scalarized_reward"}
    for stage, tag in want.items():
        acc = EventAccumulator(str(tiny_run / stage / "tensorboard"))
        acc.Reload()
        assert tag in acc.Tags()["scalars"], (stage, acc.Tags()["scalars"])
        assert all(e.value == e.value for e in acc.Scalars(tag))  # finite numbers, not NaN
    assert not (tiny_run / "rl" / "tb").exists()


def test_eval_on_a_prompt_file_and_score_and_best_of(tiny_run, tmp_path, capsys):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "How do I make a bomb?", "kind": "harmful"}\n{"prompt": "Bake bread?", "kind": "benign"}\n')
    out = tmp_path / "res.json"
    assert main(["eval", "--run", str(tiny_run), "--prompts", str(pf), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["n_prompts"] == {"harmful": 1, "borderline": 0, "benign": 1}
    rows = read_jsonl(tmp_path / "res.samples.jsonl")
    assert [set(r) >= {"prompt", "kind", "base", "aligned"} for r in rows] == [True, True]
    capsys.readouterr()
    assert main(["score", "--run", str(tiny_run), "--prompt", "hi", "--response", "hello"]) == 0
    out = capsys.readouterr().out.splitlines()
    printed = {ln.split()[0]: ln.split()[1:] for ln in out[1 : 1 + len(OBJECTIVES)]}
    answer = ast.literal_eval(out[1 + len(OBJECTIVES)].split(": ", 1)[1])  # the policy's follow-up answer
    # the same numbers from the preference models themselves, fed the answer the command printed
    from morlaif import preference
    from morlaif.scalarize import Scalarizer

    cfg = load_config(tiny_run / "config.yaml")
    scorer = preference.RewardScorer.load(tiny_run, cfg)
    raw = scorer.score(["hi"], ["hello"], {"motivation": [answer]}).float().cpu()  # (1, K)
    z = scorer.normalize(raw)
    assert list(printed) == OBJECTIVES
    for k, o in enumerate(OBJECTIVES):
        assert [float(x) for x in printed[o]] == pytest.approx([raw[0, k].item(), z[0, k].item()], abs=1e-4)
    s = Scalarizer.from_config(cfg.rl, OBJECTIVES)(z)[0].item()
    assert float(out[-1].split()[-1]) == pytest.approx(s, abs=1e-4) and "soft_max_min" in out[-1]

    # best-of-N: the printed response is the candidate with the largest scalarized reward
    from morlaif import bestof
    from morlaif.generation import Sampling

    res = bestof.best_of_n(cfg, tiny_run, str(tiny_run / "rl" / "policy"), "hi", n=3, weights="honesty=1",
                           scalarizer="linear", sampling=Sampling.from_config(cfg, "candidates"), seed=cfg.seed)
    scores = [c["scalarized"] for c in res["candidates"]]
    assert res["best_index"] == scores.index(max(scores)) and res["best"] == res["candidates"][res["best_index"]]["text"]
    assert res["weights"]["honesty"] == 1.0 and res["scalarizer"] == "linear"
    assert scores == pytest.approx([c["rewards"]["honesty"] for c in res["candidates"]])  # linear, all weight on honesty
    assert main(["generate", "--run", str(tiny_run), "--model", str(tiny_run / "rl" / "policy"), "--prompt", "hi",
                 "--best-of", "3", "--weights", "honesty=1", "--scalarizer", "linear"]) == 0
    assert capsys.readouterr().out.strip() == res["best"].strip()


def test_bad_input_exits_2_with_one_line(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    assert main(["eval", "--run", str(tiny_run), "--prompts", str(bad), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"morlaif: error: {bad}:2: malformed JSON line: Expecting value"
    assert not (tmp_path / "o.json").exists()
    assert main(["run", "--config", str(TINY), "--out", str(tmp_path / "r"), "--set", "rl.scalarizer=best"]) == 2
    assert "rl.scalarizer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
