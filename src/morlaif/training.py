"""What every training stage (sft, rm, rl) shares: how its config keys become trainer settings, and
where its curves go.

- TRL stages (SFT; GRPO / RLOO / DPO / IPO / KTO): `trl_config` builds the TRL config class from the
  arguments morlaif sets (from its own keys) plus the section's `trl_args`, the escape hatch for the
  rest. An argument morlaif sets cannot also come from `trl_args` (one place per setting, and it is
  part of the stage's identity either way); an unknown name is an InputError naming the key.
- Our own loops (preference models, PPO) take the same keys: `lr_factors` gives transformers'
  schedules as a function of the step (so a resumed loop needs no scheduler state), and
  `enable_checkpointing` turns on activation checkpointing.
- `Tracker`: TensorBoard in RUN/STAGE/tensorboard/ or one W&B run per stage (`logging` section), the
  same for our loops and, through `trainer_callbacks` / `report_to`, for TRL's trainers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.processes import is_main_process, mixed_precision, pick_device

# The TRL / transformers arguments morlaif sets itself -> the key that sets them (None: morlaif's own
# bookkeeping: checkpoints, log cadence, output folder). `trl_args` cannot set these.
SET_BY_MORLAIF = {
    "output_dir": None, "logging_steps": None, "save_strategy": None, "save_total_limit": None,
    "save_steps": "rl.save_every", "report_to": "logging.report_to", "run_name": "logging.run_name",
    "seed": "seed", "data_seed": "seed",
    "learning_rate": "{section}.learning_rate", "lr_scheduler_type": "{section}.lr_scheduler_type",
    "warmup_steps": "{section}.warmup_steps", "warmup_ratio": "{section}.warmup_steps",
    "activation_checkpointing": "{section}.activation_checkpointing",
    "gradient_checkpointing": "{section}.activation_checkpointing",
    "per_device_train_batch_size": "{section}.batch_size", "max_length": "{section}.max_length",
    "num_train_epochs": "sft.epochs", "completion_only_loss": "sft.completion_only_loss",
    "max_steps": "rl.steps", "max_grad_norm": "rl.max_grad_norm", "gradient_accumulation_steps": "rl.grad_accum",
    "num_generations": "rl.num_generations", "max_completion_length": "rl.max_new_tokens",
    "temperature": "rl.temperature", "epsilon": "rl.clip_coef", "loss_type": "rl.algo",
    "beta": "rl.kl_coef (GRPO, RLOO) or rl.dpo_beta (DPO, IPO, KTO)",
}


def trl_config_class(section: str, algo: str | None = None):
    """The TRL config class a section's `trl_args` go to: SFTConfig for sft, the algorithm's for rl."""
    import trl

    if section == "sft":
        return trl.SFTConfig
    name = {"grpo": "GRPOConfig", "rloo": "RLOOConfig", "dpo": "DPOConfig", "ipo": "DPOConfig", "kto": "KTOConfig"}
    if algo not in name:
        raise InputError(f"rl.algo '{algo}' is morlaif's own loop, not a TRL trainer: it takes no TRL arguments",
                         key="rl.trl_args")
    return getattr(trl, name[algo])


def check_trl_args(section: str, trl_args: dict, algo: str | None = None) -> None:
    """Every name in `trl_args` is an argument of the TRL config class and one morlaif does not set itself."""
    if not trl_args:
        return
    cls = trl_config_class(section, algo)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in trl_args:
        key = f"{section}.trl_args.{k}"
        if k not in names:
            raise InputError(f"not an argument of TRL's {cls.__name__}", key=key)
        if k in SET_BY_MORLAIF:
            ours = SET_BY_MORLAIF[k]
            raise InputError(f"set by morlaif from {ours.format(section=section)}: use that key" if ours else
                             "set by morlaif itself (its checkpoints, logs and output folder)", key=key)


def trl_config(cls, section: str, ours: dict, defaults: dict, trl_args: dict):
    """`cls(**ours, **defaults, **trl_args)`: `ours` are the arguments morlaif's keys set, `defaults` ours
    that `trl_args` may replace (precision, data loading), `trl_args` the section's escape hatch."""
    try:
        return cls(**ours, **{**defaults, **trl_args})
    except TypeError as e:  # an argument given twice: trl_args naming one morlaif sets (not in SET_BY_MORLAIF)
        raise InputError(f"{e}: morlaif sets it itself", key=f"{section}.trl_args") from None
    except ValueError as e:  # TRL's own checks of the combination
        if not trl_args:
            raise
        raise InputError(f"TRL's {cls.__name__} refused the arguments: {str(e).strip().splitlines()[0]}",
                         key=f"{section}.trl_args") from None


