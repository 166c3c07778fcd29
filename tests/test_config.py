"""Config loading: precedence, TOML layouts, --set parsing, aliases, validation, round trip."""

import json
from pathlib import Path

import pytest

from mlx_grpo.config import (
    CONFIG_ENV_VAR,
    SAFE_KEYS,
    ConfigError,
    GRPOConfig,
    add_config_arguments,
    check_resume_changes,
    config_changes,
    config_from_dict,
    config_from_values,
    config_to_dict,
    load_config,
    load_resolved_config,
    read_config_values,
    resolve_for_model,
    save_resolved_config,
    validate,
)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True)
def no_env_config(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)


def write_toml(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_sources():
    cfg = load_config(None, [])
    assert cfg.learning_rate == 1e-6 and cfg.num_generations == 64 and cfg.loss_type == "dapo"
    assert cfg.epsilon_high is None and cfg.use_calculator is None and cfg.reward_funcs == []
    assert cfg.run_name.startswith("run-") and len(cfg.run_name) == len("run-YYYYmmdd-HHMMSS")


def test_precedence_defaults_toml_set(tmp_path):
    path = write_toml(tmp_path, "learning_rate = 3e-6\nnum_generations = 8\nseed = 7\n")
    cfg = load_config(path, ["num_generations=16"])
    assert cfg.learning_rate == 3e-6  # TOML over default
    assert cfg.num_generations == 16  # --set over TOML
    assert cfg.seed == 7
    assert cfg.batch_size == 1  # default untouched


def test_flat_and_table_layouts_agree(tmp_path):
    flat = load_config(write_toml(tmp_path, 'run_name = "a"\ntop_k = 50\n', "flat.toml"), [])
    table = load_config(write_toml(tmp_path, '[mlx_grpo]\nrun_name = "a"\ntop_k = 50\n', "t.toml"), [])
    assert flat == table and table.top_k == 50


def test_key_both_flat_and_in_table_is_error(tmp_path):
    path = write_toml(tmp_path, "top_k = 5\n[mlx_grpo]\ntop_k = 50\n")
    with pytest.raises(ConfigError, match="top_k.*both"):
        load_config(path, [])


def test_env_var_used_only_without_config(tmp_path, monkeypatch):
    env_path = write_toml(tmp_path, "seed = 11\n", "env.toml")
    arg_path = write_toml(tmp_path, "seed = 22\n", "arg.toml")
    default_path = write_toml(tmp_path, "seed = 33\n", "default.toml")
    assert load_config(None, [], default_path=default_path).seed == 33  # neither --config nor the variable
    monkeypatch.setenv(CONFIG_ENV_VAR, env_path)
    assert load_config(None, []).seed == 11
    assert load_config(None, [], default_path=default_path).seed == 11
    assert load_config(arg_path, [], default_path=default_path).seed == 22


def test_the_given_keys_are_the_toml_and_set_ones_only(tmp_path):
    path = write_toml(tmp_path, "seed = 4\nclip_eps = 0.3\n")
    assert read_config_values(path, ["seed=5", "top_k=7"]) == {"seed": 5, "epsilon": 0.3, "top_k": 7}
    saved = GRPOConfig(run_name="r", learning_rate=3e-6, seed=1)
    cfg = config_from_values({"seed": 5}, base=saved)  # the given keys on a saved config, not on the defaults
    assert (cfg.seed, cfg.learning_rate, cfg.run_name) == (5, 3e-6, "r") and saved.seed == 1


def test_config_arguments_parse_into_load_config():
    import argparse

    parser = add_config_arguments(argparse.ArgumentParser(), default="configs/demo.toml")
    args = parser.parse_args(["--set", "seed=3", "--set", "top_k=2"])
    assert args.config is None and load_config(args.config, args.set).seed == 3
    assert "configs/demo.toml" in parser.format_help()


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.toml"), [])
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write_toml(tmp_path, "seed = = 1\n"), [])


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match="learnin_rate.*did you mean learning_rate") as err:
        load_config(write_toml(tmp_path, "learnin_rate = 1e-5\n"), [])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="num_generation.*num_generations"):
        load_config(None, ["num_generation=8"])
    with pytest.raises(ConfigError, match="unknown config key 'zzz'"):
        load_config(None, ["zzz=1"])
    with pytest.raises(ConfigError, match="'model'"):  # an unknown table is an unknown key too
        load_config(write_toml(tmp_path, "[model]\nname = 'x'\n"), [])


