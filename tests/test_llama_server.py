"""The `openai` judge backend against a real OpenAI-compatible server: llama.cpp (llama-cpp-python's server,
the `server` extra, installed by the test extra) serving the embedded SmolLM2's GGUF on a loopback port.

- its labels agree with the hf backend's on the same model (same template; llama.cpp computes with the Q4_1
  weights as stored, the hf backend with their fp32 de-quantization: close, not equal);
- a server killed mid-labelling and restarted: the stage retries and finishes with exactly the labels of an
  uninterrupted run (none lost, duplicated or invented);
- two servers behind one base_url list, one killed mid-run: the other takes its share.
"""

import json
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest

from morlaif import feedback, models
from morlaif.artifacts import read_jsonl
from morlaif.promptsets import load_calibration
from morlaif.serve import JudgeServer, free_port

pytest.importorskip("llama_cpp", reason="the llama.cpp server is the `server` extra (in the test extra)")
pytestmark = [pytest.mark.embedded, pytest.mark.llama_server]

OBJECTIVES = ["honesty", "prudence", "holistic"]
N_PAIRS = 16


@pytest.fixture(scope="module")
def smol():
    """(GGUF path, de-quantized model path): resolved before any test points MORLAIF_CACHE elsewhere."""
    return models.embedded_gguf(models.EMBEDDED), str(models.embedded_model_path())


@pytest.fixture
def pairs(tmp_path):
    rows = load_calibration()[:N_PAIRS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in enumerate(rows)))
    return path


def _label(tiny_cfg, smol, pairs, out, monkeypatch, url=None, **openai):
    """label_file through the openai backend at `url` (or the hf backend), with a label cache of its own."""
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.feedback = smol[1]
    cfg.feedback.label_chunk = 6
    if url is not None:
        cfg.feedback.backend = "openai"
        o = cfg.feedback.openai
        o.base_url, o.concurrency, o.top_logprobs, o.timeout = url, 2, 20, 30.0
        for k, v in openai.items():
            setattr(o, k, v)
    monkeypatch.setenv("MORLAIF_CACHE", str(out.parent / f"cache-{out.stem}"))
    n = feedback.label_file(cfg, pairs, out, objectives=OBJECTIVES)
    assert n == N_PAIRS * len(OBJECTIVES)
    return read_jsonl(out)


def _key(r):
    return r["id"], r["objective"]


def _same_labels(rows, ref):
    """Same (pair, objective) rows in the same order, each order's winner the same, P(a) to 1e-6."""
    assert [_key(r) for r in rows] == [_key(r) for r in ref]
    for a, b in zip(rows, ref):
        assert (a["winner_ab"], a["winner_ba"], a["consistent"]) == (b["winner_ab"], b["winner_ba"], b["consistent"])
        assert a["p_a"] == pytest.approx(b["p_a"], abs=1e-6)


def test_openai_backend_through_llama_server_agrees_with_hf(tiny_cfg, smol, pairs, tmp_path, monkeypatch, capsys):
    with JudgeServer(smol[0], threads=2) as srv:
        t = time.perf_counter()
        served = _label(tiny_cfg, smol, pairs, tmp_path / "served.jsonl", monkeypatch, url=srv.base_url)
        t_served = time.perf_counter() - t
        again = _label(tiny_cfg, smol, pairs, tmp_path / "again.jsonl", monkeypatch, url=srv.base_url)
    t = time.perf_counter()
    local = _label(tiny_cfg, smol, pairs, tmp_path / "local.jsonl", monkeypatch)
    t_local = time.perf_counter() - t
    _same_labels(again, served)  # the server is deterministic: a second pass gives the same numbers
    assert [_key(r) for r in served] == [_key(r) for r in local]
    dp = [abs(a["p_a"] - b["p_a"]) for a, b in zip(served, local)]
    sign = statistics.mean([(a["p_a"] > 0.5) == (b["p_a"] > 0.5) for a, b in zip(served, local)])
    first = statistics.mean([(a["winner_ab"], a["winner_ba"]) == (b["winner_ab"], b["winner_ba"])
                             for a, b in zip(served, local)])
    with capsys.disabled():
        print(f"\nllama.cpp server vs hf backend, SmolLM2-135M, {len(dp)} labels: sign of P(a) agrees {sign:.3f}, "
              f"each order's winner agrees {first:.3f}, mean |dP(a)| {statistics.mean(dp):.4f} (max {max(dp):.4f}); "
              f"{t_served:.1f} s served, {t_local:.1f} s hf (2 cores)")
    # Tolerances: the Q4_1 weights as stored against their fp32 de-quantization move P(a) by about 0.01,
    # which is the size of this small judge's own margins: the sign may flip where the margin is smaller.
    assert statistics.mean(dp) < 0.03 and max(dp) < 0.1
    assert sign >= 0.7 and first >= 0.85


