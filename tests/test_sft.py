"""SL-CAI stage: exact filter/parse helpers, a tiny-model smoke run, resume, options, and the CLI."""

import json

import pytest
import torch

from morlaif import generation, prompts, sft
from morlaif.artifacts import read_json, read_jsonl, set_aside
from morlaif.constitution import Principle, load_constitution
from morlaif.errors import InputError
from morlaif.promptsets import train_prompts

# --------------------------------------------------------------------------- pure helpers (exact)


def test_words_and_ngrams():
    assert sft.words("Don't  do IT, please!") == ["don't", "do", "it", "please"]
    assert sft.ngrams(["a", "b", "c", "d"], 3) == [("a", "b", "c"), ("b", "c", "d")]
    assert sft.ngrams(["a", "b"], 3) == []


def test_repeat_share_exact():
    # 7 trigrams: abc bca cab abc bca cab abc -> 3 unique -> 4/7 repeats
    assert sft.repeat_share("a b c a b c a b c", 3) == pytest.approx(4 / 7)
    assert sft.repeat_share("one two three four", 3) == 0.0
    assert sft.repeat_share("too short", 3) == 0.0
    assert sft.repeat_share("no no no no", 1) == pytest.approx(3 / 4)


def test_copy_share_exact():
    ref = "Rewrite the response to remove anything dishonest or invented"
    # text 5-grams: (rewrite..remove) in ref, (the..anything) in ref, (response..please) not -> 2/3
    assert sft.copy_share("rewrite the response to remove anything please", ref) == pytest.approx(2 / 3)
    assert sft.copy_share("something else entirely here now", ref) == 0.0
    # shorter than 5 words: whole-phrase containment, on word boundaries
    assert sft.copy_share("the response", ref) == 1.0
    assert sft.copy_share("the respon", ref) == 0.0
    assert sft.copy_share("", ref) == 0.0


def test_similarity_exact():
    assert sft.similarity("Hello, World!", "hello world") == 1.0
    # words [a b c d] vs [a b x d]: 3 matching of 8 total -> 2*3/8
    assert sft.similarity("a b c d", "a b x d") == pytest.approx(0.75)
    assert sft.similarity("a", "b") == 0.0


def test_clean_revision():
    assert sft.clean_revision("Revised answer: I can't help with that.") == "I can't help with that."
    assert sft.clean_revision('  "Please call a locksmith."  ') == "Please call a locksmith."
    assert sft.clean_revision("No.\nCritique: that was rude.\nVerdict: fine") == "No."
    assert sft.clean_revision("REVISION:  Sure.\nVerdict: harmful") == "Sure."
    assert sft.clean_revision("Answer the phone: it rings") == "Answer the phone: it rings"  # label must end in ':'
    assert sft.clean_revision("An answer: keep it") == "An answer: keep it"


def test_parse_verdict():
    assert sft.parse_verdict("It helps a break-in.\nVerdict: harmful, needs revision.") == "harmful, needs revision."
    assert sft.parse_verdict("verdict: ok\nmore\nVERDICT:  bad") == "bad"
    assert sft.parse_verdict("no verdict line here") is None


def test_degenerate_reason_each_reason():
    kw = dict(initial="Sure, get some tools and work on the lock.", prompt="How do I pick a lock?",
              templates=("Example: Revised answer: I can't help with getting into someone else's home at all.",),
              critique="The answer helps someone break into a house without asking why.")
    assert sft.degenerate_reason("   ", **kw) == "empty"
    assert sft.degenerate_reason("...!", **kw) == "empty"
    assert sft.degenerate_reason("I cannot I cannot I cannot I cannot help", **kw) == "repetition"
    assert sft.degenerate_reason("Sure, get some tools and work on the lock!", **kw) == "copy_of_initial"
    assert sft.degenerate_reason("how do I pick a lock", **kw) == "copy_of_prompt"
    assert sft.degenerate_reason("I can't help with getting into someone else's home.", **kw) == "copy_of_template"
    assert sft.degenerate_reason("The answer helps someone break into a house.", **kw) == "copy_of_critique"
    assert sft.degenerate_reason("I won't explain lock picking; a locksmith can open your own door.", **kw) is None
    # copy checks are skipped when nothing to compare with (benign rows)
    assert sft.degenerate_reason("Sure, get some tools and work on the lock.") is None
    # the first matching reason wins: empty before anything else
    assert sft.degenerate_reason("", initial="") == "empty"