@pytest.mark.parametrize(
    "line, key",
    [
        ('num_generations = "8"', "num_generations"),  # string for int
        ("learning_rate = '1e-6'", "learning_rate"),  # string for float
        ("num_generations = 8.0", "num_generations"),  # float for int
        ("batch_size = true", "batch_size"),  # bool for int
        ('shuffle = "yes"', "shuffle"),  # string for bool
        ('reward_funcs = "correctness"', "reward_funcs"),  # scalar for list
        ('reward_weights = [1.0, "2"]', "reward_weights"),  # bad list item
        ("use_calculator = 1", "use_calculator"),
    ],
)
def test_wrong_type_in_toml(tmp_path, line, key):
    with pytest.raises(ConfigError, match=f"'{key}'.*expects"):
        load_config(write_toml(tmp_path, line + "\n"), [])


def test_int_for_float_field_is_fine(tmp_path):
    cfg = load_config(write_toml(tmp_path, "temperature = 1\nreward_weights = [1, 0.5]\n"), [])
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float)
    assert cfg.reward_weights == [1.0, 0.5] and all(isinstance(w, float) for w in cfg.reward_weights)


@pytest.mark.parametrize(
    "override",
    ["num_generations=8.0", "num_generations=abc", "learning_rate=fast", "shuffle=maybe",
     "reward_weights=1,x", "use_calculator=sometimes", "epsilon_high=none-ish"],
)
def test_wrong_type_in_set(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"--set {key}="):
        load_config(None, [override])


def test_set_needs_key_equals_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["learning_rate"])


def test_set_type_conversion():
    cfg = load_config(None, [
        "learning_rate=1e-6", "warmup_ratio=0", "top_k=50", "shuffle=no", "plot=0", "log_jsonl=YES",
        "run_name=my-run", "system_prompt=Be brief = exact.", "max_grad_norm=1",
    ])
    assert cfg.learning_rate == 1e-6 and cfg.warmup_ratio == 0.0 and cfg.top_k == 50
    assert cfg.shuffle is False and cfg.plot is False and cfg.log_jsonl is True
    assert cfg.run_name == "my-run" and cfg.system_prompt == "Be brief = exact."
    assert cfg.max_grad_norm == 1.0 and isinstance(cfg.max_grad_norm, float)


def test_set_list_parsing():
    cfg = load_config(None, ["reward_funcs=correctness, int", "reward_weights=[2, 0.5]"])
    assert cfg.reward_funcs == ["correctness", "int"] and cfg.reward_weights == [2.0, 0.5]
    cfg = load_config(None, ["reward_funcs=[\"a\", 'b']", "reward_weights=[2, 1]", "report_to=[]"])
    assert cfg.reward_funcs == ["a", "b"] and cfg.reward_weights == [2.0, 1.0] and cfg.report_to == []
    assert load_config(None, ["reward_weights=2"]).reward_weights == [2.0]
    cfg = load_config(None, ["report_to=tensorboard,wandb", "reward_funcs="])
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.reward_funcs == []


def test_set_later_value_wins():
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


def test_optional_none(tmp_path):
    path = write_toml(tmp_path, "epsilon_high = 0.28\nsystem_prompt = 'Think.'\nuse_calculator = true\n")
    cfg = load_config(path, [])
    assert cfg.epsilon_high == 0.28 and cfg.effective_epsilon_high == 0.28 and cfg.use_calculator is True
    cfg = load_config(path, ["epsilon_high=none", "system_prompt=None", "use_calculator=auto"])
    assert cfg.epsilon_high is None and cfg.system_prompt is None and cfg.use_calculator is None
    assert cfg.effective_epsilon_high == cfg.epsilon
    # "none" is only special for optional fields: scale_rewards is a plain string choice.
    assert load_config(None, ["scale_rewards=none"]).scale_rewards == "none"
    assert load_config(write_toml(tmp_path, 'use_calculator = "auto"\n', "a.toml"), []).use_calculator is None


def test_aliases_map_to_canonical_fields(tmp_path):
    path = write_toml(tmp_path, "clip_eps = 0.3\nkl_coeff = 0.02\neval_every_updates = 25\n")
    cfg = load_config(path, ["eval_subset_size=64"])
    assert (cfg.epsilon, cfg.beta, cfg.eval_steps, cfg.eval_samples) == (0.3, 0.02, 25, 64)
    d = config_to_dict(cfg)
    assert not {"clip_eps", "kl_coeff", "eval_every_updates", "eval_subset_size"} & set(d)
    # --set overrides the TOML value whichever spelling each uses.
    assert load_config(path, ["epsilon=0.1"]).epsilon == 0.1
    assert load_config(write_toml(tmp_path, "epsilon = 0.3\n", "e.toml"), ["clip_eps=0.25"]).epsilon == 0.25


