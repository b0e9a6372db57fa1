"""Several processes: `accelerate launch` (2 CPU processes over gloo) and a local 2-worker Ray cluster.

The launched runs use the shipped ddp accelerate config, the one the README tells users to launch with.
Each launched process reports a checksum of its trained weights (rm/ and rl/metrics.json
`param_checksums`); DDP must keep them equal. The run's artifacts must have the shape of a
single-process run: the same files, the same JSON keys, the same number of JSONL rows.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morlaif.artifacts import read_jsonl
from morlaif.errors import InputError
from morlaif.judge import make_judge
from morlaif.processes import per_process

from morlaif.config import accelerate_config_path

from conftest import ROOT, TINY

DDP = accelerate_config_path("ddp")


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    want = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    for name, kind in want.items():
        c = load_config_from_file(str(accelerate_config_path(name)))
        assert c.distributed_type.value == kind and c.num_processes == 8 and c.num_machines == 1, name
    assert load_config_from_file(str(accelerate_config_path("deepspeed_zero3"))).deepspeed_config[
        "zero_stage"] == 3


def test_per_process_share(monkeypatch):
    assert per_process(8, "rl.batch_size") == 8
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert per_process(8, "rl.batch_size") == 2
    with pytest.raises(InputError, match="rl.mini_batch_size"):
        per_process(6, "rl.mini_batch_size")


def test_own_loops_refuse_sharded_configs(monkeypatch):
    """FSDP / DeepSpeed shard the policy our rollouts `generate` from: PPO and the preference models
    refuse them (on CPU accelerate itself falls back to DDP, so a stand-in plays the GPU case)."""
    import accelerate
    from accelerate.utils import DistributedType

    from morlaif import processes

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(accelerate, "Accelerator", lambda cpu, mixed_precision=None, kind=kind: type("A", (), {"distributed_type": kind}))
        with pytest.raises(InputError, match="accelerate ddp"):
            processes.make_accelerator("cpu")


def test_readme_documents_the_tested_launch():
    """The README's 8-GPU commands are the ones `launch` below runs with 2 CPU processes."""
    text = (ROOT / "README.md").read_text()
    prefix = 'accelerate launch --config_file "$(morlaif config --accelerate ddp)" --num_processes 8 -m morlaif.cli '
    assert prefix + "run --config my.yaml --out runs/big" in text
    assert prefix + "rl --run runs/big --algo ppo" in text
    assert DDP == ROOT / "src/morlaif/recipes/accelerate/ddp.yaml"