def test_degenerate_reason_thresholds():
    text = "a b c a b c a b c"  # repeat share 4/7 = 0.571
    assert sft.degenerate_reason(text, max_repeat=0.6) is None
    assert sft.degenerate_reason(text, max_repeat=0.5) == "repetition"
    assert sft.degenerate_reason("a b c d", initial="a b x d", copy_ratio=0.75) == "copy_of_initial"
    assert sft.degenerate_reason("a b c d", initial="a b x d", copy_ratio=0.76) is None


def test_plan_principles():
    names = ["honesty", "prudence", "justice"]
    assert sft.plan_principles("p", names, 1, "each", 0) == names
    a = sft.plan_principles("p", names, 2, "random", 0)
    assert a == sft.plan_principles("p", names, 2, "random", 0)  # keyed by (seed, prompt): stable on resume
    assert len(a) == 2 and len(set(a)) == 2 and set(a) <= set(names)
    assert len(sft.plan_principles("p", names, 5, "random", 0)) == 5  # more rounds than principles: repeats
    drawn = {sft.plan_principles(f"prompt {i}", names, 1, "random", 0)[0] for i in range(40)}
    assert drawn == set(names)  # every principle gets drawn over many prompts


def test_demonstration_turns():
    c = load_constitution("virtues")
    pr = c.principle("prudence")
    turns = sft.demonstration_turns(pr, c.principles, 3)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3
    pos = pr.demonstrations["positive"]
    assert turns[0]["content"] == pos[0]["prompt"] and turns[1]["content"] == pos[0]["response"]
    assert turns[4]["content"] == c.principle("honesty").demonstrations["positive"][0]["prompt"]
    bare = Principle("x", "d", "c", "r", "q")
    with pytest.raises(InputError):
        sft.demonstration_turns(bare, [bare], 4)


# --------------------------------------------------------------------------- stage on the tiny model


DATA_COLUMNS = {"prompt", "kind", "category", "initial", "critique", "revision", "principle"}


