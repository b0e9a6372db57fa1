from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from morlaif.cli import main
from morlaif.config import RECIPES, Config, field_help, load_config, recipe_yaml
from morlaif.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_embedded_recipe():
    cfg = load_config()
    assert cfg.model.policy == "embedded:smollm2-135m-instruct"
    # recipes/default.yaml documents the defaults: it loads to exactly the Python defaults, and it is
    # exactly what `morlaif config --recipe` writes from them (help text included)
    assert load_config(RECIPES / "default.yaml") == Config()
    assert (RECIPES / "default.yaml").read_text() == recipe_yaml()
    assert load_config("default") == Config() and load_config("tiny").model.policy == "tiny"  # by name


def test_floats_in_any_spelling(tmp_path):
    """What TRL and alignment-handbook recipes write: 2e-5, 1E-4, 1.0e-3 (PyYAML reads the first two as strings)."""
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  learning_rate: 2e-5\n  warmup_steps: 1E-1\nrm:\n  learning_rate: 1.0e-3\n"
                 "rl:\n  weights: {honesty: 1e0}\n")
    cfg = load_config(p, ["rl.learning_rate=1e-5", "rl.kl_coef=+5E-2", "rl.tau=.5e1"])
    assert (cfg.sft.learning_rate, cfg.sft.warmup_steps, cfg.rm.learning_rate) == (2e-5, 0.1, 1e-3)
    assert (cfg.rl.learning_rate, cfg.rl.kl_coef, cfg.rl.tau, cfg.rl.weights) == (1e-5, 0.05, 5.0, {"honesty": 1.0})
    assert load_config(None, ["model.policy=1e-5-model"]).model.policy == "1e-5-model"  # not a number: a string
    with pytest.raises(InputError, match="rl.steps"):  # typing stays strict: no float for an int
        load_config(None, ["rl.steps=1e3"])
    with pytest.raises(InputError, match="model.policy"):
        load_config(None, ["model.policy=1e5"])


def test_a_runs_config_is_the_base_of_its_reruns(tmp_path):
    base = tmp_path / "config.yaml"
    base.write_text(load_config(None, ["rl.steps=99", "model.policy=tiny"]).to_yaml())
    over = tmp_path / "over.yaml"
    over.write_text("rl:\n  scalarizer: max_min\n")
    cfg = load_config(over, ["rl.tau=2"], base=base)
    assert (cfg.rl.steps, cfg.model.policy, cfg.rl.scalarizer, cfg.rl.tau) == (99, "tiny", "max_min", 2.0)
    over.write_text("rl:\n  weights: {honesty: 1}\n")  # a dict-valued key is replaced whole, not merged
    base.write_text(base.read_text().replace("weights: null", "weights: {prudence: 2.0}"))
    assert load_config(over, base=base).rl.weights == {"honesty": 1.0}
    # an error names the file the key came from
    base.write_text(base.read_text().replace("steps: 99", "steps: many"))
    with pytest.raises(InputError, match=rf"^{base}:\d+: key 'rl.steps'"):
        load_config(over, base=base)


def test_trainer_settings_and_trl_args_are_checked(capsys):
    from morlaif.training import check_settings

    cfg = load_config(None, ["rl.lora_target_modules=[c_attn, c_proj]", "sft.lora_target_modules=all-linear",
                             "sft.lr_scheduler_type=cosine", "sft.warmup_steps=0.1", "rl.warmup_steps=2",
                             "sft.use_peft=false", "rm.activation_checkpointing=true"])
    assert cfg.rl.lora_target_modules == ["c_attn", "c_proj"] and cfg.sft.lora_target_modules == "all-linear"
    for bad, where in (("sft.warmup_steps=1.5", "sft.warmup_steps"), ("rl.lr_scheduler_type=cyclic", "rl.lr_sched"),
                       ("rm.lora_target_modules=some", "rm.lora_target_modules")):
        with pytest.raises(InputError, match=where):
            load_config(None, [bad])
    check_settings(load_config(None, ["rl.algo=dpo", "rl.trl_args={weight_decay: 0.01, label_smoothing: 0.1}",
                                      "sft.trl_args={neftune_noise_alpha: 5}"]))
    for sets, key, msg in (
        (["rl.algo=grpo", "rl.trl_args={weight_decayy: 0.01}"], "rl.trl_args.weight_decayy",
         "not an argument of TRL's GRPOConfig"),
        (["rl.algo=dpo", "rl.trl_args={learning_rate: 1e-6}"], "rl.trl_args.learning_rate", "rl.learning_rate"),
        (["sft.trl_args={warmup_steps: 3}"], "sft.trl_args.warmup_steps", "sft.warmup_steps"),
        (["sft.trl_args={output_dir: /x}"], "sft.trl_args.output_dir", "set by morlaif itself"),
        (["rl.trl_args={weight_decay: 0.01}"], "rl.trl_args", "morlaif's own loop"),  # rl.algo ppo
        (["model.load_in_4bit=true"], "model.load_in_4bit", "CUDA"),  # this machine has no GPU
        (["logging.report_to=wandb"], "logging.report_to", "pip install 'morlaif[wandb]'"),
    ):
        with pytest.raises(InputError) as e:
            check_settings(load_config(None, sets))
        assert e.value.key == key and msg in str(e.value), (sets, str(e.value))
        # the CLI: exit 2, one line, before any run directory is made
        capsys.readouterr()
        assert main(["sft", "--run", "/nonexistent-run", *[x for s in sets for x in ("--set", s)]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err and msg in err, err


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
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert [p.name for p in recipes] == ["default.yaml", "thorough.yaml", "tiny.yaml"]
    for p in recipes:
        cfg = load_config(p)
        # every key the recipe sets arrives in the config with its value: nothing dropped or renamed
        for key, value in _leaves(yaml.safe_load(p.read_text())):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (p.name, key)
    assert load_config(RECIPES / "tiny.yaml").model.policy == "tiny"


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
