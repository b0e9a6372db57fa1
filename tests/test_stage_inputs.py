"""Every stage's inputs are the content of what it reads: on a finished tiny run, changing the content of
one file a stage reads (a prompt, a label, a weight) is noticed by exactly the stages that read it, each
refusing in one line that names it, through the same command a user types; rewriting a file the same
way it was (PEFT's set-ordered adapter config) is noticed by none. Refusals come before any stage body
runs, so the whole matrix costs the hashing alone."""

import json
import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from morlaif.cli import main
from morlaif.config import load_config

STAGES = ["prompts", "sft", "feedback", "rm", "rl", "eval", "report"]


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run (moved, too: its manifests name their inputs relative to the run)."""
    out = tmp_path_factory.mktemp("inputs") / "run"
    shutil.copytree(tiny_run, out)
    return out


def _perturb_weights(path):
    t = load_file(str(path))
    first = sorted(t)[0]
    t[first] = t[first] + 1e-3
    save_file(t, str(path))


def _append_row(path):
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows + [rows[0]]) + "\n")


def _reorder_target_modules(path):
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = list(reversed(cfg["target_modules"]))  # what another process's set order gives
    path.write_text(json.dumps(cfg, indent=2))


def _noticing(run, capsys) -> dict[str, str]:
    """{stage: its one-line refusal} for each stage command that refuses; the others must skip."""
    out = {}
    for stage in STAGES:
        capsys.readouterr()
        code = main([stage, "--run", str(run)])
        printed = capsys.readouterr()
        if code == 2:
            assert printed.err.count("\n") == 1, printed.err
            out[stage] = printed.err
        else:
            assert code == 0 and "complete, skipped" in printed.out, (stage, printed)
    return out


def _readers(cfg) -> dict[str, set[str]]:
    """Which stages read each file, from what each stage does (README's pipeline table), not from its code."""
    pairs = cfg.feedback.pairs
    sft_samples = pairs != "base_vs_target"  # every other pairing samples the SFT policy
    uses_targets = pairs in ("policy_vs_target", "base_vs_target")
    return {
        "prompts/train.jsonl": {"sft", "feedback", "rl"},  # rl: PPO's rollout prompts
        "prompts/eval.jsonl": {"rl", "eval"},  # rl: PPO's held-out reward curve
        "sft/data.jsonl": {"feedback"} if uses_targets else set(),
        "sft/model/adapter_model.safetensors": {"rl", "eval"} | ({"feedback"} if sft_samples else set()),
        "feedback/labels.jsonl": {"rm"},
        "rm/heads.safetensors": {"rl", "eval"},
        "rm/model/multihead/adapter_model.safetensors": {"rl", "eval"},
        "rm/norm.json": {"rl", "eval"},
        "rm/metrics.json": {"report"},
        "rl/policy/adapter_model.safetensors": {"eval"},
        "rl/log.jsonl": {"report"},
        "eval/samples.jsonl": {"report"},
    }


def test_each_input_is_noticed_by_exactly_the_stages_that_read_it(run, capsys):
    cfg = load_config(run / "config.yaml")
    assert _noticing(run, capsys) == {}  # a moved copy of a finished run: every stage done
    for rel, readers in _readers(cfg).items():
        path = run / rel
        before = path.read_bytes()
        if path.suffix == ".safetensors":
            _perturb_weights(path)
        elif path.suffix == ".jsonl":
            _append_row(path)
        else:
            path.write_text(path.read_text().replace("}", ', "x": 1}', 1))
        refused = _noticing(run, capsys)
        path.write_bytes(before)
        assert set(refused) == readers, rel
        for stage, err in refused.items():
            assert f"stage {stage} was made with other settings or inputs" in err, err
            named = re.findall(r"input (\S+) changed", err)  # the file, or the model directory holding it
            assert len(named) == 1 and (rel + "/").startswith(named[0] + "/"), (rel, err)
    # PEFT rewrites an adapter's config in another set order on an identical run: no change to anyone
    for rel in ("sft/model/adapter_config.json", "rl/policy/adapter_config.json"):
        before = (run / rel).read_bytes()
        _reorder_target_modules(run / rel)
        assert (run / rel).read_bytes() != before
        assert _noticing(run, capsys) == {}, rel


def test_eval_notices_new_aligned_weights_and_force_is_the_way_on(run, capsys):
    """Issue 24's case: new weights in the aligned policy's adapter (its config untouched)."""
    policy = run / "rl" / "policy" / "adapter_model.safetensors"
    before = policy.read_bytes()
    _perturb_weights(policy)
    try:
        capsys.readouterr()
        assert main(["eval", "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert "stage eval was made with other settings or inputs (input rl/policy changed)" in err
        assert "Add --force to redo it" in err
        assert json.loads((run / "eval" / "manifest.json").read_text())["status"] == "complete"  # untouched
    finally:
        policy.write_bytes(before)
