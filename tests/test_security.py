"""Security: trust_remote_code off unless asked; safetensors only, never pickles; API keys from the
environment only and never written anywhere; paths read from artifacts confined to the run directory."""

import ast
import json
import shutil
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from morlaif import feedback, models
from morlaif.cli import main
from morlaif.config import load_config
from morlaif.errors import InputError
from morlaif.judge import JudgeError

from conftest import TINY

SRC = Path(__file__).resolve().parents[1] / "src" / "morlaif"
KEY = "sk-sec-test-9f8e7d6c5b4a3210"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_trust_remote_code_is_never_hard_wired_on():
    """No call in the package passes trust_remote_code=True; the config default is False."""
    assert load_config().model.trust_remote_code is False and load_config(TINY).model.trust_remote_code is False
    for f in SRC.glob("*.py"):
        for call in _calls(ast.parse(f.read_text())):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code":
                    assert not (isinstance(kw.value, ast.Constant) and kw.value.value is True), f"{f}:{call.lineno}"


def test_trust_remote_code_reaches_transformers_only_when_set(tiny_cfg, monkeypatch):
    seen = []
    real = models._pretrained

    def spy(cls, path, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(cls, path, **{**kw, "trust_remote_code": False})  # the tiny model has no remote code to run

    monkeypatch.setattr(models, "_pretrained", spy)
    from morlaif import judge

    judge.make_judge(tiny_cfg)  # tokenizer + model
    assert seen == [False, False]
    tiny_cfg.model.trust_remote_code = True
    judge.make_judge(tiny_cfg)
    assert seen[2:] == [True, True]


def test_no_pickle_in_the_package():
    """Nothing in morlaif saves or loads with pickle (torch.save/torch.load/pickle)."""
    for f in SRC.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), f
        for call in _calls(tree):
            fn = call.func
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                assert (fn.value.id, fn.attr) not in (("torch", "save"), ("torch", "load")), f"{f}:{call.lineno}"


def test_pickled_adapter_is_refused(tmp_path):
    """An adapter directory with only adapter_model.bin (a pickle) is refused before anything unpickles it."""
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny", "peft_type": "LORA"}))
    (ad / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")  # would call os.system if unpickled
    with pytest.raises(InputError, match="adapter_model.safetensors"):
        models.load_model(str(ad), device="cpu")
    assert main(["generate", "--model", str(ad), "--prompt", "hi", "--config", str(TINY)]) == 2


def test_adapter_names_read_from_a_run_are_confined_to_it(tiny_cfg, tmp_path, capsys):
    """rm/objectives.json names the adapter directories to load; one pointing outside the run is refused."""
    run = tmp_path / "run"
    (run / "rm" / "model").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    objs = ["honesty", "prudence", "justice", "compassion", "humility", "respect"]
    (run / "rm" / "objectives.json").write_text(json.dumps({
        "layout": "separate", "objectives": objs, "backbone": "tiny", "max_length": 64, "baseline_adapter": None,
        "adapters": {o: "../../elsewhere" for o in objs}}))
    assert main(["score", "--run", str(run), "--prompt", "hi", "--response", "hello", "--config", str(TINY)]) == 2
    assert "path escapes the run directory: ../../elsewhere" in capsys.readouterr().err


def test_stage_names_cannot_traverse(tmp_path, capsys):
    assert main(["run", "--config", str(TINY), "--out", str(tmp_path / "r"), "--force", "../../etc"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert not (tmp_path / "r" / "prompts").exists()


def _openai(cfg, url):
    cfg = cfg.model_copy(deep=True)
    cfg.feedback.backend = "openai"
    o = cfg.feedback.openai
    o.base_url, o.api_key_env, o.max_retries, o.backoff_base, o.backoff_max, o.timeout = url, "MORLAIF_SEC_KEY", 3, 0.01, 0.1, 5.0
    cfg.constitution.objectives = ["honesty"]
    cfg.feedback.pairs = "policy_samples"  # the run has no SFT stage
    cfg.feedback.label_chunk = 8
    return cfg


def test_api_key_is_sent_but_never_written(tiny_cfg, prompts_run, tmp_path, monkeypatch, capfd):
    """Key in the environment; an endpoint that echoes it back in error bodies and in answers. The key goes
    out in the Authorization header and nowhere else: no file of the run or the cache, no output line."""
    monkeypatch.setenv("MORLAIF_SEC_KEY", KEY)
    failed = tmp_path / "failed"
    shutil.copytree(prompts_run, failed)
    with FakeOpenAI(flaky=(["echokey", "echokeytext", "500"], 2)) as srv:
        cfg = _openai(tiny_cfg, srv.base_url)
        feedback.run(cfg, prompts_run)  # stage: pairs from the tiny policy, labels + calibration from the endpoint
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text('{"prompt": "hi", "response_a": "GOOD a", "response_b": "b"}\n')
        sets = ["--set", "feedback.backend=openai", "--set", f"feedback.openai.base_url={srv.base_url}",
                "--set", "feedback.openai.api_key_env=MORLAIF_SEC_KEY", "--set", "feedback.openai.backoff_base=0.01"]
        assert main(["feedback", "--pairs", str(pairs), "--out", str(tmp_path / "out.jsonl"), "--config", str(TINY),
                     "--objectives", "honesty", *sets]) == 0
    assert srv.injected["echokey"] > 0 and srv.injected["echokeytext"] > 0
    assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in srv.requests)  # the key did go out
    labels = [json.loads(x) for x in (prompts_run / "feedback" / "labels.jsonl").read_text().splitlines()]
    assert any("***" in lab["raw"][o]["text"] for lab in labels for o in ("ab", "ba"))  # echoed, then masked
    with FakeOpenAI(always="echokey") as srv:  # a persistent failure: the error lands in the manifest
        with pytest.raises(JudgeError, match=r"\*\*\*"):
            feedback.run(_openai(tiny_cfg, srv.base_url), failed)
    assert json.loads((failed / "feedback" / "manifest.json").read_text())["status"] == "failed"
    out, err = capfd.readouterr()
    written = [*tmp_path.rglob("*"), *(models.cache_dir() / "feedback").rglob("*")]  # runs, outputs, label cache
    leaks = [str(p) for p in written if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaks and KEY not in out + err
    assert "MORLAIF_SEC_KEY" in (prompts_run / "feedback" / "manifest.json").read_text()  # the name, not the key