# ----------------------------------------------------------------------------- accelerate launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, timeout: float = 400) -> float:
    """`accelerate launch --config_file "$(morlaif config --accelerate ddp)" --num_processes 2 -m morlaif.cli ARGS`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "morlaif.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: two processes share the cores
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return time.time() - t


def shape(x):
    """What must match between a 1- and a 2-process run: dict keys and list lengths, not values
    (param_checksums holds one checksum per process)."""
    if isinstance(x, dict):
        return {k: None if k == "param_checksums" else shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x]
    return None


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)).split("events.out.tfevents")[0] for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from morlaif.cli import main

    base = tmp_path_factory.mktemp("dist")
    assert main(["run", "--config", str(TINY), "--out", str(base / "one")]) == 0
    wall = launch("run", "--config", str(TINY), "--out", str(base / "two"))
    print(f"2-process `morlaif run` (tiny): {wall:.1f} s")
    return base / "one", base / "two"


@pytest.mark.distributed
def test_two_process_run_has_the_shape_of_one(runs):
    one, two = runs
    assert files(two) == files(one)
    for p in sorted(one.rglob("*.json")):
        rel = p.relative_to(one)
        assert shape(json.loads((two / rel).read_text())) == shape(json.loads(p.read_text())), rel
    for p in sorted(one.rglob("*.jsonl")):
        rel = p.relative_to(one)
        a, b = read_jsonl(p), read_jsonl(two / rel)
        assert len(b) == len(a), rel  # e.g. one process generated: no duplicated shard rows
        assert [sorted(r) for r in b] == [sorted(r) for r in a], rel
    for stage in ("prompts", "sft", "feedback", "rm", "rl", "eval", "report"):
        assert json.loads((two / stage / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.distributed
def test_two_processes_keep_identical_weights(runs):
    from safetensors.torch import load_file

    one, two = runs
    for stage in ("rm", "rl"):
        m1, m2 = (json.loads((r / stage / "metrics.json").read_text()) for r in (one, two))
        assert m1["processes"] == 1 and len(m1["param_checksums"]) == 1
        assert m2["processes"] == 2 and len(m2["param_checksums"]) == 2
        assert m2["param_checksums"][0] == m2["param_checksums"][1], stage  # DDP kept the ranks in sync
        print(f"{stage}: checksums per rank {m2['param_checksums']}")
    # PPO really trained under DDP: the policy adapter moved off its zero init.
    lora_b = [t for k, t in load_file(two / "rl" / "policy" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().sum()) > 0 for t in lora_b)
    log = read_jsonl(two / "rl" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(r["kl"] == r["kl"] for r in log)  # finite, gathered


@pytest.mark.distributed
def test_two_process_dpo(runs):
    """A TRL stage (DPO) under the same launch: the policy and log come from the main process only. The run's
    rl/ holds a PPO policy: --force moves it aside (main process) before every process trains."""
    _, two = runs
    wall = launch("rl", "--run", str(two), "--algo", "dpo", "--force")
    print(f"2-process `morlaif rl --algo dpo` (tiny): {wall:.1f} s")
    m = json.loads((two / "rl" / "metrics.json").read_text())
    assert m["algo"] == "dpo" and m["steps"] == len(read_jsonl(two / "rl" / "log.jsonl")) > 0
    assert (two / "rl" / "policy" / "adapter_config.json").is_file() and not (two / "rl" / "trainer").exists()
    (old,) = (two / ".replaced").glob("rl-*")
    assert json.loads((old / "metrics.json").read_text())["algo"] == "ppo"  # the PPO policy kept, not deleted


# ----------------------------------------------------------------------------- Ray


@pytest.mark.distributed
def test_ray_two_workers_label_and_sample_like_one_process(tiny_cfg, prompts_run, tmp_path, monkeypatch):
    import ray  # in the test extra: CI must run this test, not skip it

    from morlaif import distributed_ray, feedback, models

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response_a": f"An answer, number {i}.",
                                         "response_b": f"No. {i}"}) + "\n" for i in range(5)))
    monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "cache_one"))
    feedback.label_file(tiny_cfg, pairs, tmp_path / "one.jsonl", objectives=["honesty", "prudence"])

    made = []
    real_ray_judge = distributed_ray.RayJudge
    monkeypatch.setattr(distributed_ray, "RayJudge", lambda cfg: made.append(real_ray_judge(cfg)) or made[-1])
    monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "cache_ray"))  # nothing cached: every label from the actors
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.ray.workers = 2
    t = time.time()
    try:
        feedback.label_file(cfg, pairs, tmp_path / "ray.jsonl", objectives=["honesty", "prudence"])
        print(f"Ray (2 workers) labelled 10 (pair, objective) items in {time.time() - t:.1f} s")
        assert isinstance(made[0], real_ray_judge) and len(made[0].pids) == 2  # both actors judged
        one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "ray.jsonl")
        assert [(r["prompt"], r["objective"]) for r in two] == [(r["prompt"], r["objective"]) for r in one]
        assert max(abs(a["p_a"] - b["p_a"]) for a, b in zip(one, two)) < 1e-5
        # The feedback model's own answers (its refusal decisions) come back from the actors in prompt order.
        asked = [f"Question {i}?" for i in range(5)]
        assert made[0].answer(asked, 4) == make_judge(tiny_cfg).answer(asked, 4)

        # Generation: the same chunks, with the same seeds, give the same pairs on the actors.
        cfg.generation.batch_size = 2  # one prompt (two samples) per chunk: 4 chunks for 2 actors
        cfg.feedback.pairs = "policy_samples"  # no SFT stage in this run
        one_cfg = cfg.model_copy(deep=True)
        one_cfg.ray.workers = 0
        chunks = feedback.pair_chunks(cfg, feedback._choose_prompts(cfg, prompts_run), done=set())
        assert len(chunks) == 4
        model = models.load_model(cfg.model.policy, device="cpu")
        tok = models.load_tokenizer(cfg.model.policy)
        local = [r for c in chunks for r in feedback.sample_pair_chunk(one_cfg, model, tok, c)]
        remote = [r for rows in distributed_ray.map_pair_chunks(cfg, cfg.model.policy, chunks,
                                                                feedback.sample_pair_chunk) for r in rows]
        assert sorted(remote, key=lambda r: r["pair_id"]) == local
        assert len({r["response_a"] for r in local}) > 1  # real samples, not one repeated string
    finally:
        ray.shutdown()
