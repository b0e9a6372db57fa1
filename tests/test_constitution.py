import pytest

from morlaif.constitution import BUILTIN, aspect_questions, load_constitution, load_template
from morlaif.errors import InputError

EXPECTED = {
    "virtues": ["honesty", "prudence", "justice", "compassion", "humility", "respect"],
    "morlaif12": ["helpfulness", "ethicality", "factuality", "toxicity", "sycophancy", "empathy", "relevance",
                  "context", "bias", "understandability", "detail", "conciseness"],
    "hhh": ["helpful", "honest", "harmless"],
}


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_constitutions(name):
    c = load_constitution(name)
    assert c.names == EXPECTED[name]
    for p in c.principles:
        assert p.comparison.endswith("?")
        assert set(p.demonstrations) == {"positive", "negative"}
        assert [d["prompt"] for d in p.demonstrations["positive"]] == [d["prompt"] for d in p.demonstrations["negative"]]


def test_objectives_and_aspects():
    c = load_constitution("virtues")
    assert [o.name for o in c.objectives()] == EXPECTED["virtues"]
    objs = c.objectives(["honesty", "honesty:motivation", "respect:consequence"])
    assert [(o.principle.name, o.aspect, o.name) for o in objs] == [
        ("honesty", "action", "honesty"), ("honesty", "motivation", "honesty:motivation"),
        ("respect", "consequence", "respect:consequence")]
    with pytest.raises(InputError, match="'kindness' is not in constitution"):
        c.objectives(["kindness"])
    with pytest.raises(InputError, match="unknown aspect"):
        c.objectives(["honesty:vibes"])
    with pytest.raises(InputError, match="duplicate"):
        c.objectives(["honesty", "honesty:action"])
    assert set(aspect_questions()) == {"motivation", "consequence"}
    assert c.holistic().name == "holistic"


def test_templates_format():
    assert "{" not in load_template("critique.txt").format(critique_request="X")
    assert "{" not in load_template("revision.txt").format(revision_request="X")
    for t in ("judge.txt", "judge_cot.txt"):
        s = load_template(t).format(prompt="P", response_a="RA", response_b="RB", question="Q?")
        assert "RA" in s and "RB" in s and "Q?" in s


GOOD = """name: mine
principles:
  - name: kindness
    description: be kind
    critique: find unkind parts
    revision: make it kind
    comparison: Which is kinder?
"""


def test_user_constitution_and_errors_name_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    assert load_constitution(str(p)).names == ["kindness"]
    p.write_text(GOOD.replace("    comparison: Which is kinder?\n", ""))
    with pytest.raises(InputError) as e:
        load_constitution(str(p))
    assert str(e.value) == f"{p}:3: key 'principles[0].comparison': missing or empty (a non-empty string is required)"
    p.write_text(GOOD.replace("    revision:", "    colour: blue\n    revision:"))
    with pytest.raises(InputError, match=r"c.yaml:6: key 'principles\[0\].colour': unknown key"):
        load_constitution(str(p))
    p.write_text(GOOD + GOOD.split("principles:\n")[1])
    with pytest.raises(InputError, match="unique"):
        load_constitution(str(p))
    p.write_text("name: x\nprinciples: []\n")
    with pytest.raises(InputError, match="non-empty list"):
        load_constitution(str(p))
    p.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match="malformed YAML"):
        load_constitution(str(p))
    with pytest.raises(InputError, match="neither built in"):
        load_constitution(str(tmp_path / "none.yaml"))
