"""The pipeline: its stages in order, and `morlaif run` (every stage, skipping completed ones and
resuming interrupted ones).

Each stage is a module with `run(cfg, run_dir) -> Path`: it reads earlier stages' artifacts from
the run directory and writes its own sub-directory, ending with a manifest (`artifacts.run_stage`).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from rich.console import Console

from morlaif.artifacts import atomic_write_text
from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.processes import is_main_process, wait_for_everyone
from morlaif.report import summary_table

# Stage name -> module, in pipeline order. Imported when the stage runs: `import morlaif` and
# `morlaif --help` stay light (the stage modules load torch and transformers).
STAGES = {
    "prompts": "morlaif.prompts",  # train / eval prompt splits
    "sft": "morlaif.sft",  # SL-CAI critique/revision data + LoRA SFT
    "feedback": "morlaif.feedback",  # response pairs + per-objective AI labels
    "rm": "morlaif.reward",  # one preference model per objective
    "rl": "morlaif.rl",  # policy optimisation on the scalarized reward
    "eval": "morlaif.evaluate",  # base vs aligned on held-out prompts
    "report": "morlaif.report",  # report.html
}


def stage_module(name: str):
    return importlib.import_module(STAGES[name])


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """RUN/config.yaml: the fully resolved config the run's stages read (`--run DIR` defaults to it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def run_all(cfg: Config, run_dir: Path, force: set[str] | None = None) -> int:
    console = Console(stderr=True)
    force = force or set()
    unknown = force - set(STAGES)
    if unknown:
        raise InputError(f"unknown stage {sorted(unknown)} (stages: {', '.join(STAGES)})", key="--force")
    main = is_main_process()  # under accelerate launch every process runs this loop; one writes
    write_run_config(cfg, run_dir)
    times: dict[str, float] = {}
    t0 = time.time()
    for name in STAGES:
        if name in force:
            if main:
                _invalidate(run_dir, name)
            wait_for_everyone()  # no process decides to skip the stage from the manifest being removed
        if main:
            console.rule(f"[bold]{name}")
        t = time.time()
        stage_module(name).run(cfg, run_dir)
        times[name] = time.time() - t
    total = time.time() - t0
    if not main:
        return 0
    console.print(summary_table(run_dir, times, total))
    atomic_write_text(run_dir / "timings.json", json.dumps({"stages_s": times, "total_s": total}, indent=2) + "\n")
    return 0


def _invalidate(run_dir: Path, stage: str) -> None:
    """--force STAGE: mark the stage's manifest stale so it runs again (its outputs are replaced)."""
    m = run_dir / stage / "manifest.json"
    if m.is_file():
        m.unlink()
