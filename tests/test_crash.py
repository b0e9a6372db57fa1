"""SIGKILL at random points of each long stage, then resume: nothing lost, nothing doubled, same artifacts.

A reference run (`morlaif run` on the tiny config, one process, never interrupted) is compared with
runs of `morlaif STAGE --run DIR` in fresh processes, each killed with SIGKILL at a seeded random
moment after its stage started (twice), then run to completion. Everything is real: real processes,
a real SIGKILL (no handler can run), the CLI's own resume. With the same seed the finished artifacts
must equal the reference's exactly: shard rows, labels, preference-model and policy weights, the
PPO log. Generation and labelling resume from their shards; PPO from its last checkpoint (weights,
optimizer, RNG, β); SFT and preference-model training are short and restart from their seed.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from morlaif.artifacts import read_jsonl

from conftest import TINY

pytestmark = pytest.mark.slow

# More, smaller chunks than tiny.yaml, so kills land between shard appends and checkpoints.
SETS = ["generation.batch_size=2", "feedback.label_chunk=6", "rl.steps=4", "rl.save_every=1", "rm.epochs=6.0"]
STAGES = ["sft", "feedback", "rm", "rl"]
BEFORE = {"sft": ["prompts"], "feedback": ["prompts", "sft"], "rm": ["prompts", "sft", "feedback"],
          "rl": ["prompts", "sft", "feedback", "rm"]}
KILLS = 2
# Where a kill is aimed: once a file of the stage holds at least n rows, SIGKILL after a random delay, so
# kills land inside a chunk, a PPO step, a training run, a save. rm writes nothing until it is done (it
# restarts from its seed): it is killed at a random moment after it began.
ANCHORS = {
    "sft": [("generations.jsonl", n) for n in (0, 2, 4, 6, 8)],  # 8 prompts in chunks of 2; 8 = training
    "feedback": [("pairs.shard.jsonl", n) for n in range(4)] + [("cache.jsonl", n) for n in range(0, 60, 6)],
    "rm": [(None, 0)],
    "rl": [("log.jsonl", n) for n in range(4)],  # one row per PPO step, then its checkpoint
}
TIME_KEYS = ("step_time_s", "step_cpu_s", "time_rollout_s", "time_reward_s")
RESULTS: dict[str, dict] = {}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, whatever is installed
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "morlaif.cli", *args, "--config", str(TINY), *[x for s in SETS for x in ("--set", s)]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: every stage in one process, as `morlaif run` does it."""
    root = tmp_path_factory.mktemp("crash")
    ref = root / "ref"
    t = time.time()
    out = subprocess.run(_cli("run", "--out", str(ref)), env=_env(), cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\nreference run: {time.time() - t:.1f} s")
    return root, ref


def _manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _progress(stage_dir: Path) -> str:
    """What a killed stage had written: shard rows, checkpoint step, finished sub-artifacts."""
    parts = []
    for name in ("generations.jsonl", "pairs.shard.jsonl", "cache.jsonl", "log.jsonl"):
        if (stage_dir / name).exists():
            parts.append(f"{name.split('.')[0]} {len(read_jsonl(stage_dir / name, shard=True))}")
    state = stage_dir / "checkpoint" / "state.json"
    if state.exists():
        parts.append(f"ckpt step {json.loads(state.read_text())['step']}")
    for name in ("model", "policy", "metrics.json"):
        if (stage_dir / name).exists():
            parts.append(name)
    return ", ".join(parts) or "nothing yet"


def _count(path: Path) -> int:
    return len(read_jsonl(path, shard=True)) if path.exists() else 0


def _kill_at_random(run: Path, stage: str, anchor: tuple[str | None, int], delay: float, log) -> tuple[bool, str]:
    """Start `morlaif STAGE`; once its stage began and the anchor file holds n rows, SIGKILL it after `delay` s.
    Returns (killed, what was on disk)."""
    t_spawn = time.time()
    proc = subprocess.Popen(_cli(stage, "--run", str(run)), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    name, n = anchor
    try:
        while proc.poll() is None:  # this process's stage started (imports and config first), anchor reached
            m = _manifest(run / stage)
            if m and m["status"] == "running" and m["started"] >= t_spawn and (
                    name is None or _count(run / stage / name) >= n):
                break
            time.sleep(0.02)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if killed:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 0
    return killed, _progress(run / stage)


def _rows(p: Path) -> list[dict]:
    return read_jsonl(p, shard=True)


def _same_rows(a: Path, b: Path, drop=()) -> None:
    ra = [{k: v for k, v in r.items() if k not in drop} for r in _rows(a)]
    rb = [{k: v for k, v in r.items() if k not in drop} for r in _rows(b)]
    assert ra == rb, f"{a} differs from {b}"


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), a
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a}:{k} max diff {(ta[k] - tb[k]).abs().max().item()}"


