import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "morlaif" / "recipes" / "tiny.yaml"

# Quiet, offline, deterministic: the hub is never reachable in these tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def tiny_cfg():
    from morlaif.config import load_config

    return load_config(TINY)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture
def prompts_run(tiny_cfg, run_dir):
    """A run directory with the prompts stage done on the tiny config."""
    from morlaif import prompts

    prompts.run(tiny_cfg, run_dir)
    return run_dir


# The tiny run most end-to-end tests share (tests/test_pipeline.py, test_export.py, test_logging.py): every
# stage on the tiny config, with an aspect objective (its follow-up answers go through every stage) and
# TensorBoard logging on.
OBJECTIVES = ["honesty", "prudence", "justice", "compassion", "humility", "respect", "honesty:motivation"]
SETS = ["--set", f"constitution.objectives=[{', '.join(OBJECTIVES)}]", "--set", "logging.report_to=tensorboard"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from morlaif.cli import main

    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["run", "--config", str(TINY), "--out", str(out), *SETS]) == 0
    return out
