"""Bad input, through the command line: exit 2, one line naming the file/line/key, nothing half-written
left looking complete. Then property-based tests: the config, constitution and JSONL loaders either load
or raise InputError (one line), never any other exception, whatever they are given."""

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morlaif.artifacts import read_jsonl
from morlaif.cli import main
from morlaif.config import Config, field_help, load_config
from morlaif.constitution import load_constitution
from morlaif.errors import InputError

from conftest import TINY

VIRTUES = Path(__file__).resolve().parents[1] / "src" / "morlaif" / "data" / "constitutions" / "virtues.yaml"


def _complete(run: Path) -> set[str]:
    """Stage directories whose manifest says complete."""
    out = set()
    for m in run.rglob("manifest.json"):
        try:
            if json.loads(m.read_text()).get("status") == "complete":
                out.add(str(m.parent.relative_to(run)))
        except json.JSONDecodeError:
            pass
    return out


def _files(d: Path, text: dict[str, str | bytes]) -> dict[str, str]:
    paths = {}
    for name, content in text.items():
        p = d / name
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        paths[name] = str(p)
    return paths


def _fake_trained_run(run: Path, trained: list[str]) -> None:
    """The files the rl stage checks before it starts, as a finished rm stage for `trained` leaves them,
    plus a finished rl stage that a bad invocation must not destroy."""
    (run / "rm").mkdir(parents=True)
    (run / "rm" / "objectives.json").write_text(json.dumps({"objectives": trained, "layout": "multihead"}))
    (run / "rm" / "metrics.json").write_text("{}")
    (run / "sft" / "model").mkdir(parents=True)
    (run / "sft" / "model" / "adapter_config.json").write_text("{}")
    (run / "rl").mkdir()
    (run / "rl" / "metrics.json").write_text('{"steps": 2}')
    (run / "rl" / "manifest.json").write_text(json.dumps({"status": "complete", "config_hash": "x", "inputs": {}}))


