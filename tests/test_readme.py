"""The README's quick start is exactly `make run` and `make test`, and they do what it says."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_quick_start_is_make_run_and_make_test():
    assert quick_start_commands() == ["make run", "make test"]


def test_makefile_targets_refresh_the_venv_then_act():
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: venv\n\t\$\(BIN\)/morlaif run ", mk, re.M)
    assert re.search(r"^test: test-venv\n\t\$\(BIN\)/python -m pytest", mk, re.M)
    assert re.search(r"^\$\(VENV\)/\.installed-test: \$\(VENV\)/\.installed\n", mk, re.M)  # tests on top of run's venv
    install = mk[mk.index("$(VENV)/.installed:"):]
    # torch 2.13.0 first, so the rest resolves against the CPU wheel and nothing pulls CUDA
    assert install.index("torch==2.13.0") < install.index('-e ".[test]"')
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/morlaif run --out runs/default" in dry


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.skipif(os.environ.get("MORLAIF_SKIP_MAKE_RUN") == "1", reason="MORLAIF_SKIP_MAKE_RUN=1")
def test_make_run_end_to_end(tmp_path):
    """`make run` on the embedded default, every stage real (20-26 minutes on 2 cores)."""
    out = tmp_path / "run"
    proc = subprocess.run(["make", "run", f"OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(m) >= {"objectives", "reward", "win_rate", "refusal_rate", "kl_to_base", "mean_response_tokens"}
    assert (out / "report.html").stat().st_size > 10_000
    assert "scalarized reward" in proc.stderr + proc.stdout
    timings = json.loads((out / "timings.json").read_text())
    print(f"make run: {timings['total_s']:.0f} s", timings["stages_s"])
