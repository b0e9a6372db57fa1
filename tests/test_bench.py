"""`morlaif bench`: the timing helpers exactly, and the CPU --quick run end to end (slow)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from morlaif import bench, models
from morlaif.cli import main


def test_median_time_runs_warmup_then_repeats_and_takes_the_median(monkeypatch):
    calls = []
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # repeats of 1, 3 and 2 seconds
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.median_time(lambda: calls.append(1), warmup=2, repeats=3, device=torch.device("cpu")) == 2.0
    assert len(calls) == 5


def test_figure_ratio_is_ours_over_baseline():
    f = bench.figure(30.0, 12.0, "tokens/s", "higher", batch=8)
    assert f == {"ours": 30.0, "baseline": 12.0, "ratio": 2.5, "unit": "tokens/s", "better": "higher", "batch": 8}


def test_random_texts_are_seeded():
    tok = models.load_tokenizer(models.TINY)
    a, b = bench.random_texts(tok, 3, 20, seed=1), bench.random_texts(tok, 3, 20, seed=1)
    assert a == b and len(set(a)) == 3
    assert bench.random_texts(tok, 3, 20, seed=2) != a


def test_table_reports_targets_as_gpu_only_on_cpu():
    result = {"device": "cpu", "quick": True, "device_name": "x", "model": "m", "figures": {
        "generate_tok_per_s": bench.figure(10.0, 5.0, "tokens/s", "higher", copy_bandwidth_gb_s=20.0,
                                           bound_tok_per_s=100.0, share_of_bound=0.1)},
        "targets": [{"figure": "judge_labels_per_s", "field": "ours", "target": ">= 2000", "value": 5.0, "met": None}]}
    text = bench.table(result)
    assert "| generate_tok_per_s | 10 | 5 | 2 | tokens/s |" in text
    assert "ours is 10.0% of it" in text and "n/a on CPU (GPU target)" in text


def test_bench_refuses_cuda_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "b.json")]) == 2
    assert "CUDA requested but not available" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_bench_quick_cpu_end_to_end(tmp_path):
    """The command of the closing note, on the SmolLM2-135M architecture: every figure measured."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "morlaif.cli", "bench", "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["figures"]) == {"generate_tok_per_s", "score_k12_over_k1", "judge_labels_per_s",
                                   "rl_step_completions_per_s", "ppo_peak_memory_mb", "bf16_autocast_train_steps_per_s",
                                   "teacher_generate_tok_per_s",
                                   "teacher_judge_labels_per_s", "teacher_letter_error", "teacher_server_labels_per_s"}
    # the teacher's greedy answers are the same tokens either way; the fp32 letters are closer to fp32
    gen = res["figures"]["teacher_generate_tok_per_s"]
    assert gen["rows_with_hf_tokens"] == gen["batch"] and gen["static_cache_same_lengths"]
    served = res["figures"]["teacher_server_labels_per_s"]  # the served teacher judges like the local one
    assert served["labels"] == 4 * 7 and served["mean_abs_p_a_difference"] < 0.03 and served["sign_agreement"] >= 0.7
    assert all(v > 0 for side in ("prefill_tok_per_s", "decode_tok_per_s") for v in served[side].values())
    assert res["figures"]["teacher_judge_labels_per_s"]["max_abs_p_a_difference"] < 1e-2
    letters = res["figures"]["teacher_letter_error"]
    assert letters["ours"] < letters["baseline"]
    for f in res["figures"].values():
        assert f["ours"] > 0 and f["baseline"] > 0 and math.isclose(f["ratio"], f["ours"] / f["baseline"])
    # shared-prefix judging must give the plain forward pass's answer, not just a faster one
    assert res["figures"]["judge_labels_per_s"]["max_abs_p_a_difference"] < 1e-3
    assert res["figures"]["generate_tok_per_s"]["share_of_bound"] < 1.0
    assert [t["met"] for t in res["targets"]] == [None, None, None]  # GPU targets: not judged on a CPU
    assert "| rl_step_completions_per_s |" in proc.stdout


def test_table_prints_both_judge_backends_side_by_side():
    fig = bench.figure(2.75, 1.18, "labels/s", "higher", prefill_tok_per_s={"hf": 144.6, "server": 192.6},
                       decode_tok_per_s={"hf": 5.48, "server": 26.3}, sign_agreement=0.8214,
                       mean_abs_p_a_difference=0.00946)
    text = bench.table({"device": "cpu", "quick": True, "device_name": "x", "model": "m",
                        "figures": {"teacher_server_labels_per_s": fig}, "targets": []})
    assert ("teacher, hf backend vs llama.cpp server: 2.75 vs 1.18 labels/s; batch-1 prefill 144.6 vs 192.6 "
            "tokens/s, decode 5.48 vs 26.3 tokens/s; P(a) sign agreement 0.821, mean |dP(a)| 0.0095") in text
