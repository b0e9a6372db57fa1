"""Runs never lose finished work: `run --out` on an existing run keeps its config, a changed setting is
refused (one line, exit 2, nothing touched) unless forced, --force moves the old stage aside, and
`run --from` branches reuse the finished stages a change leaves alone.

The pipeline here is three fake stages (prompts, sft, rl) that run in milliseconds and write what
they were configured with; `tests/test_pipeline.py` does the same on the real stages."""

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from morlaif import pipeline
from morlaif.lifecycle import run_stage
from morlaif.cli import main

SECTIONS = {"prompts": ("data",), "sft": ("sft",), "rl": ("rl",)}


@pytest.fixture
def fake_pipeline(monkeypatch):
    """STAGES = three stages; each writes out.txt from its settings and its predecessor's out.txt.
    Returns the list of stages run, in order."""
    calls: list[str] = []
    names = list(SECTIONS)
    for i, name in enumerate(names):
        mod = types.ModuleType(f"fake_stage_{name}")

        def run(cfg, run_dir, name=name, i=i):
            run_dir = Path(run_dir)
            inputs = [run_dir / names[i - 1] / "out.txt"] if i else []

            def body(out):
                calls.append(name)
                before = inputs[0].read_text() if inputs else ""
                (out / "out.txt").write_text(before + json.dumps(cfg.sections(*SECTIONS[name]), sort_keys=True))

            return run_stage(name, run_dir / name, config=cfg.sections(*SECTIONS[name]), inputs=inputs, body=body)

        mod.run = run
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(pipeline, "STAGES", {n: f"fake_stage_{n}" for n in names})
    return calls


def _outputs(run: Path) -> dict:
    return {n: (run / n / "out.txt").read_text() for n in SECTIONS if (run / n / "out.txt").exists()}


def test_rerun_keeps_config_refuses_changes_and_force_keeps_the_old(fake_pipeline, tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  policy: tiny\nrl:\n  steps: 99\n  learning_rate: 2e-5\n")
    run = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--out", str(run)]) == 0
    assert fake_pipeline == ["prompts", "sft", "rl"]
    before = _outputs(run)
    config = (run / "config.yaml").read_text()

    # `run --out DIR` again: the run's own config.yaml is the base, so rl.steps stays 99 and nothing runs
    assert main(["run", "--out", str(run)]) == 0
    assert fake_pipeline == ["prompts", "sft", "rl"] and (run / "config.yaml").read_text() == config
    assert yaml.safe_load(config)["rl"]["steps"] == 99 and yaml.safe_load(config)["rl"]["learning_rate"] == 2e-5

    # a changed key: refused in one line naming it, before anything is written
    capsys.readouterr()
    assert main(["run", "--out", str(run), "--set", "rl.steps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage rl was made with other settings" in err and "rl.steps: 99 -> 5" in err
    assert "--force rl" in err and f"morlaif run --from {run} --out NEW_DIR --set rl.steps=5" in err
    assert _outputs(run) == before and (run / "config.yaml").read_text() == config
    # the same from the stage command
    assert main(["rl", "--run", str(run), "--set", "rl.steps=5"]) == 2
    assert "rl.steps: 99 -> 5" in capsys.readouterr().err and _outputs(run) == before

    # --force rl: redone with the new setting; the finished one is moved aside, not deleted
    assert main(["run", "--out", str(run), "--set", "rl.steps=5", "--force", "rl"]) == 0
    assert fake_pipeline[3:] == ["rl"]
    assert '"steps": 5' in _outputs(run)["rl"] and _outputs(run)["sft"] == before["sft"]
    (old,) = (run / ".replaced").iterdir()
    assert old.name.startswith("rl-") and (old / "out.txt").read_text() == before["rl"]
    assert yaml.safe_load((run / "config.yaml").read_text())["rl"]["steps"] == 5

    # --force sft redoes every later stage too (their inputs change)
    assert main(["run", "--out", str(run), "--force", "sft"]) == 0
    assert fake_pipeline[4:] == ["sft", "rl"] and len(list((run / ".replaced").iterdir())) == 3


def test_stage_command_with_another_algorithm_is_refused_not_destructive(fake_pipeline, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--config", "tiny", "--out", str(run)]) == 0
    before = _outputs(run)
    capsys.readouterr()
    assert main(["rl", "--run", str(run), "--algo", "grpo"]) == 2
    err = capsys.readouterr().err
    assert 'rl.algo: "ppo" -> "grpo"' in err and "--set rl.algo=grpo" in err
    assert _outputs(run) == before and yaml.safe_load((run / "config.yaml").read_text())["rl"]["algo"] == "ppo"
    assert main(["rl", "--run", str(run), "--algo", "grpo", "--force"]) == 0
    assert '"algo": "grpo"' in _outputs(run)["rl"] and any((run / ".replaced").iterdir())


def test_branch_links_what_the_change_leaves_alone(fake_pipeline, tmp_path, capsys):
    src, new = tmp_path / "src", tmp_path / "new"
    assert main(["run", "--config", "tiny", "--out", str(src)]) == 0
    assert main(["run", "--from", str(src), "--out", str(new), "--set", "rl.scalarizer=max_min"]) == 0
    assert fake_pipeline == ["prompts", "sft", "rl", "rl"]  # only rl ran in the branch
    for name in ("prompts", "sft"):
        man = json.loads((new / name / "manifest.json").read_text())
        assert man["reused_from"] == str((src / name).resolve()) and man["status"] == "complete"
        assert (new / name / "out.txt").stat().st_ino == (src / name / "out.txt").stat().st_ino  # a hard link
    assert '"scalarizer": "max_min"' in _outputs(new)["rl"] and '"scalarizer": "max_min"' not in _outputs(src)["rl"]
    assert "reused_from" not in json.loads((new / "rl" / "manifest.json").read_text())
    assert json.loads((new / "branch.json").read_text())["from"] == str(src.resolve())
    # the branch is a run of its own: rerunning it skips everything; the source is untouched
    assert main(["run", "--out", str(new)]) == 0 and len(fake_pipeline) == 4
    assert '"scalarizer": "soft_max_min"' in _outputs(src)["rl"]
    # a branch whose change reaches an early stage links nothing from there on
    assert main(["run", "--from", str(src), "--out", str(tmp_path / "b2"), "--set", "sft.epochs=3"]) == 0
    assert fake_pipeline[4:] == ["sft", "rl"]
    # --out must be new (or a branch of the same run)
    capsys.readouterr()
    assert main(["run", "--from", str(new), "--out", str(src)]) == 2
    assert "not a branch" in capsys.readouterr().err
