"""The run's policies: the aligned one (rl/policy, or sft/model before the rl stage), the SFT one beside
it, and how an evaluated policy answers the follow-up questions of the run's aspect objectives."""

from __future__ import annotations

from pathlib import Path

from morlaif import models
from morlaif.config import Config
from morlaif.constitution import configured_objectives
from morlaif.errors import InputError
from morlaif.generation import Sampling, followup_answers
from morlaif.preference import aspects


def aligned_path(run_dir: Path) -> Path:
    for p in (run_dir / "rl" / "policy", run_dir / "sft" / "model"):
        if models.saved_model_files(p):  # an adapter, or a whole model (sft.use_peft false)
            return p
    raise InputError("no aligned policy in the run (rl/policy or sft/model): run `morlaif rl` first", file=str(run_dir))


def sft_path(run_dir: Path, aligned_dir: Path) -> Path | None:
    """The run's SFT policy when the aligned policy is another one (the eval's middle column), else None."""
    sft = run_dir / "sft" / "model"
    if not models.saved_model_files(sft) or Path(aligned_dir).resolve() == sft.resolve():
        return None
    return sft


def eval_followups(cfg: Config, model, tok, prompts: list[str], responses: list[str]) -> dict[str, list[str]]:
    """`model`'s answers to the follow-up questions of the run's aspect objectives (none without),
    sampled as every stage samples them (`Sampling.from_config(cfg, "followup")`), seeded with cfg.seed."""
    asp = aspects([o.name for o in configured_objectives(cfg.constitution)])
    return followup_answers(model, tok, prompts, responses, asp, seed=cfg.seed,
                            sampling=Sampling.from_config(cfg, "followup"))