def schedule_arguments(sc) -> dict:
    """The trainer settings every training section has, as TrainingArguments."""
    return dict(learning_rate=sc.learning_rate, lr_scheduler_type=sc.lr_scheduler_type, warmup_steps=sc.warmup_steps,
                # transformers 5's name; TRL's gradient_checkpointing=True default follows it
                activation_checkpointing=sc.activation_checkpointing)


def precision_arguments(mc) -> dict:
    """Precision and device of a TRL trainer from the model section (`trl_args` may replace them): bf16
    autocast as model.mixed_precision resolves (TRL's own default is bf16 even where it is emulated)."""
    dev = pick_device(mc.device)
    return dict(bf16=mixed_precision(mc.mixed_precision, mc.device) == "bf16", use_cpu=dev.type == "cpu",
                dataloader_num_workers=0)


def check_quantization(cfg: Config) -> None:
    """model.load_in_4bit where it cannot apply: refused (exit 2) before any stage runs."""
    if not cfg.model.load_in_4bit:
        return
    if pick_device(cfg.model.device).type != "cuda":
        raise InputError("4-bit loading (bitsandbytes) needs a CUDA device", key="model.load_in_4bit")
    if not cfg.sft.use_peft:
        raise InputError("a 4-bit model cannot be fully fine-tuned: set sft.use_peft true (QLoRA) or load_in_4bit "
                         "false", key="model.load_in_4bit")


def check_settings(cfg: Config) -> None:
    """What can be refused before any stage runs: 4-bit loading where it cannot apply, W&B without its
    package, and trl_args names (TRL is imported only when there are some)."""
    check_quantization(cfg)
    if cfg.logging.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise InputError("report_to 'wandb' needs the wandb package: pip install 'morlaif[wandb]'",
                         key="logging.report_to")
    check_trl_args("sft", cfg.sft.trl_args)
    check_trl_args("rl", cfg.rl.trl_args, cfg.rl.algo)


# ----------------------------------------------------------------------------- our own loops


def lr_factors(schedule: str, warmup: int | float, total: int) -> list[float]:
    """The learning-rate multiplier of each of `total` optimiser steps under transformers' schedule
    `schedule` with `warmup` (steps, or a share of them below 1): the same curve a TRL trainer follows."""
    import torch
    from transformers import get_scheduler

    n_warmup = int(warmup * total + 0.5) if isinstance(warmup, float) else int(warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(schedule, opt, num_warmup_steps=n_warmup, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def enable_checkpointing(model) -> None:
    """Activation checkpointing on a transformers model (or a PEFT model around one) in training mode.
    Non-reentrant: with LoRA only the adapters need gradients, which the reentrant variant would lose."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- where curves go


class Tracker:
    """One training stage's logger: TensorBoard events in RUN/STAGE/tensorboard/, or a W&B run named
    RUN_NAME/STAGE in group RUN_NAME (`logging` section), or nothing. Only the main process logs."""

    def __init__(self, cfg: Config, run_dir: Path, stage: str, start_step: int = 0):
        lc = cfg.logging
        self.kind = lc.report_to if is_main_process() else "none"
        self.run_name = f"{lc.run_name or Path(run_dir).resolve().name}/{stage}"
        self.dir = Path(run_dir) / stage / "tensorboard"
        self.tb = self.wandb = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir), purge_step=start_step + 1 if start_step else None)
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise InputError("report_to 'wandb' needs the wandb package: pip install 'morlaif[wandb]'",
                                 key="logging.report_to") from None
            self.wandb = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, name=self.run_name,
                                    group=self.run_name.rsplit("/", 1)[0], dir=str(Path(run_dir) / stage),
                                    config=cfg.model_dump(mode="json"))

    @property
    def report_to(self) -> list[str] | str:
        """TrainingArguments.report_to: W&B through transformers' own callback, which finds the run
        started here; TensorBoard through `trainer_callbacks` (our writer, our folder)."""
        return ["wandb"] if self.kind == "wandb" else "none"

    def trainer_callbacks(self) -> list:
        if self.tb is None:
            return []
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(self.tb)]

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_lora_targets(model, targets: list[str] | str | None, key: str) -> None:
    """Every named LoRA target is a module of `model` (PEFT matches a name or a dotted suffix); a miss is
    an InputError listing the model's linear layers, so a GPT-2 user learns to ask for c_attn or 'all-linear'."""
    if targets is None or isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D") and "." in n})
        kind = getattr(getattr(model, "config", None), "model_type", "this model")
        raise InputError(f"{kind} has no module named {', '.join(missing)}: its linear layers are "
                         f"{', '.join(linear)} (or use 'all-linear')", key=key)