def _no_loss_no_dup(stage_dir: Path, stage: str) -> tuple[int, int]:
    """(rows, duplicates) over the stage's append-only files, by their natural key."""
    keyed = {"sft": [("generations.jsonl", "prompt")],
             "feedback": [("pairs.shard.jsonl", "pair_id"), ("cache.jsonl", "key")],
             "rl": [("log.jsonl", "step")], "rm": []}[stage]
    n = dup = 0
    for name, key in keyed:
        ks = [r[key] for r in _rows(stage_dir / name)] if (stage_dir / name).exists() else []
        n += len(ks)
        dup += len(ks) - len(set(ks))
    return n, dup


def _compare(ref: Path, run: Path, stage: str) -> None:
    r, s = ref / stage, run / stage
    if stage == "sft":
        for f in ("generations.jsonl", "data.jsonl", "dropped.jsonl"):
            _same_rows(r / f, s / f)
        _same_tensors(r / "model" / "adapter_model.safetensors", s / "model" / "adapter_model.safetensors")
        mr, ms = (json.loads((d / "metrics.json").read_text()) for d in (r, s))
        assert mr["loss_curve"] == ms["loss_curve"] and mr["rows"] == ms["rows"]
    elif stage == "feedback":
        for f in ("pairs.shard.jsonl", "pairs.jsonl", "labels.jsonl"):
            _same_rows(r / f, s / f)
        assert sorted(c["key"] for c in _rows(r / "cache.jsonl")) == sorted(c["key"] for c in _rows(s / "cache.jsonl"))
        mr, ms = (json.loads((d / "metrics.json").read_text()) for d in (r, s))
        for k in ("labels", "position_consistency", "calibration_agreement", "label_entropy"):
            assert mr[k] == ms[k], k
    elif stage == "rm":
        for p in sorted(r.rglob("*.safetensors")):
            _same_tensors(p, s / p.relative_to(r))
        for f in ("norm.json", "objectives.json"):
            assert json.loads((r / f).read_text()) == json.loads((s / f).read_text()), f
        mr, ms = (json.loads((d / "metrics.json").read_text()) for d in (r, s))
        for k in ("accuracy", "single_objective_accuracy", "training"):
            assert mr[k] == ms[k], k
        # float64 statistics of equal weights (LAPACK lstsq, whose last bits vary from process to process)
        assert mr["regression_weights"] == pytest.approx(ms["regression_weights"], rel=1e-9, abs=1e-15)
        assert [pytest.approx(row, rel=1e-9, abs=1e-12) for row in mr["correlation"]] == ms["correlation"]
    else:
        _same_rows(r / "log.jsonl", s / "log.jsonl", drop=TIME_KEYS)
        _same_tensors(r / "policy" / "adapter_model.safetensors", s / "policy" / "adapter_model.safetensors")
        _same_tensors(r / "value_head.safetensors", s / "value_head.safetensors")
        assert not (s / "checkpoint").exists()


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_then_resume_equals_uninterrupted(reference, stage):
    root, ref = reference
    run = root / f"killed-{stage}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for s in BEFORE[stage]:
        shutil.copytree(ref / s, run / s)
    wall = json.loads((ref / stage / "manifest.json").read_text())["wall_time_s"]
    rng = random.Random(1000 + STAGES.index(stage))
    kills = []
    with open(root / f"{stage}.log", "w") as log:
        for k in range(KILLS):
            ahead = [(f, n) for f, n in ANCHORS[stage] if f is None or n > _count(run / stage / f)]
            ahead = ahead or ANCHORS[stage][-1:]
            # the first kill early in the stage, the next one later: they land in different phases
            anchor = rng.choice(ahead[: max(1, len(ahead) // 2)] if k < KILLS - 1 else ahead[len(ahead) // 2:])
            delay = rng.uniform(0.05, 0.6) * wall if anchor[0] is None else rng.uniform(0.0, 0.3)
            killed, progress = _kill_at_random(run, stage, anchor, delay, log)
            # killed inside the stage (not after it finished, while the process was exiting): the stage
            # does not look complete, and its shards hold whole rows only
            if killed and _manifest(run / stage)["status"] != "complete":
                assert _manifest(run / stage)["status"] == "running"
                where = "start" if anchor[0] is None else f"{anchor[0].split('.')[0]}>={anchor[1]}"
                kills.append(f"{where} +{delay:.1f}s: {progress}")
            elif _manifest(run / stage)["status"] == "complete":  # finished before the kill
                if kills:
                    break  # this finished run resumed from a kill: its artifacts are the ones to compare
                shutil.rmtree(run / stage)  # nothing was interrupted yet: start afresh and try again
            n, dup = _no_loss_no_dup(run / stage, stage)
            assert dup == 0, f"duplicated rows after kill {k}"
        done = subprocess.run(_cli(stage, "--run", str(run)), env=_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=600)
    assert done.returncode == 0, (root / f"{stage}.log").read_text()[-3000:]
    assert _manifest(run / stage)["status"] == "complete"
    leftovers = [p.name for p in (run / stage).rglob("*") if ".tmp" in p.name or p.name == "checkpoint"]
    assert not leftovers, leftovers
    rows_ref, _ = _no_loss_no_dup(ref / stage, stage)
    rows, dup = _no_loss_no_dup(run / stage, stage)
    assert (rows, dup) == (rows_ref, 0)  # no row lost, none doubled
    _compare(ref, run, stage)
    RESULTS[stage] = {"kills": len(kills), "at": kills, "rows": rows, "lost": rows_ref - rows, "dup": dup,
                      "wall": wall}
    assert kills, f"no kill landed inside the {stage} stage (all {KILLS} runs finished first)"


def test_crash_table(reference, capsys):
    """What the SIGKILL tests above did, as a table (run with -s to see it): every stage was killed
    inside its body at least once and resumed with no row lost or doubled."""
    if set(RESULTS) != set(STAGES):
        pytest.skip(f"the table needs every stage's crash test; ran: {sorted(RESULTS)}")
    with capsys.disabled():
        print("\nstage     body s  kills  rows  lost  dup  SIGKILL at (anchor + delay): what was on disk")
        for stage, r in RESULTS.items():
            print(f"{stage:9s} {r['wall']:6.1f} {r['kills']:6d} {r['rows']:5d} {r['lost']:5d} {r['dup']:4d}  "
                  f"{' | '.join(r['at'])}")
    assert {s: (r["kills"] >= 1, r["lost"], r["dup"]) for s, r in RESULTS.items()} == {s: (True, 0, 0) for s in STAGES}
    assert (RESULTS["sft"]["rows"], RESULTS["rl"]["rows"]) == (8, 4)  # 8 SFT prompts, rl.steps=4 log rows


def test_reference_run_has_no_pickles_and_writes_nothing_outside(reference):
    """Our artifacts are safetensors/JSON only; the run wrote nothing beside its run directory."""
    root, ref = reference
    pickles = [p for p in ref.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert not pickles, pickles
    assert any(ref.rglob("*.safetensors"))
    # the run's working directory (root) holds only run directories and logs of this module
    assert all(p.is_dir() or p.suffix == ".log" for p in root.iterdir()), list(root.iterdir())
