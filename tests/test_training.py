"""The trainer settings every training stage shares (morlaif.training): schedules, LoRA targets, 4-bit."""

import pytest
import torch

from morlaif import training
from morlaif.config import load_config
from morlaif.errors import InputError


def test_lr_factors_are_transformers_schedules():
    # linear with 2 warm-up steps over 6: 0, 1/2 while warming up, then (6 - t) / 4
    assert training.lr_factors("linear", 2, 6) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert training.lr_factors("constant", 0, 3) == [1.0, 1.0, 1.0]
    assert training.lr_factors("constant_with_warmup", 0.5, 4) == pytest.approx([0.0, 0.5, 1.0, 1.0])  # a share
    assert training.lr_factors("cosine", 0, 3) == pytest.approx([1.0, 0.75, 0.25])  # ½(1 + cos(π t / 3))


def test_lora_targets_name_the_models_own_layers():
    """GPT-2 (the MORLAIF paper's model) has no q/k/v/o_proj: the error lists its layers; 'all-linear' and
    its own names pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(InputError) as e:
        training.check_lora_targets(gpt2, ["q_proj", "v_proj"], "sft.lora_target_modules")
    assert e.value.key == "sft.lora_target_modules"
    assert "gpt2 has no module named q_proj, v_proj" in str(e.value) and "c_attn" in str(e.value)
    training.check_lora_targets(gpt2, ["c_attn", "c_proj"], "sft.lora_target_modules")
    training.check_lora_targets(gpt2, "all-linear", "sft.lora_target_modules")
    from peft import get_peft_model

    from morlaif import models

    peft = get_peft_model(gpt2, models.policy_lora(4, "all-linear"))
    targets = {t.rsplit(".", 1)[-1] for t in peft.peft_config["default"].target_modules}
    assert {"c_attn", "c_proj", "c_fc"} <= targets and "lm_head" not in targets


def test_4bit_is_refused_where_it_cannot_apply(monkeypatch):
    with pytest.raises(InputError, match="CUDA") as e:
        training.check_quantization(load_config(None, ["model.load_in_4bit=true"]))
    assert e.value.key == "model.load_in_4bit"
    monkeypatch.setattr(training, "pick_device", lambda device: torch.device("cuda"))  # as on a GPU machine
    training.check_quantization(load_config(None, ["model.load_in_4bit=true"]))  # QLoRA: fine
    with pytest.raises(InputError, match="cannot be fully fine-tuned"):
        training.check_quantization(load_config(None, ["model.load_in_4bit=true", "sft.use_peft=false"]))


def test_trl_config_keeps_one_place_per_setting():
    from trl import DPOConfig

    ours = dict(output_dir="/tmp/x", learning_rate=1e-4, use_cpu=True)
    args = training.trl_config(DPOConfig, "rl", ours, {"bf16": False}, {"weight_decay": 0.1, "bf16": False})
    assert (args.learning_rate, args.weight_decay) == (1e-4, 0.1)
    with pytest.raises(InputError, match="morlaif sets it itself") as e:  # a name the table does not list
        training.trl_config(DPOConfig, "rl", ours, {}, {"use_cpu": False})
    assert e.value.key == "rl.trl_args"


def test_wandb_tracker_names_runs_by_stage(tmp_path, monkeypatch):
    """logging.report_to=wandb: one W&B run per stage, RUN_NAME/STAGE in group RUN_NAME, in the configured
    project; TRL trainers get report_to=['wandb'] and find that run (a stand-in for the wandb package)."""
    import importlib.machinery
    import sys
    import types

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, ["logging.report_to=wandb", "logging.wandb_project=mine", "logging.run_name=sweep-3"])
    training.check_settings(cfg)  # the package is there: accepted
    (tmp_path / "run" / "rm").mkdir(parents=True)
    tracker = training.Tracker(cfg, tmp_path / "run", "rm")
    assert tracker.report_to == ["wandb"] and tracker.trainer_callbacks() == []
    tracker.log({"loss/multihead": 0.5}, 3)
    tracker.close()
    (_, init), log, finish = calls
    assert (init["project"], init["name"], init["group"]) == ("mine", "sweep-3/rm", "sweep-3")
    assert init["config"]["logging"]["report_to"] == "wandb"
    assert log == ("log", {"loss/multihead": 0.5}, 3) and finish == ("finish",)
    assert training.Tracker(load_config(None, ["logging.report_to=wandb"]), tmp_path / "run", "rm").run_name == "run/rm"