# name -> (files to create, argv (with {file} placeholders and {run}), expected substring of the error line)
CASES = {
    "malformed_yaml": ({"c.yaml": "rl:\n  steps: [1,\n"}, ["run", "--config", "{c.yaml}", "--out", "{run}"],
                       "c.yaml:3: malformed YAML"),
    "unknown_key_yaml": ({"c.yaml": "model:\n  policy: tiny\nrl:\n  stepz: 3\n"},
                         ["run", "--config", "{c.yaml}", "--out", "{run}"], "c.yaml:4: key 'rl.stepz': unknown key"),
    "unknown_key_set": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set", "rl.stepz=3"],
                        "--set: key 'rl.stepz': unknown key"),
    "wrong_type_yaml": ({"c.yaml": "sft:\n  rounds: many\n"}, ["run", "--config", "{c.yaml}", "--out", "{run}"],
                        "c.yaml:2: key 'sft.rounds'"),
    "wrong_type_set": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set", "rl.steps=3.5"],
                       "key 'rl.steps'"),
    "bad_value_set": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set", "rl.scalarizer=best"],
                      "key 'rl.scalarizer'"),
    "not_utf8_config": ({"c.yaml": b"rl:\n  steps: 3\n  # caf\xe9\n"}, ["run", "--config", "{c.yaml}", "--out", "{run}"],
                        "c.yaml:3: not UTF-8 text"),
    "missing_config": ({}, ["run", "--config", "{dir}/nope.yaml", "--out", "{run}"], "nope.yaml: config file not found"),
    "missing_data_file": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set", "data.harmful_file={dir}/no.jsonl"],
                          "no.jsonl: file not found"),
    "malformed_jsonl_line": ({"h.jsonl": '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n'},
                             ["run", "--config", "{tiny}", "--out", "{run}", "--set", "data.harmful_file={h.jsonl}"],
                             "h.jsonl:3: malformed JSON line"),
    "prompt_not_a_string": ({"h.jsonl": '{"prompt": ["a"]}\n'},
                            ["run", "--config", "{tiny}", "--out", "{run}", "--set", "data.harmful_file={h.jsonl}"],
                            "h.jsonl:1: key 'prompt': must be a string"),
    "empty_prompt_set": ({"h.jsonl": ""}, ["run", "--config", "{tiny}", "--out", "{run}", "--set",
                                           "data.harmful_file={h.jsonl}"],
                         "key 'data.n_rl_harmful': the stages ask for 10 harmful train prompts (sft 6, feedback 2, "
                         "rl 2) but the harmful train split has 0"),
    "renamed_prompt_count": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set", "sft.n_prompts=4"],
                             "key 'sft.n_prompts': renamed to 'data.n_sft_harmful'"),
    "empty_eval_prompts": ({"e.jsonl": "\n"}, ["eval", "--run", "{run}", "--prompts", "{e.jsonl}", "--out", "{dir}/o.json",
                                               "--config", "{tiny}"], "e.jsonl: the prompt file is empty"),
    "empty_pairs_file": ({"p.jsonl": ""}, ["feedback", "--pairs", "{p.jsonl}", "--out", "{dir}/o.jsonl",
                                           "--config", "{tiny}"], "p.jsonl: no pairs to label"),
    "missing_pairs_file": ({}, ["feedback", "--pairs", "{dir}/none.jsonl", "--out", "{dir}/o.jsonl", "--config", "{tiny}"],
                           "none.jsonl: file not found"),
    "objective_not_in_constitution": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set",
                                           "constitution.objectives=[honesty, bravery]"],
                                      "principle 'bravery' is not in constitution 'virtues'"),
    "unknown_aspect": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set",
                            "constitution.objectives=[honesty:feelings]"], "unknown aspect 'feelings'"),
    "weights_for_unknown_objective": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set",
                                           "rl.weights={bravery: 1}"], "key 'rl.weights'"),
    "malformed_constitution": ({"k.yaml": "name: k\nprinciples:\n  - name: a\n    critique: [\n"},
                               ["run", "--config", "{tiny}", "--out", "{run}", "--set", "constitution.name={k.yaml}"],
                               "k.yaml:5: malformed YAML"),
    "constitution_missing_field": ({"k.yaml": "name: k\nprinciples:\n  - {name: a, description: d, critique: c}\n"},
                                   ["run", "--config", "{tiny}", "--out", "{run}", "--set", "constitution.name={k.yaml}"],
                                   "k.yaml:3: key 'principles[0].revision'"),
    "missing_run_dir": ({}, ["sft", "--run", "{dir}/no-such-run", "--config", "{tiny}"], "run directory not found"),
    "rm_trained_for_other_objectives": ({}, ["rl", "--run", "{run}", "--config", "{tiny}", "--set",
                                             "constitution.objectives=[prudence]"],
                                        "the config asks for objective(s) ['prudence'] but the preference models"),
    "key_in_config": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set",
                           "feedback.openai.api_key_env=sk-live-SECRETSECRET"], "not the key itself"),
    "key_in_url": ({}, ["run", "--config", "{tiny}", "--out", "{run}", "--set",
                        "feedback.openai.base_url=https://me:SECRETSECRET@api.example.com/v1"], "credentials in the URL"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_one_line_nothing_complete(case, tmp_path, capsys):
    files, argv, expected = CASES[case]
    paths = _files(tmp_path, files)
    run = tmp_path / "run"
    if case == "rm_trained_for_other_objectives":
        _fake_trained_run(run, ["honesty"])
    if case in ("empty_eval_prompts",):
        run.mkdir()
    before = _complete(run) if run.exists() else set()
    fill = {"run": str(run), "dir": str(tmp_path), "tiny": str(TINY), **paths}
    for k, v in fill.items():
        argv = [a.replace("{" + k + "}", v) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # one error line, last (stage headers may come before it), no traceback
    errors = [ln for ln in err.splitlines() if ln.startswith("morlaif: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert expected in errors[0], errors[0]
    assert "SECRETSECRET" not in err
    # nothing half-written looks complete: no stage became complete, finished ones are untouched
    after = _complete(run) if run.exists() else set()
    assert after == before, (before, after)
    if case == "rm_trained_for_other_objectives":
        assert (run / "rl" / "metrics.json").read_text() == '{"steps": 2}'
    for p in run.rglob("*.jsonl") if run.exists() else []:
        read_jsonl(p)  # any rows left behind are whole
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- property-based

KEYS = [k for k, _, _ in field_help()]
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["tiny", "ppo", "linear", "virtues", "auto", "[a, b]"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


@st.composite
def config_trees(draw):
    """Mostly-plausible config trees: real sections and keys with random values, plus random keys."""
    tree: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS) | st.text(min_size=1, max_size=10), max_size=6)):
        node, parts = tree, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = draw(values)
    if draw(st.booleans()):
        tree[draw(st.sampled_from(SECTIONS))] = draw(values)  # a whole section replaced by junk
    return tree


def _one_line(e: InputError) -> None:
    assert "\n" not in str(e) and str(e)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(config_trees())
def test_load_config_random_yaml_loads_or_input_error(tmp_path, tree):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree, allow_unicode=True))
    try:
        assert isinstance(load_config(p), Config)
    except InputError as e:
        _one_line(e)


