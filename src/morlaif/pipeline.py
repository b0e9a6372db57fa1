"""The pipeline: its stages in order, and `morlaif run` (every stage, skipping completed ones and
resuming interrupted ones).

Each stage is a module with `run(cfg, run_dir) -> Path`: it reads earlier stages' artifacts from
the run directory and writes its own sub-directory, ending with a manifest. When a stage is done,
resumed, refused, forced or linked from another run is `morlaif.lifecycle`'s one rule.

Finished work is never thrown away:
- A stage made with other settings than the config now gives it is refused before anything runs,
  with one line naming the changed keys; `--force STAGE` redoes it (and every later stage), moving
  the old directories to RUN/.replaced/.
- `morlaif run --from RUN --out NEW` branches: NEW starts from RUN's config, and each of RUN's
  finished stages that the change leaves alone (same settings, same inputs) is linked into NEW
  instead of run again; the first stage that differs, and every later one, runs in NEW.
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
from morlaif.lifecycle import branch_source, check_stages, force_stage, link_from, read_manifest, start_branch
from morlaif.processes import is_main_process
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
# A branch runs the report again rather than linking it: it writes RUN/report.html, outside its directory.
NOT_LINKED = {"report"}


def stage_module(name: str):
    return importlib.import_module(STAGES[name])


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """RUN/config.yaml: the fully resolved config the run's stages read (`--run DIR` defaults to it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def run_all(cfg: Config, run_dir: Path, force: set[str] | None = None, source: Path | None = None) -> int:
    """Every stage in order. `force`: stages to redo (with every later one; 'all' for every stage).
    `source`: the run this one branches from (`--from`); its reusable stages are linked, not run."""
    console = Console(stderr=True)
    force = set(STAGES) if force and "all" in force else set(force or ())
    unknown = force - set(STAGES)
    if unknown:
        raise InputError(f"unknown stage {sorted(unknown)} (stages: {', '.join(STAGES)}, all)", key="--force")
    main = is_main_process()  # under accelerate launch every process runs this loop; one writes
    say = (lambda msg: console.print(msg, markup=False, highlight=False)) if main else (lambda msg: None)
    check_stages(cfg, run_dir, list(STAGES), force, "--force {stage} (later stages follow)")
    if source is not None:
        start_branch(run_dir, source)
    write_run_config(cfg, run_dir)
    source = branch_source(run_dir)
    times: dict[str, float] = {}
    t0 = time.monotonic()
    redo = False  # once a stage has run anew, every later one is redone: its inputs have changed
    for name in STAGES:
        if main:
            console.rule(f"[bold]{name}")
        t = time.monotonic()
        redo = redo or name in force
        if redo:
            force_stage(run_dir, name, say)
        elif source is not None and name not in NOT_LINKED and link_from(cfg, run_dir, source, name, say):
            times[name] = time.monotonic() - t
            continue
        before = (read_manifest(run_dir / name) or {}).get("started")
        stage_module(name).run(cfg, run_dir)
        redo = redo or (read_manifest(run_dir / name) or {}).get("started") != before
        times[name] = time.monotonic() - t
    total = time.monotonic() - t0
    if not main:
        return 0
    console.print(summary_table(run_dir, times, total))
    atomic_write_text(run_dir / "timings.json", json.dumps({"stages_s": times, "total_s": total}, indent=2) + "\n")
    return 0