def test_killed_server_is_waited_for_and_no_label_is_lost(tiny_cfg, smol, pairs, tmp_path, monkeypatch):
    """SIGKILL mid-labelling, restart on the same port 2 s later: the stage retries (backoff), finishes, and its
    labels equal an uninterrupted run's; what was judged before the crash is kept, not asked again."""
    retry = dict(max_retries=8, backoff_base=0.5, backoff_max=4.0)
    with JudgeServer(smol[0], threads=2) as srv:
        clean = _label(tiny_cfg, smol, pairs, tmp_path / "clean.jsonl", monkeypatch, url=srv.base_url)
    with JudgeServer(smol[0], threads=2) as srv:
        out, err = tmp_path / "crash.jsonl", []
        cache = tmp_path / "cache-crash" / "feedback"

        def work():
            try:
                _label(tiny_cfg, smol, pairs, out, monkeypatch, url=srv.base_url, **retry)
            except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
                err.append(e)

        th = threading.Thread(target=work)
        th.start()
        deadline = time.monotonic() + 120
        while not any(cache.glob("*.jsonl")) and time.monotonic() < deadline:  # the first chunk is stored
            time.sleep(0.1)
        assert any(cache.glob("*.jsonl")), "no label chunk was stored before the crash"
        srv.kill()
        before = len(read_jsonl(next(cache.glob("*.jsonl"))))
        time.sleep(2.0)
        srv.start()
        th.join(timeout=300)
        assert not th.is_alive() and not err, err
    assert 0 < before < len(clean)  # the crash came mid-run
    _same_labels(read_jsonl(out), clean)
    cached = read_jsonl(next(cache.glob("*.jsonl")))
    assert len(cached) == len({c["key"] for c in cached}) == len(clean)  # each label judged and stored once


def test_two_servers_one_killed_the_other_takes_its_share(tiny_cfg, smol, pairs, tmp_path, monkeypatch):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with JudgeServer(smol[0], threads=1, log=logs[0]) as a, JudgeServer(smol[0], threads=1, log=logs[1]) as b:
        clean = _label(tiny_cfg, smol, pairs, tmp_path / "clean.jsonl", monkeypatch, url=a.base_url)
        for log in logs:
            log.write_text("")
        out, err = tmp_path / "pool.jsonl", []
        cache = tmp_path / "cache-pool" / "feedback"

        def work():
            try:
                _label(tiny_cfg, smol, pairs, out, monkeypatch, url=[a.base_url, b.base_url], max_retries=6,
                       backoff_base=0.5, backoff_max=4.0)
            except BaseException as e:  # noqa: BLE001
                err.append(e)

        th = threading.Thread(target=work)
        th.start()
        deadline = time.monotonic() + 120
        while not any(cache.glob("*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.1)
        answered_a = logs[0].read_text().count("total time")
        a.kill()
        th.join(timeout=300)
        assert not th.is_alive() and not err, err
        answered_b = logs[1].read_text().count("total time")  # llama.cpp logs one timing block per request
    # The label cache is per endpoint list, so the pool run judged every label: a share on a before the kill,
    # all the rest on b.
    assert answered_a > 0 and answered_b > 0
    assert answered_b >= 2 * len(clean) - answered_a
    _same_labels(read_jsonl(out), clean)


def test_serve_judge_command_serves_labels_and_calibration(tiny_cfg, smol, tmp_path, monkeypatch):
    """`morlaif serve-judge` in its own process; feedback's calibration runs through it (the openai backend)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "morlaif.cli", "serve-judge", "--model", str(smol[0]), "--port",
                             str(port), "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.feedback.backend, cfg.feedback.openai.base_url = "openai", url
        monkeypatch.setenv("MORLAIF_CACHE", str(tmp_path / "cache"))
        res = feedback.calibrate_file(cfg, "calibration", limit=4)
        assert res["n"] == 4 and res["judge_model"] == f"openai:{url}:default"
        assert 0.0 <= res["agreement"] <= 1.0 and res["labels_judged"] == 4
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"feedback.openai.base_url={url}" in out  # it says how to label through it