def test_alias_conflict(tmp_path):
    with pytest.raises(ConfigError, match="'clip_eps' is an alias of 'epsilon'"):
        load_config(write_toml(tmp_path, "clip_eps = 0.3\nepsilon = 0.2\n"), [])
    with pytest.raises(ConfigError, match="'kl_coeff' is an alias of 'beta'"):
        load_config(None, ["beta=0.1", "kl_coeff=0.2"])
    with pytest.raises(ConfigError, match="alias"):  # top level vs [mlx_grpo] table
        load_config(write_toml(tmp_path, "eval_steps = 5\n[mlx_grpo]\neval_every_updates = 6\n", "t.toml"), [])
    # Same value under both names is not a conflict.
    assert load_config(write_toml(tmp_path, "clip_eps = 0.3\nepsilon = 0.3\n", "s.toml"), []).epsilon == 0.3


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss_type=ppo", "loss_type must be one of grpo|bnpo|dr_grpo|dapo"),
        ("num_generations=1", "num_generations must be >= 2"),
        ("epsilon=0", "epsilon must be > 0"),
        ("temperature=0", "temperature must be > 0"),
        ("top_p=0", r"top_p must be in \(0, 1\]"),
        ("top_p=1.5", r"top_p must be in \(0, 1\]"),
        ("rollout_quant_bits=7", "rollout_quant_bits must be one of 2|3|4|5|6|8"),
        ("scale_rewards=std", "scale_rewards must be one of group|batch|none"),
        ("importance_sampling_level=seq", "importance_sampling_level must be one of token|sequence"),
        ("lr_scheduler_type=step", "lr_scheduler_type must be one of cosine|constant|linear"),
        ("reward_errors=ignore", "reward_errors must be one of raise|zero"),
        ("prompt_format=chatml", "prompt_format must be one of nanochat|xml|auto"),
        ("compute_dtype=float16", "compute_dtype must be one of float32|bfloat16"),
        ("report_to=mlflow", "report_to entries"),
        ("learning_rate=nan", "learning_rate must be a finite number"),
        ("run_name=a/b", "run_name must be a plain folder name"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("max_train_samples=-1", "max_train_samples must be >= 0"),
    ],
)
def test_validate_rejects(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_validate_cross_field_rules():
    with pytest.raises(ConfigError, match="reward_weights has 1 entries but reward_funcs has 2"):
        load_config(None, ["reward_funcs=a,b", "reward_weights=1"])
    load_config(None, ["reward_funcs=a,b", "reward_weights=1,2"])
    load_config(None, ["reward_weights=1,2"])  # weights for the format's defaults: checked later
    with pytest.raises(ConfigError, match="use_calculator = true needs the nanochat prompt format"):
        load_config(None, ["prompt_format=xml", "use_calculator=true"])
    with pytest.raises(ConfigError, match="eval_temperature > 0"):
        load_config(None, ["eval_pass_k=4", "eval_temperature=0"])


def test_validate_lists_every_problem_on_one_line():
    with pytest.raises(ConfigError) as err:
        validate(GRPOConfig(loss_type="x", num_generations=1, top_p=2.0))
    msg = str(err.value)
    assert "loss_type" in msg and "num_generations" in msg and "top_p" in msg and "\n" not in msg


def test_validate_checks_types_set_from_python():
    with pytest.raises(ConfigError, match="'batch_size'.*expects int"):
        validate(GRPOConfig(batch_size="2"))
    cfg = validate(GRPOConfig(learning_rate=1))
    assert isinstance(cfg.learning_rate, float)


def test_derived_values():
    cfg = GRPOConfig(batch_size=2, gradient_accumulation_steps=3, num_generations=4,
                     max_new_tokens=300, max_completion_length=256)
    assert cfg.effective_prompts_per_step == 6
    assert cfg.effective_micro_batch_size == 8
    assert cfg.generation_limit == 256
    cfg.prompts_per_step, cfg.micro_batch_size = 5, 3
    assert cfg.effective_prompts_per_step == 5 and cfg.effective_micro_batch_size == 3


def test_auto_choices_are_resolved_once_from_the_model():
    auto = GRPOConfig(run_name="r")
    nano, other = resolve_for_model(auto, is_nanochat=True), resolve_for_model(auto, is_nanochat=False)
    assert (nano.prompt_format, nano.use_calculator, nano.reward_funcs) == ("nanochat", True, ["gsm8k"])
    assert (other.prompt_format, other.use_calculator) == ("xml", False)
    assert other.reward_funcs == ["xmlcount", "soft_format", "strict_format", "int", "correctness"]
    assert auto.prompt_format == "auto" and auto.use_calculator is None and auto.reward_funcs == []  # a copy
    xml_on_nanochat = resolve_for_model(GRPOConfig(run_name="r", prompt_format="xml"), is_nanochat=True)
    assert not xml_on_nanochat.use_calculator  # the calculator's tool tokens are the nanochat format's
    given = GRPOConfig(run_name="r", use_calculator=False, reward_funcs=["correctness"])
    kept = resolve_for_model(given, True)
    assert kept.reward_funcs == ["correctness"] and not kept.use_calculator
    with pytest.raises(ConfigError, match="use_calculator needs a nanochat model"):
        resolve_for_model(GRPOConfig(run_name="r", use_calculator=True), is_nanochat=False)
    with pytest.raises(ConfigError, match="reward_weights has 2 entries but reward_funcs has 1"):
        resolve_for_model(GRPOConfig(run_name="r", reward_weights=[1.0, 2.0]), is_nanochat=True)
    assert resolve_for_model(nano, True) == nano  # resolving is done once: again changes nothing


def test_resume_changes_name_old_and_new_and_only_safe_ones_pass_unasked():
    saved = GRPOConfig(run_name="a", output_dir="o")
    cfg = GRPOConfig(run_name="b", output_dir="p", learning_rate=3e-6, reward_funcs=["int"], eval_samples=10,
                     report_to=["tensorboard"])
    changes = config_changes(saved, cfg)
    assert [str(c) for c in changes] == ["learning_rate 1e-06 -> 3e-06", "reward_funcs [] -> ['int']",
                                         "eval_samples 200 -> 10", "report_to [] -> ['tensorboard']"]
    assert [c.safe for c in changes] == [False, False, True, True]  # where the run lives is no change
    assert changes[0].record(7) == {"key": "learning_rate", "old": 1e-6, "new": 3e-6, "update": 7}
    with pytest.raises(ConfigError) as err:
        check_resume_changes(changes, accept=False)
    assert "learning_rate 1e-06 -> 3e-06; reward_funcs [] -> ['int']." in str(err.value)
    assert "eval_samples" not in str(err.value) and "\n" not in str(err.value)
    check_resume_changes(changes, accept=True)
    check_resume_changes([c for c in changes if c.safe], accept=False)
    assert {"eval_steps", "save_steps", "logging_steps", "completions_log_steps", "report_to"} <= set(SAFE_KEYS)


def test_run_name_fixed_once():
    cfg = GRPOConfig()
    assert cfg.resolved_run_name == cfg.resolved_run_name and cfg.resolved_run_name.startswith("run-")
    assert cfg.run_dir == Path("outputs") / cfg.resolved_run_name
    assert GRPOConfig(run_name="x", output_dir="o").run_dir == Path("o/x")
    loaded = load_config(None, [])
    assert loaded.resolved_run_name == loaded.run_name != ""
    assert load_config(None, ["run_name=mine"]).resolved_run_name == "mine"


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(str(path), [])
    assert validate(cfg) is cfg


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS_DIR.glob("*.toml")}
    assert {"nanochat_d32.toml", "nanochat_grpo.toml", "qwen_xml.toml", "smoke.toml"} <= names


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(str(CONFIGS_DIR / "qwen_xml.toml"),
                      ["epsilon_high=0.28", "system_prompt=Think step by step.", "report_to=tensorboard"])
    path = save_resolved_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.resolved.json"
    data = json.loads(path.read_text())
    assert set(data) == set(config_to_dict(cfg)) and data["run_name"] == cfg.run_name
    assert config_from_dict(data) == cfg
    assert load_resolved_config(tmp_path / "run") == cfg
    assert config_from_dict(config_to_dict(GRPOConfig(run_name="r"))) == GRPOConfig(run_name="r")


def test_config_from_dict_is_strict():
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        config_from_dict({"lr": 1e-6})
    with pytest.raises(ConfigError, match="'seed'.*expects int"):
        config_from_dict({"seed": "1"})
    assert config_from_dict({"kl_coeff": 0.5, "run_name": "r"}).beta == 0.5
