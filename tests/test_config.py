from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from morlaif.config import Config, field_help, load_config
from morlaif.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_embedded_recipe():
    cfg = load_config()
    assert cfg.model.policy == "embedded:smollm2-135m-instruct"
    # configs/default.yaml documents the defaults: it must load to exactly the Python defaults.
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


def test_precedence_default_yaml_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rl:\n  steps: 7\n  kl_coef: 1\nsft:\n  rounds: 2\n")
    cfg = load_config(p, ["rl.steps=9", "model.policy=tiny"])
    assert cfg.rl.steps == 9  # CLI beats YAML
    assert cfg.rl.kl_coef == 1.0 and isinstance(cfg.rl.kl_coef, float)  # YAML int widened to float only
    assert cfg.sft.rounds == 2  # YAML beats default
    assert cfg.model.policy == "tiny"
    assert cfg.rl.batch_size == Config().rl.batch_size  # default kept


def test_unknown_key_names_file_line_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rl:\n  steps: 3\n  stepz: 4\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:3: key 'rl.stepz': unknown key"


def test_wrong_type_and_bad_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  rounds: many\n")
    with pytest.raises(InputError, match=r"c.yaml:2: key 'sft.rounds'"):
        load_config(p)
    with pytest.raises(InputError, match="rl.algo"):
        load_config(None, ["rl.algo=sac"])
    with pytest.raises(InputError, match="rl.steps"):
        load_config(None, ["rl.steps=0"])
    with pytest.raises(InputError, match="unknown key"):
        load_config(None, ["nope=1"])
    with pytest.raises(InputError, match="key=value"):
        load_config(None, ["rl.steps"])


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rl:\n  steps: [1,\n")
    with pytest.raises(InputError, match="malformed YAML"):
        load_config(p)
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping"):
        load_config(p)


def test_config_is_not_fixed_up_silently():
    with pytest.raises(InputError):
        load_config(None, ["rl.steps=3.5"])  # a float for an int is refused, not truncated
    with pytest.raises(InputError):
        load_config(None, ["rl.normalize=yes please"])


def test_section_hash_changes_only_with_its_sections():
    a, b = load_config(None, ["rl.steps=3"]), load_config(None, ["rl.steps=4"])
    assert a.section_hash("sft") == b.section_hash("sft")
    assert a.section_hash("rl") != b.section_hash("rl")


def test_every_field_has_help():
    rows = field_help()
    assert len(rows) > 60
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]


def _leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict) and k != "weights":
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_recipes_load():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert [p.name for p in recipes] == ["default.yaml", "tiny.yaml"]
    for p in recipes:
        cfg = load_config(p)
        # every key the recipe sets arrives in the config with its value: nothing dropped or renamed
        for key, value in _leaves(yaml.safe_load(p.read_text())):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (p.name, key)
    assert load_config(ROOT / "configs" / "tiny.yaml").model.policy == "tiny"


def test_renamed_keys_name_the_new_key(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("rl:\n  steps: 3\n  target_kl: 0.1\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:3: key 'rl.target_kl': renamed to 'rl.kl_target'"
    for old, new in (("rl.lam", "rl.variance_penalty"), ("rl.beta", "rl.dpo_beta")):
        with pytest.raises(InputError) as e:
            load_config(None, [f"{old}=0.2"])
        assert str(e.value) == f"--set: key '{old}': renamed to '{new}'"
    cfg = load_config(None, ["rl.kl_target=0.1", "rl.variance_penalty=0.2", "rl.dpo_beta=0.3"])
    assert (cfg.rl.kl_target, cfg.rl.variance_penalty, cfg.rl.dpo_beta) == (0.1, 0.2, 0.3)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.text(), st.booleans()), max_size=4))
def test_random_top_level_keys_are_rejected_cleanly(tree):
    try:
        cfg = load_config(None, [f"{k}={yaml.safe_dump(v).strip()}" for k, v in tree.items() if "=" not in k and "." not in k])
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)
