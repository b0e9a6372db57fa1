"""`morlaif compare`: the MORLAIF paper's comparison in one command.

From one run's finished SFT policy, AI labels and preference models, train one policy per
scalarizer (and, with the baseline, one on the holistic single-objective preference model), then
evaluate every arm on the run's held-out prompts with the same seeds and one yardstick: the run's
preference models and the run's own scalarizer and weights, so the arms' numbers compare. Per arm:
scalarized and per-objective reward, refusal and over-refusal, KL to the base, length, and the
judge's win rate against the base and against the baseline arm (95% intervals).

OUT (default RUN/compare/) gets one directory per arm, each a resumable rl stage and eval stage
with their own manifests (`rl.train_into`, `evaluate.evaluate_into`): a rerun skips what is done.
An arm the run's own rl stage is done for (`lifecycle.stage_state`: the same settings and input
content, by the same rule `morlaif run` skips a stage by) reuses RUN/rl and RUN/eval instead of
training again; RUN's own directories are only ever read. Then OUT/compare.json
and OUT/compare.html (a table and a per-objective x arm figure).
"""

from __future__ import annotations

import time
from pathlib import Path

from morlaif import evaluate, report, rl
from morlaif.artifacts import atomic_write_text, read_json, read_jsonl, write_json
from morlaif.config import Config
from morlaif.constitution import HOLISTIC
from morlaif.errors import InputError
from morlaif.lifecycle import read_manifest, run_stage, stage_state
from morlaif.processes import is_main_process
from morlaif.scalarize import NAMES

BASELINE_ARM = HOLISTIC  # the single-objective arm is named after the label its preference model learnt


def parse_scalarizers(spec: str | None) -> list[str]:
    """'soft_max_min,linear' -> the arms' scalarizers in that order (default: all seven)."""
    if not spec:
        return list(NAMES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in NAMES]
    if unknown or not names:
        raise InputError(f"unknown scalarizer(s) {unknown or [spec]} (one of {', '.join(NAMES)})", key="--scalarizers")
    return list(dict.fromkeys(names))


def arm_config(cfg: Config, arm: str) -> Config:
    """The run's config with the arm's reward: a scalarizer of the K preference models, or the holistic one."""
    acfg = cfg.model_copy(deep=True)
    if arm == BASELINE_ARM:
        acfg.rl.reward_model = "holistic"
    else:
        acfg.rl.reward_model, acfg.rl.scalarizer = "per_objective", arm
    return acfg


def wall_s(stage_dir: Path) -> float | None:
    man = read_manifest(stage_dir)
    return man.get("wall_time_s") if man else None


def train_arm(cfg: Config, run_dir: Path, arm: str, arm_dir: Path) -> Path:
    """The arm's rl stage directory: RUN/rl when the run's own policy was trained exactly so, else
    arm_dir/rl (trained, resumed or skipped there)."""
    acfg = arm_config(cfg, arm)
    own = run_dir / "rl"
    if stage_state(own, rl.stage_config(acfg), rl.stage_inputs(acfg, run_dir)).done:
        return own
    return rl.train_into(acfg, run_dir, arm_dir / "rl")


def eval_arm(cfg: Config, run_dir: Path, rl_dir: Path, arm_dir: Path) -> Path:
    """The arm's eval stage directory, under the run's yardstick (cfg): RUN/eval when it evaluated this
    very policy so, else arm_dir/eval."""
    policy, own = rl_dir / "policy", run_dir / "eval"
    inputs = evaluate.stage_inputs(run_dir, policy)
    if rl_dir == run_dir / "rl" and stage_state(own, evaluate.stage_config(cfg), inputs).done:
        return own
    return evaluate.evaluate_into(cfg, run_dir, arm_dir / "eval", policy)


