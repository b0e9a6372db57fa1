"""`morlaif export`: folders that plain transformers / PEFT load in a fresh interpreter that never imports
morlaif, giving the logits (policies) and scores (preference models) morlaif's own loading gives."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from morlaif import models
from morlaif.cli import main
from morlaif.config import load_config
from morlaif.constitution import aspect_questions
from morlaif.preference import RewardScorer

from conftest import OBJECTIVES

PROBE = [{"role": "user", "content": "Tell me how to stay safe online."}]

# Runs in a fresh interpreter: plain transformers + PEFT, nothing of morlaif.
LOADER = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from peft import AutoPeftModelForCausalLM

job = json.loads(sys.argv[1])
out = {}
for name, (kind, path) in job["models"].items():
    tok = AutoTokenizer.from_pretrained(path)
    if kind == "rm":
        rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
        enc = tok(job["texts"], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out[name] = rm(**enc).logits  # (n, K)
        continue
    cls = AutoPeftModelForCausalLM if kind == "adapter" else AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    text = tok.apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True)
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out[name] = model(**enc).logits[0]  # (T, V)
    out[name + ".ids"] = enc["input_ids"][0]
save_file({k: v.contiguous() for k, v in out.items()}, job["result"])
assert "morlaif" not in sys.modules, "the loader imported morlaif"
print("no morlaif")
"""


def fresh_interpreter(models_: dict, tmp: Path, texts=(), messages=PROBE) -> dict:
    result = tmp / "result.safetensors"
    job = {"models": models_, "texts": list(texts), "messages": messages, "result": str(result)}
    # -I: no PYTHONPATH, no user site; cwd elsewhere, so nothing of this checkout is importable by accident
    p = subprocess.run([sys.executable, "-I", "-c", LOADER, json.dumps(job)], capture_output=True, text=True,
                       cwd=tmp, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and "no morlaif" in p.stdout, p.stderr[-3000:]
    return load_file(str(result))


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run whose two policy adapters (SFT below, RL on top) have random non-zero B
    matrices, so the export's combination of the two is really exercised."""
    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run, run)
    g = torch.Generator().manual_seed(0)
    for d in (run / "sft" / "model", run / "rl" / "policy"):
        f = d / "adapter_model.safetensors"
        t = load_file(str(f))
        save_file({k: (torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in k else v) for k, v in t.items()},
                  str(f))
    return run


def _morlaif_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = models.load_model(str(path), device="cpu", dtype="float32")
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def test_policy_exports_load_without_morlaif_and_match(run, tmp_path, capsys):
    adapter, merged, sft = tmp_path / "adapter", tmp_path / "merged", tmp_path / "sft"
    assert main(["export", "--run", str(run), "--out", str(adapter)]) == 0
    assert main(["export", "--run", str(run), "--merge", "--out", str(merged)]) == 0
    assert main(["export", "--run", str(run), "--stage", "sft", "--out", str(sft)]) == 0
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sft_r, rl_r = (json.loads((d / "adapter_config.json").read_text())["r"]
                   for d in (run / "sft" / "model", run / "rl" / "policy"))
    assert cfg["r"] == cfg["lora_alpha"] == sft_r + rl_r  # one adapter of the summed rank, scaling 1
    assert Path(cfg["base_model_name_or_path"]).is_absolute()  # tiny is no Hub model: the weights' path
    assert cfg["base_model_name_or_path"] == str(models.tiny_model_path().resolve())
    for d in (adapter, merged, sft):
        names = {p.name for p in d.iterdir()}
        assert {"README.md", "tokenizer_config.json", "generation_config.json"} <= names, names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert (merged / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "## Constitution: `virtues`" in card
    assert "`soft_max_min`" in card and "## Evaluation of this run" in card and "honesty:motivation" in card

    got = fresh_interpreter({"adapter": ("adapter", str(adapter)), "merged": ("merged", str(merged)),
                             "sft": ("adapter", str(sft))}, tmp_path)
    ids = got["adapter.ids"]
    want = _morlaif_logits(run / "rl" / "policy", ids)
    base = _morlaif_logits(models.tiny_model_path(), ids)
    assert (want - base).abs().max() > 1e-2  # the adapters change the model: the comparison means something
    for name in ("adapter", "merged"):
        diff = (got[name] - want).abs().max().item()
        print(f"\n{name}: max |logit difference| vs morlaif's loading {diff:.2e}")
        assert diff < 1e-4, name
    assert (got["sft"] - _morlaif_logits(run / "sft" / "model", ids)).abs().max() < 1e-4
    assert json.loads((sft / "adapter_config.json").read_text())["r"] == sft_r


def test_preference_models_export_as_sequence_classifiers(run, tmp_path):
    out = tmp_path / "rm"
    assert main(["export", "--run", str(run), "--stage", "rm", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {str(k): o for k, o in enumerate(OBJECTIVES)}
    norm = json.loads((run / "rm" / "norm.json").read_text())
    assert config["morlaif"]["normalization"]["mean"] == [norm["mean"][o] for o in OBJECTIVES]
    question = config["morlaif"]["followup_questions"]["honesty:motivation"]
    assert question == aspect_questions()["motivation"]

    # texts as a user feeds them: the chat transcript; the aspect objective's with the follow-up turns
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    pairs = [("How do I pick a lock?", "I can't help with that."), ("Bake bread?", "Mix flour, water, yeast.")]
    answers = ["To avoid harm.", "To be useful."]
    plain = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in pairs]
    aspect = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r},
                                       {"role": "user", "content": question}, {"role": "assistant", "content": a}],
                                      tokenize=False) for (p, r), a in zip(pairs, answers)]
    got = fresh_interpreter({"rm": ("rm", str(out))}, tmp_path, texts=plain + aspect)["rm"]  # (4, K)
    scorer = RewardScorer.load(run, load_config(run / "config.yaml"))
    want = scorer.score([p for p, _ in pairs], [r for _, r in pairs], {"motivation": answers}).cpu()  # (2, K)
    k = OBJECTIVES.index("honesty:motivation")
    action = [i for i in range(len(OBJECTIVES)) if i != k]
    diff = max((got[:2, action] - want[:, action]).abs().max().item(), (got[2:, k] - want[:, k]).abs().max().item())
    print(f"\nrm: max |score difference| vs RewardScorer {diff:.2e} (batch of 4, right-padded)")
    assert diff < 1e-4


