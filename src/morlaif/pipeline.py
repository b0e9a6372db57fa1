"""The pipeline: its stages in order, and `morlaif run` (every stage, skipping completed ones and
resuming interrupted ones).

Each stage is a module with `run(cfg, run_dir) -> Path`: it reads earlier stages' artifacts from
the run directory and writes its own sub-directory, ending with a manifest (`artifacts.run_stage`).

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

from morlaif.artifacts import (atomic_write_text, config_changes, config_diff, link_stage, read_json, read_manifest, refusal,
                               set_aside, sha256_file, stage_lock, write_json)
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
# A branch runs the report again rather than linking it: it writes RUN/report.html, outside its directory.
NOT_LINKED = {"report"}
BRANCH_FILE = "branch.json"  # NEW/branch.json: the run a branch was made from


def stage_module(name: str):
    return importlib.import_module(STAGES[name])


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """RUN/config.yaml: the fully resolved config the run's stages read (`--run DIR` defaults to it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def _recorded(cfg: Config, manifest: dict) -> tuple[dict, dict]:
    """(the config a stage's manifest recorded, what `cfg` gives the same sections now)."""
    recorded = manifest.get("config") or {}
    return recorded, cfg.sections(*[k for k in recorded if k != "seed" and k in Config.model_fields])


def recorded_changes(cfg: Config, manifest: dict) -> list[str]:
    """Settings of `cfg` that differ from those a stage's manifest recorded (for the sections it depends on)."""
    return config_changes(*_recorded(cfg, manifest))


def check_stages(cfg: Config, run_dir: Path, names: list[str], force: set[str], force_flag: str) -> None:
    """Refuse (InputError, one line) when a stage of `names` holds work made with other settings than `cfg`
    gives it, unless `force` covers it: a forced stage and every stage after it in `names` run anew.
    Called before config.yaml is rewritten, so a refused command leaves the run as it was."""
    forced = False
    for name in names:
        forced = forced or name in force
        man = read_manifest(run_dir / name)
        if forced or not man:
            continue
        diff = config_diff(*_recorded(cfg, man))
        if diff:
            sets = "".join(f" --set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, _, v in diff[:3])
            raise refusal(name, run_dir / name, config_changes(*_recorded(cfg, man)),
                          force_flag.format(stage=name), sets)


def force_stage(run_dir: Path, name: str, say) -> None:
    """Move a stage's directory to RUN/.replaced/ (main process) so that it runs anew."""
    if is_main_process():
        with stage_lock(run_dir / name):
            aside = set_aside(run_dir / name)
        if aside:
            say(f"[{name}] the previous {name}/ moved to {aside}")
    wait_for_everyone()  # no process decides to skip the stage from the directory being moved


def reusable(cfg: Config, run_dir: Path, source: Path, name: str) -> Path | None:
    """The source run's stage directory when it is finished and would be made the same way here: the same
    settings and, for each input it recorded, the same content at the same place in this run."""
    src = source / name
    man = read_manifest(src)
    if not man or man.get("status") != "complete" or recorded_changes(cfg, man):
        return None
    for key, digest in (man.get("inputs") or {}).items():
        p = Path(key) if Path(key).is_absolute() else run_dir / key
        if not p.exists() or sha256_file(p) != digest:
            return None
    return src


def link_from(cfg: Config, run_dir: Path, source: Path, name: str, say) -> bool:
    """Link the source run's stage into this run when it is reusable; True when it was."""
    dst = run_dir / name
    if name in NOT_LINKED or read_manifest(dst) or (dst.exists() and any(dst.iterdir())):
        return False
    src = reusable(cfg, run_dir, source, name)
    if src is not None and is_main_process():
        with stage_lock(dst):
            link_stage(src, dst)
        say(f"[{name}] reused from {src} (linked)")
    wait_for_everyone()
    return src is not None


def branch_source(run_dir: Path) -> Path | None:
    """The run a branch was made from (NEW/branch.json), or None."""
    f = run_dir / BRANCH_FILE
    return Path(read_json(f)["from"]) if f.is_file() else None


def start_branch(run_dir: Path, source: Path) -> None:
    """Make `run_dir` a branch of `source`: refused when it is another run, or a branch of another one."""
    source = source.resolve()
    if not (source / "config.yaml").is_file():
        raise InputError("not a run directory (no config.yaml)", file=str(source), key="--from")
    if source == run_dir.resolve():
        raise InputError("--from and --out name the same run", key="--from")
    known = branch_source(run_dir) if run_dir.is_dir() else None
    if known is None and run_dir.is_dir() and any(run_dir.iterdir()):
        raise InputError("already holds a run that is not a branch: choose a new --out", file=str(run_dir),
                         key="--out")
    if known is not None and known != source:
        raise InputError(f"is a branch of {known}, not of {source}", file=str(run_dir), key="--from")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json(run_dir / BRANCH_FILE, {"from": str(source), "created": time.time()})


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
        elif source is not None and link_from(cfg, run_dir, source, name, say):
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
