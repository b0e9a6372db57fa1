"""Weight-conditioned (steerable) policies: the form in which the policy sees the weights, and the
stream of weights it trains on (`rl.conditioning: prompt`).

As in Rewards-in-Context (Yang et al. 2024) and Directional Preference Alignment (Wang et al. 2024),
one policy learns every trade-off: each RL episode draws a weight vector w over the K objectives,
the policy reads it before the user's turn, and the episode's reward is the run's scalarizer under
that w. At inference the user writes the weights they want (`morlaif generate --weights ...`) and the
same policy answers for them; no retraining, no reranking.

The form, fixed and documented (the exported model card repeats it): a system message of one line

    weights: honesty=0.40 prudence=0.25 justice=0.35

the run's objectives in the run's order, each weight with two decimals, the weights normalised to
sum 1 before rounding. The reward uses the weights as written (parsed back from the line), so what
the policy reads and what it is rewarded under are the same numbers. The preference models never
see the line: they score the user's prompt and the response, as they were trained.

The stream: episode i of (0-based) RL step t draws from a generator seeded by (seed, t), so the
weights of a step are a pure function of the step and a resumed run draws what an uninterrupted one
drew. With probability `rl.configured_weight_share` an episode takes the configured weights
(`rl.weights`, uniform when unset), the point the policy is evaluated at; otherwise
w ~ Dirichlet(α 1_K) with α = `rl.weight_concentration` (1: uniform over the simplex; below 1:
corners, one objective dominating; above 1: near uniform).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from morlaif.artifacts import read_json, write_json
from morlaif.config import derived_seed
from morlaif.errors import InputError
from morlaif.generation import Messages, chat
from morlaif.scalarize import WEIGHTED, weight_vector

PREFIX = "weights:"
FILE = "conditioning.json"  # written beside a conditioned policy's weights
_ITEM = re.compile(r"([^\s=]+)=([0-9]*\.?[0-9]+)")


def weights_line(objectives: Sequence[str], w) -> str:
    """'weights: a=0.40 b=0.60' for weights w (K,) (normalised to sum 1 first)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    w = w / w.sum()
    return PREFIX + " " + " ".join(f"{o}={x:.2f}" for o, x in zip(objectives, w.tolist()))


def parse_weights_line(line: str, objectives: Sequence[str]) -> torch.Tensor:
    """The weights (K,) a weights line states, in `objectives` order (an objective it leaves out: 0)."""
    if not line.startswith(PREFIX):
        raise ValueError(f"not a weights line: {line!r}")
    stated = {k: float(v) for k, v in _ITEM.findall(line[len(PREFIX):])}
    return torch.tensor([stated.get(o, 0.0) for o in objectives], dtype=torch.float32)


def messages(prompt: str, objectives: Sequence[str], w) -> Messages:
    """The conversation a conditioned policy answers: the weights line as the system message, then the prompt."""
    return chat(prompt, system=weights_line(objectives, w))


def shown(objectives: Sequence[str], w) -> torch.Tensor:
    """The weights as the policy reads them (two decimals): what the reward is computed under."""
    return parse_weights_line(weights_line(objectives, w), objectives)


class Conditioning:
    """The weight stream of one conditioned RL run over `objectives`."""

    def __init__(self, objectives: Sequence[str], configured: torch.Tensor | None, concentration: float,
                 configured_share: float):
        self.objectives = list(objectives)
        K = len(self.objectives)
        self.configured = shown(self.objectives, configured if configured is not None else torch.ones(K))  # (K,)
        self.concentration, self.configured_share = concentration, configured_share

    @classmethod
    def from_config(cls, rl, objectives: Sequence[str]) -> Conditioning | None:
        """The run's conditioning (None with rl.conditioning: none). Refuses what cannot be steered."""
        if rl.conditioning == "none":
            return None
        if rl.algo not in ("ppo", "grpo", "rloo"):
            raise InputError(f"a weight-conditioned policy is trained online (ppo, grpo or rloo), not with {rl.algo}",
                             key="rl.conditioning")
        if rl.scalarizer not in WEIGHTED:
            raise InputError(f"the {rl.scalarizer} scalarizer ignores the weights, so there is nothing to condition on; "
                             f"use one of {', '.join(WEIGHTED)}", key="rl.conditioning")
        if rl.reward_model == "holistic":
            raise InputError("the holistic baseline has one objective: no weights to condition on",
                             key="rl.conditioning")
        return cls(objectives, weight_vector(rl.weights, objectives), rl.weight_concentration,
                   rl.configured_weight_share)

    def draw(self, seed: int, step: int, n: int) -> torch.Tensor:
        """The weights (n, K) of the n episodes of `step`, as the policy reads them; a function of (seed, step)."""
        rng = np.random.default_rng(derived_seed(seed, step))
        K = len(self.objectives)
        dirichlet = torch.from_numpy(rng.dirichlet([self.concentration] * K, size=n)).float()  # (n, K)
        use_configured = torch.from_numpy(rng.random(n) < self.configured_share)  # (n,)
        w = torch.where(use_configured[:, None], self.configured[None, :].expand(n, K), dirichlet)
        return torch.stack([shown(self.objectives, row) for row in w])  # (n, K)

    def messages(self, prompt: str, w=None) -> Messages:
        """The conversation at weights w (K,); None: the configured weights (how eval and the held-out curve ask)."""
        return messages(prompt, self.objectives, self.configured if w is None else w)

    def example(self) -> str:
        """The weights line at the configured weights."""
        return weights_line(self.objectives, self.configured)

    def save(self, policy_dir: Path) -> None:
        """Record the form beside the trained policy: whoever loads the policy (eval, generate, steer, export)
        finds out from the policy itself that it is conditioned, and on what."""
        write_json(Path(policy_dir) / FILE, {
            "form": "system message, one line", "example": self.example(),
            "objectives": self.objectives, "configured": self.configured.tolist(),
            "weight_concentration": self.concentration, "configured_weight_share": self.configured_share})

    @classmethod
    def load(cls, policy_dir: Path) -> Conditioning | None:
        """The conditioning a trained policy records (None: an ordinary policy)."""
        f = Path(policy_dir) / FILE
        if not f.is_file():
            return None
        d = read_json(f)
        return cls(d["objectives"], torch.tensor(d["configured"]), d["weight_concentration"],
                   d["configured_weight_share"])