def test_separate_layout_exports_one_model_per_objective(run, tmp_path):
    sep = tmp_path / "sep"
    shutil.copytree(run, sep)
    assert main(["rm", "--run", str(sep), "--force", "--set", "rm.layout=separate",
                 "--set", "constitution.objectives=[honesty, prudence]", "--set", "rm.baseline=false"]) == 0
    out = tmp_path / "rm"
    assert main(["export", "--run", str(sep), "--stage", "rm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "honesty", "prudence"]
    for o in ("honesty", "prudence"):
        assert json.loads((out / o / "config.json").read_text())["id2label"] == {"0": o}


def test_export_refuses_bad_requests(run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--stage", "rm", "--merge", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_exports_load_without_morlaif(tmp_path):
    """The embedded SmolLM2 (pad = EOS = <|im_end|>, a token in every turn): the adapter names its local
    de-quantized weights, the card the Hub id; logits and scores match morlaif's own loading in a fresh
    interpreter. The run is built as its stages leave it (random non-zero adapters), not trained."""
    from peft import LoraConfig, get_peft_model

    from morlaif import preference, reward

    cfg = load_config(None, ["constitution.objectives=[honesty, prudence:motivation]"])  # the embedded default
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    g = torch.Generator().manual_seed(0)

    def randomize(model):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model

    tok = models.load_tokenizer(models.EMBEDDED)
    sft = randomize(get_peft_model(models.load_model(models.EMBEDDED, device="cpu"),
                                   LoraConfig(r=4, lora_alpha=8, target_modules=cfg.sft.lora_target_modules,
                                              task_type="CAUSAL_LM")))
    models.save_adapter(sft, tok, run / "sft" / "model", base=models.EMBEDDED)
    base, _ = models.load_sft_policy(str(run / "sft" / "model"), cfg.model)
    rl = randomize(get_peft_model(base, models.policy_lora(4)))
    models.save_adapter(rl, tok, run / "rl" / "policy", base=str(run / "sft" / "model"))
    objectives = ["honesty", "prudence:motivation"]
    backbone = preference.load_backbone(models.EMBEDDED, torch.device("cpu"), torch.float32, False)
    net = randomize(preference.add_adapter(backbone, None, preference.MULTIHEAD_ADAPTER, 4))
    trained = reward.Trained(net, preference.load_scoring_tokenizer(models.EMBEDDED, False),
                             {preference.MULTIHEAD_ADAPTER: preference.make_head(backbone.config.hidden_size, 2, 0)},
                             dict.fromkeys(objectives, preference.MULTIHEAD_ADAPTER), models.EMBEDDED,
                             torch.device("cpu"), 128, {}, {}, [])
    reward.save(run / "rm", trained, "multihead", objectives, False, torch.zeros(2), torch.ones(2), 10)

    out = {k: tmp_path / k for k in ("adapter", "merged", "rm")}
    assert main(["export", "--run", str(run), "--out", str(out["adapter"])]) == 0
    assert main(["export", "--run", str(run), "--merge", "--out", str(out["merged"])]) == 0
    assert main(["export", "--run", str(run), "--stage", "rm", "--out", str(out["rm"])]) == 0
    assert json.loads((out["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(models.embedded_model_path().resolve())
    for k in out:
        assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in (out[k] / "README.md").read_text(), k
    question = aspect_questions()["motivation"]
    texts = [tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                     tokenize=False),
             tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": question},
                                      {"role": "assistant", "content": "To be friendly."}], tokenize=False)]
    got = fresh_interpreter({"adapter": ("adapter", str(out["adapter"])), "merged": ("merged", str(out["merged"])),
                             "rm": ("rm", str(out["rm"]))}, tmp_path, texts=texts)
    want = _morlaif_logits(run / "rl" / "policy", got["adapter.ids"])
    diffs = {k: (got[k] - want).abs().max().item() for k in ("adapter", "merged")}
    scores = RewardScorer.load(run, cfg).score(["Hi"], ["Hello!"], {"motivation": ["To be friendly."]}).cpu()  # (1, 2)
    diffs["rm"] = max(abs(got["rm"][0, 0] - scores[0, 0]).item(), abs(got["rm"][1, 1] - scores[0, 1]).item())
    print("\nembedded export, max |difference| vs morlaif's loading:", diffs)
    assert all(d < 1e-3 for d in diffs.values()), diffs