def vs_baseline(cfg: Config, arm_eval: Path, baseline_eval: Path, out: Path) -> dict:
    """The judge's win rate of an arm's held-out responses over the baseline arm's (both orders, ties
    half, 95% interval), as a resumable stage in out/."""
    inputs = [arm_eval / "samples.jsonl", baseline_eval / "samples.jsonl"]

    def body(o: Path) -> dict:
        arm, base = (read_jsonl(p, required=("prompt", "aligned")) for p in inputs)
        if [r["prompt"] for r in arm] != [r["prompt"] for r in base]:
            raise InputError("the arm and the baseline were evaluated on different prompts", file=str(inputs[0]))
        wr = evaluate.judged_win_rate(cfg, [r["prompt"] for r in arm], [r["aligned"] for r in arm],
                                      [r["aligned"] for r in base])
        write_json(o / "win_rate.json", wr)
        return {"win_rate": wr["aligned_vs_base"]}

    run_stage("vs_baseline", out, config=cfg.sections("model", "feedback", "eval"), inputs=inputs, body=body,
              main_only=True)
    return read_json(out / "win_rate.json")


def interval(wr: dict | None) -> dict | None:
    """A win_rate result as compare.json writes it: rate, 95% interval, n, judge position consistency."""
    if not wr or wr.get("aligned_vs_base") is None:
        return None
    return {"rate": wr["aligned_vs_base"], "ci95": wr["ci95"], "n": wr["n"],
            "judge_position_consistency": wr.get("judge_position_consistency")}


def arm_summary(cfg: Config, run_dir: Path, arm: str, rl_dir: Path, ev_dir: Path, vs: dict | None) -> dict:
    """One arm's row of compare.json, read from its rl and eval stages (and its win rate vs the baseline arm)."""
    m, rlm = read_json(ev_dir / "metrics.json"), read_json(rl_dir / "metrics.json")
    al = m["reward"]["aligned"]
    return {
        "reward_model": arm_config(cfg, arm).rl.reward_model,
        "trained_with": "holistic preference model" if arm == BASELINE_ARM else f"{arm} of the K preference models",
        "algo": rlm.get("algo"),
        "policy": str(rl_dir / "policy"),
        "reused_run_rl": rl_dir == run_dir / "rl",
        "train_s": wall_s(rl_dir),
        "eval_s": wall_s(ev_dir),
        "train_reward_first": rlm.get("scalarized_reward_first"),  # under the arm's own reward: not comparable
        "train_reward_last": rlm.get("scalarized_reward_last"),
        "scalarized": al["scalarized"],
        "per_objective": al["per_objective"],
        "refusal": {k: m["refusal_rate"][k]["aligned"] for k in ("harmful", "benign")},
        "kl_to_base": m["kl_to_base"],
        "mean_response_tokens": m["mean_response_tokens"]["aligned"],
        "win_rate_vs_base": interval(m["win_rate"]),
        "win_rate_vs_baseline": vs,
        "eval_dir": str(ev_dir),
    }


