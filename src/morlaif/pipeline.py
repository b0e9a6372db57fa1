"""`morlaif run`: every stage in order, skipping completed ones and resuming interrupted ones."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from morlaif.artifacts import atomic_write_text, is_main_process, wait_for_everyone
from morlaif.config import Config

ORDER = ["prompts", "sft", "feedback", "rm", "rl", "eval", "report"]


def run_all(cfg: Config, run_dir: Path, force: set[str] | None = None) -> int:
    from rich.console import Console

    from morlaif.cli import STAGES

    console = Console(stderr=True)
    force = force or set()
    unknown = force - set(ORDER)
    if unknown:
        from morlaif.errors import InputError

        raise InputError(f"unknown stage {sorted(unknown)} (stages: {', '.join(ORDER)})", key="--force")
    main = is_main_process()  # under accelerate launch every process runs this loop; one writes
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    times: dict[str, float] = {}
    t0 = time.time()
    for name in ORDER:
        if name in force:
            if main:
                _invalidate(run_dir, name)
            wait_for_everyone()  # no process decides to skip the stage from the manifest being removed
        if main:
            console.rule(f"[bold]{name}")
        t = time.time()
        importlib.import_module(STAGES[name]).run(cfg, run_dir)
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
    if stage == "report":
        m = run_dir / "report" / "manifest.json"
    if m.is_file():
        m.unlink()


def summary_table(run_dir: Path, times: dict[str, float], total: float):
    """The final base-vs-aligned table printed after a run (numbers read from eval/metrics.json)."""
    from rich.table import Table

    table = Table(title=f"morlaif run: {run_dir}  ({total / 60:.1f} min)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("aligned", justify="right")
    mpath = run_dir / "eval" / "metrics.json"
    if mpath.is_file():
        m = json.loads(mpath.read_text())
        rb, ra = m["reward"]["base"], m["reward"]["aligned"]
        table.add_row("scalarized reward", _f(rb["scalarized"]), _f(ra["scalarized"]))
        for k in m["objectives"]:
            table.add_row(f"  {k}", _f(rb["per_objective"].get(k)), _f(ra["per_objective"].get(k)))
        rr = m["refusal_rate"]
        table.add_row("refusal, harmful prompts", _f(rr["harmful"]["base"]), _f(rr["harmful"]["aligned"]))
        table.add_row("refusal, benign prompts", _f(rr["benign"]["base"]), _f(rr["benign"]["aligned"]))
        wr = m.get("win_rate") or {}
        if wr.get("aligned_vs_base") is not None:
            lo, hi = wr["ci95"]
            table.add_row("win rate aligned vs base (judge)", "", f"{wr['aligned_vs_base']:.2f} [{lo:.2f}, {hi:.2f}]")
        table.add_row("KL to base (nats/response)", "", _f(m.get("kl_to_base")))
        mt = m["mean_response_tokens"]
        table.add_row("mean response tokens", _f(mt["base"], 1), _f(mt["aligned"], 1))
    for name, s in times.items():
        table.add_row(f"[dim]time {name}[/dim]", "", f"[dim]{s:.0f} s[/dim]")
    return table


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"
