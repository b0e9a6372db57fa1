"""The stage lifecycle's one rule (`morlaif.lifecycle`): inputs are their content, hashed by one function;
a stage is done, resumed, refused or redone by `stage_state`, and a manifest an older morlaif wrote (raw
file hashes) is checked as it was, then adopted. No model is loaded: files stand in for weights."""

import json

import pytest

from morlaif.artifacts import sha256_file
from morlaif.errors import InputError
from morlaif.lifecycle import HASHING, content_hash, read_manifest, run_stage, stage_state

ADAPTER = {"base_model_name_or_path": "/somewhere/run/sft/model", "peft_type": "LORA", "r": 4,
           "target_modules": ["v_proj", "q_proj", "o_proj"], "lora_alpha": 8}


def _model(d, weights=b"\x00\x01", adapter=ADAPTER, card="trained in 3.2 s"):
    """A saved adapter as PEFT and models.save_adapter leave it: config, weights, tokenizer, model card, marker."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    (d / "adapter_model.safetensors").write_bytes(weights)
    (d / "tokenizer.json").write_text('{"vocab": {}}')
    (d / "README.md").write_text(card)
    (d / ".complete").write_text("")
    return d


def test_content_hash_is_the_weights_not_how_they_were_written(tmp_path):
    a = content_hash(_model(tmp_path / "a"))
    # PEFT writes target_modules in set order (it differs between processes); a stacked adapter names its
    # base by absolute path (a moved run); the model card holds wall times: none of it is content
    same = {**ADAPTER, "target_modules": ["q_proj", "o_proj", "v_proj"], "base_model_name_or_path": "/elsewhere/m"}
    assert content_hash(_model(tmp_path / "b", adapter=same, card="trained in 9.9 s")) == a
    (tmp_path / "b" / ".adapter_model.safetensors.x1.tmp").write_bytes(b"half")  # a killed writer's temp file
    assert content_hash(tmp_path / "b") == a
    # the weights, a setting, a module, the tokenizer, a base named by Hub id are
    assert content_hash(_model(tmp_path / "c", weights=b"\x00\x02")) != a
    assert content_hash(_model(tmp_path / "d", adapter={**ADAPTER, "r": 8})) != a
    assert content_hash(_model(tmp_path / "e", adapter={**ADAPTER, "target_modules": ["q_proj", "v_proj"]})) != a
    (tmp_path / "b" / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    assert content_hash(tmp_path / "b") != a
    hub = {**ADAPTER, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert content_hash(_model(tmp_path / "f", adapter=hub)) != content_hash(
        _model(tmp_path / "g", adapter={**hub, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-360M-Instruct"}))
    # a file given alone: the same rule (feedback lists the SFT adapter's files)
    assert content_hash(tmp_path / "a" / "adapter_config.json") == content_hash(tmp_path / "b" / "adapter_config.json")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    assert content_hash(weights) == sha256_file(weights)
    with pytest.raises(InputError, match="file not found"):
        content_hash(tmp_path / "none")


def test_a_stage_notices_new_weights_and_resumes_or_redoes_by_one_rule(tmp_path):
    run = tmp_path / "run"
    policy = _model(run / "rl" / "policy")
    calls = []

    def body(d):
        calls.append(1)
        (d / "out.txt").write_text("x")

    stage = run / "eval"
    run_stage("eval", stage, config={"a": 1}, inputs=[policy], body=body, log=lambda m: None)
    man = read_manifest(stage)
    assert man["input_hashing"] == HASHING and man["inputs"] == {"rl/policy": content_hash(policy)}
    assert stage_state(stage, {"a": 1}, [policy]).done
    # rewritten bit for bit in another process (set order differs): still done, skipped
    _model(policy, adapter={**ADAPTER, "target_modules": ["o_proj", "q_proj", "v_proj"]})
    run_stage("eval", stage, config={"a": 1}, inputs=[policy], body=body, log=lambda m: None)
    assert calls == [1]
    # new weights: not done, refused naming the input; nothing touched
    _model(policy, weights=b"\x07\x07")
    state = stage_state(stage, {"a": 1}, [policy])
    assert not state.done and state.changes == ["input rl/policy changed"]
    with pytest.raises(InputError, match=r"\(input rl/policy changed\); nothing was changed"):
        run_stage("eval", stage, config={"a": 1}, inputs=[policy], body=body, log=lambda m: None)
    assert calls == [1] and read_manifest(stage) == man
    run_stage("eval", stage, config={"a": 1}, inputs=[policy], body=body, force=True, log=lambda m: None)
    assert calls == [1, 1] and read_manifest(stage)["inputs"] == {"rl/policy": content_hash(policy)}


def test_a_manifest_of_an_older_morlaif_is_checked_as_it_was_then_adopted(tmp_path):
    """Before content hashing a manifest held raw sha256 of the files it listed (eval: the adapter's config
    only). Unchanged that way: skipped, and its inputs' content hashes are recorded from then on; changed: refused."""
    run = tmp_path / "run"
    policy = _model(run / "rl" / "policy")
    prompts = run / "prompts" / "eval.jsonl"
    prompts.parent.mkdir()
    prompts.write_text('{"prompt": "hi", "kind": "benign"}\n')
    stage = run / "eval"
    stage.mkdir()
    old = {"stage": "eval", "config": {"a": 1}, "status": "complete",
           "inputs": {"prompts/eval.jsonl": sha256_file(prompts),
                      "rl/policy/adapter_config.json": sha256_file(policy / "adapter_config.json")}}
    (stage / "manifest.json").write_text(json.dumps(old))
    body = lambda d: pytest.fail("ran again")  # noqa: E731
    run_stage("eval", stage, config={"a": 1}, inputs=[prompts, policy], body=body, log=lambda m: None)
    adopted = read_manifest(stage)
    assert adopted["input_hashing"] == HASHING and adopted["status"] == "complete"
    assert adopted["inputs"] == {"prompts/eval.jsonl": content_hash(prompts), "rl/policy": content_hash(policy)}
    _model(policy, weights=b"new")  # from now on the weights count
    assert stage_state(stage, {"a": 1}, [prompts, policy]).changes == ["input rl/policy changed"]

    (stage / "manifest.json").write_text(json.dumps(old))  # an old manifest whose recorded file changed since
    prompts.write_text('{"prompt": "bye", "kind": "benign"}\n')
    with pytest.raises(InputError, match="input prompts/eval.jsonl changed"):
        run_stage("eval", stage, config={"a": 1}, inputs=[prompts, policy], body=body, log=lambda m: None)
