import pytest

from morlaif.artifacts import write_jsonl
from morlaif.errors import InputError
from morlaif.refusal import PATTERNS, is_refusal, refusal_rate, rule_decisions, rule_reward

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "I’m not comfortable sharing that information.",
    "Sorry, but that is something I won't do.",
    "As an AI, I don't have the ability to access personal data.",
    "That's illegal, and I won't help you hack into someone's account.",
    "I would strongly advise against doing this; it could hurt someone.",
    "I can't assist with finding someone's home address.",
    "I must decline this request.",
    "I'm unable to assist with that question.",  # missed before (the pattern wanted "i 'm unable")
    "I am not able to share that.",
    "Please don't attempt this; poaching endangered animals is a crime.",
    "That's not something I can help with, but here is a safer option.",
    "",
]
COMPLIANT = [
    "Sure! Photosynthesis is how plants turn sunlight into food.",
    "To kill a Python process, run `kill <pid>` or use psutil.Process(pid).kill().",
    "Here is a recipe for banana bread: mash three bananas, mix with flour and sugar.",
    "I can't stress enough how important it is to back up your data regularly.",
    "The capital of Australia is Canberra.",
    "First, preheat the oven to 180°C. " + "Then mix the batter well. " * 8 + "I cannot guarantee results.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", COMPLIANT)
def test_compliance_not_detected(text):
    assert not is_refusal(text)


def test_every_pattern_fires_on_some_refusal():
    import re

    from morlaif.refusal import normalise

    for p in PATTERNS:
        assert any(re.search(p, normalise(t)) for t in REFUSALS), p


def test_refusal_rate_exact():
    assert refusal_rate(["I cannot do that.", "Sure, here you go.", "Sure.", "I won't help."]) == 0.5
    assert refusal_rate([]) is None


def test_rule_reward_exact():
    """+1 where the response refuses exactly when it should, -1 otherwise; lengths must match."""
    responses = ["I'm sorry, but I can't help with that.", "Sure, here it is.", "I cannot do that.", "The answer is 4."]
    assert rule_reward(responses, [True, False, False, True]) == [1.0, 1.0, -1.0, -1.0]
    with pytest.raises(ValueError):
        rule_reward(responses, [True])


def test_rule_decisions_read_and_missing(tmp_path):
    """The decisions of the prompts asked for, in their order; a missing file or prompt names the key and the file."""
    with pytest.raises(InputError, match="rl.refusal_reward") as e:
        rule_decisions(tmp_path, ["a"])
    assert e.value.file.endswith("decisions.jsonl")
    write_jsonl(tmp_path / "feedback" / "decisions.jsonl",
                [{"prompt": "a", "split": "rl", "answer": "No.", "refuses": True},
                 {"prompt": "b", "split": "rl", "answer": "Sure", "refuses": False}])
    assert rule_decisions(tmp_path, ["b", "a"]) == {"b": False, "a": True}
    with pytest.raises(InputError, match="1 of 2 have none"):
        rule_decisions(tmp_path, ["a", "c"])
