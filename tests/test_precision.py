"""model.mixed_precision: how 'auto' resolves, what TRL and our own loops get, and bf16 stages that train."""

import json

import pytest
import torch
from safetensors.torch import load_file

from morlaif import processes, sft, training
from morlaif.artifacts import read_json, read_jsonl
from morlaif.config import ModelCfg
from tests.test_ppo import PROMPTS, CountScorer, _rl_cfg


@pytest.mark.parametrize("setting,want", [("no", "no"), ("bf16", "bf16"), ("auto", "no")])
def test_mixed_precision_resolves_and_reaches_trl(monkeypatch, setting, want):
    monkeypatch.setattr(processes, "cpu_computes_bf16", lambda: True)  # 'auto' stays fp32 on CPUs, bf16-capable ones too
    assert processes.mixed_precision(setting, "cpu") == want
    args = training.precision_arguments(ModelCfg(mixed_precision=setting, device="cpu"))
    assert args["bf16"] is (want == "bf16") and args["use_cpu"] is True


class AutocastProbe(torch.nn.Module):
    """Records whether its forward ran under CPU autocast, and in which dtype."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return self.lin(x)


def test_our_loops_autocast_unless_the_launch_config_says_otherwise(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for precision, want in (("bf16", torch.bfloat16), ("no", False)):
        probe = AutocastProbe()
        net = processes.make_accelerator("cpu", precision).prepare(probe)
        net(torch.ones(1, 4))
        assert probe.seen == [want]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no`
    probe = AutocastProbe()
    processes.make_accelerator("cpu", "bf16").prepare(probe)(torch.ones(1, 4))
    assert probe.seen == [False]


def test_bf16_sft_and_ppo_train(tiny_cfg, prompts_run, tmp_path):
    """Under bf16 autocast the LoRA weights stay fp32 and move; the logged losses are finite."""
    from morlaif import models, ppo

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.mixed_precision = "bf16"
    out = sft.run(cfg, prompts_run)
    m = read_json(out / "metrics.json")
    assert m["loss_curve"] and all(p["loss"] == p["loss"] for p in m["loss_curve"])  # no NaN
    b = [v for k, v in load_file(str(out / "model" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and all(v.dtype == torch.float32 and v.abs().sum() > 0 for v in b)

    rl_cfg = _rl_cfg(cfg, steps=2, batch_size=2, mini_batch_size=2, max_new_tokens=4, learning_rate=1e-2,
                     save_every=100)
    assert rl_cfg.model.mixed_precision == "bf16"
    tok = models.load_tokenizer(models.TINY)
    ppo.train(rl_cfg, tmp_path, tmp_path / "rl", scorer=CountScorer(tok, target=tok.eos_token_id),
              init=models.TINY, prompts=PROMPTS)
    log = read_jsonl(tmp_path / "rl" / "log.jsonl")
    assert len(log) == 2 and all(r["policy_loss"] == r["policy_loss"] for r in log)
    b = [v for k, v in load_file(str(tmp_path / "rl" / "policy" / "adapter_model.safetensors")).items()
         if "lora_B" in k]
    assert b and all(v.dtype == torch.float32 for v in b) and any(v.abs().sum() > 0 for v in b)
    assert json.loads((tmp_path / "rl" / "policy" / "adapter_config.json").read_text())["r"] == rl_cfg.rl.lora_r
