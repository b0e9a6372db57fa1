"""Stage `rl`: policy optimisation on the scalarized multi-objective reward (DESIGN.md §6).

RUN/rl/ gets policy/ (a LoRA adapter stacked on RUN/sft/model, so
`models.load_model("RUN/rl/policy")` gives the aligned policy), log.jsonl (one row per
optimisation step, DESIGN §8) and metrics.json (the final summary). PPO is ours (`morlaif.ppo`);
GRPO / RLOO / DPO / IPO / KTO go through TRL (`morlaif.trl_algos`).
"""

from __future__ import annotations

from pathlib import Path

from morlaif.artifacts import is_main_process, run_stage, write_json
from morlaif.config import Config
from morlaif.errors import InputError


def _ppo(cfg: Config, run_dir: Path, stage_dir: Path) -> dict:
    from morlaif import ppo

    return ppo.train(cfg, run_dir, stage_dir)


def _trl(cfg: Config, run_dir: Path, stage_dir: Path) -> dict:
    from morlaif import trl_algos  # imported only when asked: TRL is slow to import

    return trl_algos.run(cfg, run_dir, stage_dir)


def run(cfg: Config, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    stage_dir = run_dir / "rl"
    inputs = [run_dir / "rm" / "metrics.json", run_dir / "sft" / "model" / "adapter_config.json"]
    if cfg.rl.algo in ("dpo", "ipo", "kto"):  # offline algorithms train on the AI labels themselves
        inputs.append(run_dir / "feedback" / "labels.jsonl")
    for p in inputs:
        if not p.is_file():
            stage = {"rm": "rm", "sft": "sft", "feedback": "feedback"}[p.relative_to(run_dir).parts[0]]
            raise InputError(f"missing input of the rl stage: run `morlaif {stage} --run {run_dir}` first", file=str(p))
    if (run_dir / "rm" / "objectives.json").is_file():  # before run_stage, which would clear a finished rl/ first
        from morlaif.reward import check_trained_objectives

        check_trained_objectives(run_dir, cfg)
    algos = {"ppo": _ppo, "grpo": _trl, "rloo": _trl, "dpo": _trl, "ipo": _trl, "kto": _trl}

    def body(out: Path) -> dict:
        summary = algos[cfg.rl.algo](cfg, run_dir, out)  # every launched process trains; the main one writes
        if is_main_process():
            write_json(out / "metrics.json", summary)
        return summary

    sections = ("model", "constitution", "generation", "rl")
    return run_stage(
        "rl",
        stage_dir,
        config={"seed": cfg.seed, **{n: getattr(cfg, n).model_dump(mode="json") for n in sections}},
        config_hash=cfg.section_hash(*sections),
        inputs=inputs,
        body=body,
    )