@FAST
@given(st.sampled_from(["config", "constitution"]), st.text(max_size=300) | st.binary(max_size=300))
def test_loaders_on_random_text_load_or_input_error(tmp_path, loader, text):
    p = tmp_path / "x.yaml"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    load = {"config": load_config, "constitution": lambda p: load_constitution(str(p))}[loader]
    try:
        load(p)
    except InputError as e:
        _one_line(e)


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=12), st.text(max_size=12) | values.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True).strip())), max_size=4))
def test_overrides_load_or_input_error(pairs):
    try:
        assert isinstance(load_config(TINY, [f"{k}={v}" for k, v in pairs]), Config)
    except InputError as e:
        _one_line(e)


BASE_CONSTITUTION = yaml.safe_load(VIRTUES.read_text())
BASE_CONSTITUTION["principles"] = BASE_CONSTITUTION["principles"][:2]  # small documents: fast examples
PRINCIPLE_KEYS = ["name", "description", "critique", "revision", "comparison", "demonstrations"]


@st.composite
def constitutions(draw):
    """The virtues constitution with random keys replaced, dropped or added, anywhere in it."""
    doc = json.loads(json.dumps(BASE_CONSTITUTION))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "principle", "demo"]))
        if where == "top":
            doc[draw(st.sampled_from(["name", "description", "principles", "extra"]))] = draw(values)
        elif isinstance(doc.get("principles"), list) and doc["principles"]:
            i = draw(st.integers(0, len(doc["principles"]) - 1))
            p = doc["principles"][i]
            if where == "principle" or not isinstance(p, dict):
                if draw(st.booleans()) and isinstance(p, dict):
                    p.pop(draw(st.sampled_from(PRINCIPLE_KEYS)), None)
                else:
                    doc["principles"][i] = {**p, draw(st.sampled_from(PRINCIPLE_KEYS + ["x"])): draw(values)} \
                        if isinstance(p, dict) else draw(values)
            elif isinstance(p.get("demonstrations"), dict):
                p["demonstrations"][draw(st.sampled_from(["positive", "negative", "other"]))] = draw(values)
    return doc


@FAST
@given(constitutions())
def test_constitution_loader_loads_or_input_error(tmp_path, doc):
    p = tmp_path / "k.yaml"
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        con = load_constitution(str(p))
        assert con.principles and all(isinstance(x.name, str) for x in con.principles)
        con.objectives(None)
    except InputError as e:
        _one_line(e)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.sampled_from(["prompt", "kind", "p_a", "x"]) | st.text(max_size=4), c, max_size=3),
                           max_leaves=8)
jsonl_lines = st.one_of(json_values.map(json.dumps), st.text(alphabet=string.printable, max_size=30), st.just(""))


@FAST
@given(st.lists(jsonl_lines, max_size=8), st.booleans(), st.booleans(), st.binary(max_size=6))
def test_read_jsonl_rows_or_input_error_naming_the_line(tmp_path, lines, shard, torn, junk):
    p = tmp_path / "x.jsonl"
    data = "\n".join(line.replace("\n", " ") for line in lines).encode()
    data += b"\n" + (junk if torn else b"")
    p.write_bytes(data)
    try:
        rows = read_jsonl(p, required=("prompt",), strings=("prompt",), shard=shard)
    except InputError as e:
        _one_line(e)
        assert str(e).startswith(f"{p}:")  # names the file, and the line where there is one
    else:
        assert all(isinstance(r, dict) and isinstance(r["prompt"], str) for r in rows)
        assert len(rows) <= len(lines) + 1


def test_read_jsonl_edge_cases(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:2: JSON nested too deeply"):
        read_jsonl(p)
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: not UTF-8 text"):
        read_jsonl(p)
    # our own shard torn in the middle of a multi-byte character: the torn line is dropped, no error
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xc3')
    assert read_jsonl(p, shard=True) == [{"prompt": "a"}]
