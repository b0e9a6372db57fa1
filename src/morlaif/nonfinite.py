"""Steps with a NaN or inf reward or loss are skipped, counted and named, and the run stops after too many.

One NaN that reaches an optimiser step poisons every weight it touches (Adam's moments keep it),
so a non-finite quantity must be caught before `backward()` / `optimizer.step()`. An isolated
one (a reward model overflowing on one odd response) is survivable: skip the update and go on.
Many in a row mean the run has diverged: stop with one clear line rather than train on garbage.
"""

from __future__ import annotations

import math
import warnings

import torch

from morlaif.errors import RunError


def nonfinite_names(**quantities) -> list[str]:
    """Names of the quantities (tensors or numbers) holding any NaN or ±inf."""
    bad = []
    for name, x in quantities.items():
        if torch.is_tensor(x):
            if not bool(torch.isfinite(x.detach()).all()):
                bad.append(name)
        elif not math.isfinite(float(x)):
            bad.append(name)
    return bad


class NonFiniteGuard:
    """`check(step, reward=r, loss=l)` -> True when all are finite; else warns, counts, and raises
    `RunError` once more than `limit` steps were skipped. `count` survives a resume through checkpoints."""

    def __init__(self, stage: str, limit: int, key: str, count: int = 0, any_process=None):
        self.stage, self.limit, self.key, self.count = stage, limit, key, count
        self.steps: list[int] = []  # steps skipped in this process
        # Several processes: any_process(flag) -> True when the flag is set on any of them. Every
        # process must skip the same steps, or one waits in backward() for gradients that never come.
        self.any_process = any_process

    def check(self, step: int, **quantities) -> bool:
        bad = nonfinite_names(**quantities)
        if self.any_process is not None and self.any_process(bool(bad)) and not bad:
            bad = ["values on another process"]
        if not bad:
            return True
        self.count += 1
        self.steps.append(step)
        what = ", ".join(bad)
        if self.count > self.limit:
            raise RunError(f"[{self.stage}] step {step}: non-finite {what}; {self.count} steps skipped for NaN/inf, "
                           f"more than {self.key}={self.limit}: stopping (lower the learning rate, or check the rewards)")
        warnings.warn(f"[{self.stage}] step {step}: non-finite {what}, step skipped "
                      f"({self.count}/{self.limit} allowed by {self.key})", RuntimeWarning, stacklevel=2)
        return False