def _lora_tensors(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def test_sft_smoke_artifacts_and_lora_trained(tiny_cfg, prompts_run):
    out = sft.run(tiny_cfg, prompts_run)
    assert out == prompts_run / "sft"
    rows = read_jsonl(out / "data.jsonl", required=DATA_COLUMNS)
    kinds = [r["kind"] for r in rows]
    n_harm, n_benign = tiny_cfg.data.n_sft_harmful, tiny_cfg.data.n_sft_benign
    m = read_json(out / "metrics.json")
    assert m["prompts"] == {"harmful": n_harm, "benign": n_benign}
    assert len(rows) == m["rows"] == n_harm + n_benign - sum(m["dropped"].values())
    assert kinds.count("benign") == m["rows_benign"]
    for r in rows:
        if r["kind"] == "benign":
            assert r["revision"] == r["initial"] and r["critique"] is None and r["principle"] is None
        else:
            assert isinstance(r["critique"], str) and r["principle"] in load_constitution("virtues").names
            assert r["method"] == "critique_revision"
    for k in ("rows", "share_revised", "dropped", "mean_tokens", "loss_curve", "train_wall_time_s"):
        assert k in m
    assert 0.0 <= m["share_revised"] <= 1.0
    assert m["loss_curve"] and all({"step", "loss"} <= set(p) for p in m["loss_curve"])
    assert m["train_steps"] == len(m["loss_curve"])
    man = read_json(out / "manifest.json")
    assert man["status"] == "complete"
    assert man["config_hash"] == tiny_cfg.section_hash("model", "constitution", "generation", "sft")
    # adapter: base recorded, model card with the resolved config, no trainer leftovers
    adapter_cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == tiny_cfg.model.policy
    # sft.lora_target_modules 'all-linear' (the default): every projection, attention and MLP
    assert {t.rsplit(".", 1)[-1] for t in adapter_cfg["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapter_cfg["r"] == tiny_cfg.sft.lora_r
    card = (out / "model" / "README.md").read_text()
    assert "lora_alpha:" in card and "n_sft_harmful: 6" in card
    assert not (out / ".trainer").exists() and not list(out.rglob("checkpoint-*"))
    # LoRA B matrices start at zero (PEFT's init): any non-zero B means training moved them.
    t = _lora_tensors(out / "model")
    b = [v for k, v in t.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)

    # The CLI loads the adapter (base + LoRA) and answers.
    from morlaif import models
    from morlaif.cli import main

    assert type(models.load_model(str(out / "model"))).__name__.startswith("Peft")
    from tests.conftest import TINY

    rc = main(["generate", "--config", str(TINY), "--model", str(out / "model"), "--prompt", "How do I pick a lock?",
               "--max-new-tokens", "6"])
    assert rc == 0

    # Second run: complete manifest, skipped (nothing regenerated).
    calls = []
    orig = generation.generate
    generation.generate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        sft.run(tiny_cfg, prompts_run)
    finally:
        generation.generate = orig
    assert calls == []


def test_sft_resume_skips_finished_prompts(tiny_cfg, prompts_run, monkeypatch):
    tiny_cfg.generation.batch_size = 4  # 6 harmful + 2 benign -> two chunks of 4
    real = generation.generate
    calls: list[int] = []

    def flaky(model, tok, convs, **kw):
        calls.append(len(convs))
        if len(calls) == 4:  # chunk 0 = initial, critique, revision; die at chunk 1's first call
            raise KeyboardInterrupt("simulated crash")
        return real(model, tok, convs, **kw)

    monkeypatch.setattr(generation, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        sft.run(tiny_cfg, prompts_run)
    shard = prompts_run / "sft" / "generations.jsonl"
    first = read_jsonl(shard, shard=True)
    assert len(first) == 4 and not (prompts_run / "sft" / "data.jsonl").exists()
    assert read_json(prompts_run / "sft" / "manifest.json")["status"] == "failed"

    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda m, t, c, **kw: calls.append(len(c)) or real(m, t, c, **kw))
    sft.run(tiny_cfg, prompts_run)
    # Only chunk 1 (2 harmful + 2 benign) is generated: 4 initial answers, 2 critiques, 2 revisions.
    assert calls == [4, 2, 2]
    rows = read_jsonl(shard, shard=True)
    assert len(rows) == 8 and rows[:4] == first  # finished rows untouched
    assert len({r["prompt"] for r in rows}) == 8
    assert read_json(prompts_run / "sft" / "manifest.json")["status"] == "complete"


def test_sft_drops_degenerate_revisions_counted(tiny_cfg, run_dir, monkeypatch):
    """Scripted generations: exact drop counts by reason reach metrics.json and dropped.jsonl."""
    tiny_cfg.data.n_sft_harmful, tiny_cfg.data.n_sft_benign = 4, 2
    prompts_run = prompts.run(tiny_cfg, run_dir).parent
    harmful = [r["prompt"] for r in train_prompts(prompts_run, "harmful", stage="sft")]
    assert len(harmful) == 4
    revisions = {harmful[0]: "", harmful[1]: "Sure, here it is.", harmful[2]: "no no no no no no no",
                 harmful[3]: "I won't help with that, but a professional can."}

    def fake(model, tok, convs, **kw):
        desc = kw["desc"]
        out = []
        for c in convs:
            prompt = c[0]["content"]
            if desc == "initial":
                out.append("Sure, here it is." if prompt in revisions else "A helpful benign answer.")
            elif desc.startswith("critique"):
                out.append("It helps with harm. Verdict: harmful.")
            else:
                out.append("Revised answer: " + revisions[prompt])
        return out

    monkeypatch.setattr(generation, "generate", fake)
    out = sft.run(tiny_cfg, prompts_run)
    m = read_json(out / "metrics.json")
    assert m["dropped"] == {"empty": 1, "copy_of_initial": 1, "repetition": 1}
    assert m["rows"] == 3 and m["rows_revised"] == 1 and m["rows_benign"] == 2
    assert m["share_revised"] == 0.75  # 3 of 4 revisions differ from the initial answer (before filtering)
    assert m["critique_with_verdict"] == 1.0
    dropped = read_jsonl(out / "dropped.jsonl")
    assert sorted(r["drop_reason"] for r in dropped) == ["copy_of_initial", "empty", "repetition"]
    kept = [r for r in read_jsonl(out / "data.jsonl") if r["kind"] == "harmful"]
    assert kept[0]["revision"] == "I won't help with that, but a professional can."  # label stripped
    assert kept[0]["verdict"] == "harmful."


def test_sft_rounds_and_context_distillation(tiny_cfg, run_dir, monkeypatch):
    seen = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda m, t, c, **kw: seen.append((kw["desc"], c)) or real(m, t, c, **kw))
    tiny_cfg.data.n_sft_harmful, tiny_cfg.data.n_sft_benign = 2, 0
    prompts_run = prompts.run(tiny_cfg, run_dir).parent
    tiny_cfg.sft.rounds = 2
    tiny_cfg.sft.completion_only_loss = False  # `messages` rows, loss on every token
    tiny_cfg.sft.filter_max_repeat = 1.0  # random-model text: keep rows, this test is about structure
    out = sft.run(tiny_cfg, prompts_run)
    assert [d for d, _ in seen] == ["initial", "critique 1", "revision 1", "critique 2", "revision 2"]
    # round 2 critiques round 1's revision, in the same conversation shape
    gen = read_jsonl(out / "generations.jsonl", shard=True)
    for conv in seen[3][1]:
        assert [m["role"] for m in conv] == ["user", "assistant", "user"]
        assert conv[1]["content"] in {r["revisions"][0] for r in gen}
    for r in gen:
        assert len(r["critiques"]) == 2 and len(r["principles"]) == 2 and len(set(r["principles"])) == 2
    for r in read_jsonl(out / "data.jsonl"):
        assert isinstance(r["critique"], list) and isinstance(r["principle"], list) and len(r["revisions"]) == 2

    seen.clear()
    tiny_cfg.sft.context_distillation = True
    with pytest.raises(InputError, match="sft.context_distillation: false -> true"):
        sft.run(tiny_cfg, prompts_run)  # config changed: refused, the finished stage kept
    assert not seen and read_json(out / "metrics.json")["method"] == "critique_revision"
    set_aside(out)  # what --force does
    out = sft.run(tiny_cfg, prompts_run)
    assert [d for d, _ in seen] == ["initial", "distil"]
    conv = seen[1][1][0]
    assert len(conv) == 2 * tiny_cfg.sft.cd_shots + 1 and conv[-1]["role"] == "user"
    rows = read_jsonl(out / "data.jsonl")
    assert all(r["method"] == "context_distillation" and r["critique"] is None for r in rows)
    assert read_json(out / "metrics.json")["method"] == "context_distillation"


def test_sft_needs_prompts_stage(tiny_cfg, run_dir):
    with pytest.raises(InputError):
        sft.run(tiny_cfg, run_dir)


def test_sft_rounds_zero_distils_the_initial_answers(tiny_cfg, prompts_run):
    """sft.rounds 0: no critique, the initial writer's answers are the targets of every prompt (none dropped
    as a copy of the initial answer), and metrics say what the targets are."""
    tiny_cfg.sft.rounds = 0
    calls = []
    orig = generation.generate
    generation.generate = lambda *a, **k: calls.append(k.get("desc")) or orig(*a, **k)
    try:
        out = sft.run(tiny_cfg, prompts_run)
    finally:
        generation.generate = orig
    assert calls == ["initial"]  # one generation per chunk: the answers, nothing critiqued
    rows = read_jsonl(out / "data.jsonl", required=DATA_COLUMNS)
    assert all(r["revision"] == r["initial"] and r["critique"] is None for r in rows)
    assert {r["method"] for r in rows if r["kind"] == "harmful"} == {"answer"}
    m = read_json(out / "metrics.json")
    assert m["method"] == "answer" and "copy_of_initial" not in m["dropped"]
    assert m["writers"] == {"initial": "tiny", "critique_revision": None}
    assert set(m["refusal_rate"]) == {"initial_harmful", "target_harmful", "target_benign"}


def test_sft_trainer_settings_full_fine_tune_and_tensorboard(tiny_cfg, tmp_path, monkeypatch):
    """sft.lr_scheduler_type / warmup_steps / activation_checkpointing / lora_target_modules / trl_args
    reach TRL's SFTConfig and the adapter; curves go to RUN/sft/tensorboard; sft.use_peft false trains
    every weight and saves a whole model morlaif loads back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from morlaif import models, training

    built = []
    real = training.trl_config
    monkeypatch.setattr(training, "trl_config", lambda *a: built.append(real(*a)) or built[-1])
    rows = [{"prompt": f"Question {i}?", "revision": f"Answer number {i}, briefly."} for i in range(4)]
    out = tmp_path / "run" / "sft"
    out.mkdir(parents=True)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.logging.report_to = "tensorboard"
    for k, v in dict(lr_scheduler_type="cosine", warmup_steps=0.5, activation_checkpointing=True,
                     lora_target_modules=["q_proj", "down_proj"], trl_args={"weight_decay": 0.05}).items():
        setattr(cfg.sft, k, v)
    model, tok = models.load("tiny", cfg.model)
    res = sft.train(cfg, model, tok, rows, out)
    (args,) = built
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay) == ("cosine", 0.5, 0.05)
    assert args.activation_checkpointing and args.learning_rate == cfg.sft.learning_rate
    targets = {t.rsplit(".", 1)[-1] for t in res["model"].peft_config["default"].target_modules}
    assert targets == {"q_proj", "down_proj"}
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]

    cfg.sft.use_peft, cfg.sft.activation_checkpointing, cfg.logging.report_to = False, False, "none"
    cfg.sft.learning_rate, cfg.sft.lr_scheduler_type, cfg.sft.warmup_steps = 1e-3, "constant", 0  # one step
    model, tok = models.load("tiny", cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = sft.train(cfg, model, tok, rows, out)
    full = res["model"]
    assert not hasattr(full, "peft_config")
    moved = [n for n, p in full.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(moved) == len(before)  # every weight trained
    models.save_model(full, tok, tmp_path / "full")
    assert [p.name for p in models.saved_model_files(tmp_path / "full")] == ["config.json", "model.safetensors"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        again = models.load_model(str(tmp_path / "full"), device="cpu")(input_ids=ids).logits
        assert torch.allclose(again, full.eval()(input_ids=ids).logits, atol=1e-5)


def test_refusal_filter_drops_red_team_compliance_and_benign_refusals(tiny_cfg):
    rows = [{"kind": "harmful", "revision": "I'm sorry, but I can't assist with that."},
            {"kind": "harmful", "revision": "Sure! Here is how you do it: first, ..."},
            {"kind": "benign", "revision": "Photosynthesis turns light into sugar."},
            {"kind": "benign", "revision": "I cannot help with that request."}]
    assert [sft.refusal_mismatch(r) for r in rows] == [None, "red_team_target_complies", None,
                                                        "benign_target_refuses"]
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.sft.refusal_filter = True
    rows = [{**r, "prompt": f"p{i}", "initial": r["revision"], "method": "answer"} for i, r in enumerate(rows)]
    kept, dropped = sft.filter_rows(cfg, rows, {})
    assert [r["prompt"] for r in kept] == ["p0", "p2"]
    assert [r["drop_reason"] for r in dropped] == ["red_team_target_complies", "benign_target_refuses"]
    cfg.sft.refusal_filter = False
    assert len(sft.filter_rows(cfg, rows, {})[0]) == 4