def compare(cfg: Config, run_dir: Path, scalarizers: list[str], baseline: bool, out_dir: Path | None = None) -> dict:
    """Train and evaluate every arm (resumable), then write OUT/compare.json and OUT/compare.html."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "compare"
    for rel, stage in (("sft/model/adapter_config.json", "sft"), ("rm/objectives.json", "rm"),
                       ("prompts/eval.jsonl", "prompts")):
        if not (run_dir / rel).is_file():
            raise InputError(f"compare needs the run's finished {stage} stage: run `morlaif {stage} --run {run_dir}`",
                             file=str(run_dir / rel))
    if baseline:  # checked before any arm trains
        rl.check_holistic(arm_config(cfg, BASELINE_ARM), run_dir)
    arms = list(scalarizers) + ([BASELINE_ARM] if baseline else [])
    t0 = time.monotonic()
    dirs: dict[str, tuple[Path, Path]] = {}
    for arm in arms:  # each arm: its rl stage, then its eval stage; a finished one is skipped
        t = time.monotonic()
        rl_dir = train_arm(cfg, run_dir, arm, out_dir / arm)
        dirs[arm] = (rl_dir, eval_arm(cfg, run_dir, rl_dir, out_dir / arm))
        if is_main_process():
            print(f"[compare] {arm}: {time.monotonic() - t:.0f} s ({dirs[arm][0]}, {dirs[arm][1]})", flush=True)
    vs: dict[str, dict | None] = {arm: None for arm in arms}
    if baseline and cfg.eval.win_rate:  # a stage on every process (they wait for the main one, which judges)
        for arm in scalarizers:
            vs[arm] = interval(vs_baseline(cfg, dirs[arm][1], dirs[BASELINE_ARM][1], out_dir / arm / "vs_baseline"))
    if not is_main_process():
        return {}
    first = read_json(dirs[arms[0]][1] / "metrics.json")  # every arm's eval holds the same base and prompts
    result = {
        "run": str(run_dir),
        "yardstick": {"objectives": first["objectives"], "scalarizer": cfg.rl.scalarizer, "weights": cfg.rl.weights,
                      "normalized": cfg.rl.normalize},
        "algo": cfg.rl.algo,
        "steps": cfg.rl.steps,
        "seed": cfg.seed,
        "n_prompts": first["n_prompts"],
        "baseline_arm": BASELINE_ARM if baseline else None,
        "base": {"scalarized": first["reward"]["base"]["scalarized"],
                 "per_objective": first["reward"]["base"]["per_objective"],
                 "refusal": {k: first["refusal_rate"][k]["base"] for k in ("harmful", "benign")},
                 "mean_response_tokens": first["mean_response_tokens"]["base"]},
        "arms": {arm: arm_summary(cfg, run_dir, arm, *dirs[arm], vs[arm]) for arm in arms},
        "notes": [
            "every arm is measured with the run's preference models and the run's scalarizer and weights (the "
            "yardstick), on the run's held-out prompts with the same seeds; train_reward_* are each arm's own reward",
            "win rates: the judge, both orders, ties half, 95% bootstrap interval over prompts",
        ],
    }
    result["wall_s_this_call"] = time.monotonic() - t0
    write_json(out_dir / "compare.json", result)
    atomic_write_text(out_dir / "compare.html", report.compare_page(result, out_dir))
    if out_dir == run_dir / "compare":  # the run's report links it
        report.write(run_dir)
    return result


def print_table(res: dict) -> None:
    """The compare table on the terminal (compare.html has the same with the figure)."""
    def ci(w):
        return "n/a" if not w else f"{w['rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]"

    head = (f"{'arm':22s} {'scalarized':>10s} {'refusal':>8s} {'over-ref':>8s} {'KL':>7s} {'tokens':>7s} "
            f"{'win vs base':>18s} {'win vs baseline':>18s} {'train s':>8s}")
    print(f"compare: {res['run']} (yardstick: {res['yardstick']['scalarizer']}; {res['n_prompts']['harmful']} harmful "
          f"+ {res['n_prompts']['benign']} benign held-out prompts)")
    print(head)
    b = res["base"]
    print(f"{'base':22s} {b['scalarized']:10.3f} {b['refusal']['harmful']:8.3f} {b['refusal']['benign']:8.3f} "
          f"{'':>7s} {b['mean_response_tokens']:7.1f}")
    for arm, a in res["arms"].items():
        train = "n/a" if a["train_s"] is None else f"{a['train_s']:.0f}" + (" (RUN/rl)" if a["reused_run_rl"] else "")
        print(f"{arm:22s} {a['scalarized']:10.3f} {a['refusal']['harmful']:8.3f} {a['refusal']['benign']:8.3f} "
              f"{a['kl_to_base']:7.3f} {a['mean_response_tokens']:7.1f} {ci(a['win_rate_vs_base']):>18s} "
              f"{ci(a['win_rate_vs_baseline']):>18s} {train:>8s}")
