"""Processes and devices: which process is the main one, barriers, per-process slices, the accelerator.

Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1) every process runs the same command:
the main process is the only one that writes artifacts, the others wait for it; training loops
take their slice of every batch, DDP averages the gradients, and a skipped step must be skipped on
every process at once. In a plain process every function here is a no-op or the identity.

Light on import (only `os`): `import morlaif` reaches this module through the stage manifests.
torch and accelerate load inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import timedelta
from pathlib import Path

from morlaif.errors import InputError

# Ranks that wait in a barrier while the main process alone generates or labels (prompts,
# feedback, eval, SL-CAI generation) can wait for hours on a big model; the launcher already
# stops every process when one dies, so a long timeout only delays the report of a real hang.
BARRIER_TIMEOUT_H = 24


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(device: str = "auto"):
    """'auto' | 'cpu' | 'cuda' -> torch.device ('auto' = cuda when available)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA requested but not available", key="model.device")
    return torch.device(device)


def cpu_computes_bf16() -> bool:
    """The CPU has bf16 arithmetic (AVX512-BF16 or AMX): there a bf16 matmul runs 2-4x faster than fp32
    (on the 2-core machine this project is built on: 420 vs 160 GFLOP/s). Elsewhere bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def mixed_precision(setting: str, device: str = "auto") -> str:
    """model.mixed_precision resolved: 'auto' = 'bf16' on a CUDA device with bf16, else 'no'.

    Not on CPUs with bf16 arithmetic either: there (AVX512-BF16) bf16 autocast makes a LoRA step of
    the policy 1.44 times faster (`morlaif bench`), but the embedded default's aligned policy refused
    fewer held-out harmful prompts with it (0.40 against 0.50)."""
    if setting != "auto":
        return setting
    import torch

    dev = pick_device(device)
    return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def process_state(device: str = "auto"):
    """accelerate's PartialState (rank, world size, barrier) when launched with several processes, else None.

    The first call joins the process group: NCCL on CUDA; gloo on CPU, which needs `cpu=True`
    (without it accelerate leaves CPU processes unconnected, each believing it is alone).
    Later calls return the same state whatever `device` says.
    """
    if world_size() <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=pick_device(device).type == "cpu", timeout=timedelta(hours=BARRIER_TIMEOUT_H))


def is_main_process() -> bool:
    state = process_state()
    return state is None or state.is_main_process


def wait_for_everyone() -> None:
    state = process_state()
    if state is not None:
        state.wait_for_everyone()


def per_process(n: int, key: str) -> int:
    """This process's share of a config batch size. Batch sizes in the config count over all
    launched processes (one optimisation step), so a recipe means the same on 1 or 8 GPUs."""
    world = world_size()
    if n % world:
        raise InputError(f"{n} does not split evenly over {world} processes (batch sizes count over all of them)",
                         key=key)
    return n // world


def process_slice(batch: list, rank: int, n_local: int) -> list:
    """Rank `rank`'s `n_local` items of a whole-batch list (rank 0 and a single process: the first ones)."""
    return batch[rank * n_local : (rank + 1) * n_local]


# ----------------------------------------------------------------------------- our training loops


def make_accelerator(device: str = "auto", precision: str = "no"):
    """An `accelerate.Accelerator` for our own training loops (PPO, preference models).

    DDP over every launched process (one process: no wrapping at all, so a plain run computes
    exactly what it did without accelerate); mixed precision comes from the launch config
    (`accelerate launch --mixed_precision bf16` or the config file), else `precision` (a resolved
    model.mixed_precision: 'no' or 'bf16'; the prepared model's forward then autocasts). FSDP and
    DeepSpeed shard the weights, which our rollouts (`generate` on the unwrapped policy) and
    adapter saving do not handle: those configs are for the TRL stages, and are refused here.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    process_state(device)
    # A TRL trainer earlier in this process leaves its own accelerator state behind (bf16 on CUDA,
    # its accumulation state); start from the launch config instead, as transformers'
    # TrainingArguments does for itself. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch` from its config
    acc = Accelerator(cpu=pick_device(device).type == "cpu", mixed_precision=None if launched else precision)
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise InputError(f"morlaif's own PPO and preference-model loops run under DDP, not {acc.distributed_type.value}: "
                         "launch them with the ddp config (`morlaif config --accelerate ddp`; FSDP/DeepSpeed configs are for "
                         "the TRL stages)",
                         key="accelerate config")
    return acc


def across_processes(accelerator, device):
    """`any_process` for NonFiniteGuard under accelerate (a flag summed over processes); None in one process.

    Every process must skip the same steps, or one waits in backward() for gradients that never come."""
    if accelerator.num_processes <= 1:
        return None
    import torch

    return lambda flag: accelerator.reduce(torch.tensor(float(flag), device=device), "sum").item() > 0


def param_checksum(named_params) -> str:
    """sha256 (16 hex) of (name, tensor) pairs in name order: equal on every process exactly when
    DDP has kept the trained weights in sync (metrics.json reports one per process)."""
    h = hashlib.sha256()
    for name, p in sorted(named_params, key=lambda np_: np_[0]):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def gathered_checksums(named_params) -> list[str]:
    """One `param_checksum` per process, in rank order (every process must call it)."""
    from accelerate.utils import gather_object

    return gather_object([param_checksum(named_params)])
