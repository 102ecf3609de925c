"""Configs: every shipped YAML loads, overrides work, bad input (a key, a value, an
empty file, a key given twice, no budget) fails with one line that names the key,
before any run directory or server exists."""
import re
import subprocess
import sys

import pytest

from eosrl.launch.config import ConfigError, load_config
from conftest import CONFIGS, ROOT


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.name


def test_override_sets_nested_keys_and_parses_types():
    config = load_config(CONFIGS / "dqn_cartpole.yaml",
                         ["agent.optimizer.lr=5e-4", "agent.hidden_sizes=32,16", "agent.double_q=false"])
    assert config.agent.optimizer.lr == 5e-4
    assert config.agent.hidden_sizes == [32, 16]
    assert config.agent.double_q is False


BAD = [
    (["agent.optimiser.lr=1e-3"], "agent.optimiser"),
    (["agent.optimizer.lr=fast"], "agent.optimizer.lr"),
    (["agent.optimizer.lr=-0.1"], "agent.optimizer.lr"),
    (["agent.optimizer.name=adagrad"], "agent.optimizer.name"),
    (["replay.batch_size=5000"], "replay.batch_size"),
    (["replay.capacity=ten"], "replay.capacity"),
    (["agent.kind=ppo"], "agent.kind"),
    (["env.kind=mujoco"], "env.kind"),
    (["env.id=NoSuchEnv-v9"], "env.id"),
    (["agent.spectral_norm.layers=-7"], "agent.spectral_norm.layers"),
    (["run.seed"], "run.seed"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_fails_cleanly_before_anything_starts(tmp_path, overrides, key):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "eosrl.launch.cli", "train", str(CONFIGS / "dqn_cartpole.yaml"),
            "--run-dir", str(run_dir), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and lines[0].startswith("eosrl: error:")
    assert not run_dir.exists()


def test_unknown_key_in_file_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("agent: {kind: dqn, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="agent.learning_rate"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override,key", [
    ("probe.method=power", "probe.method"),  # removed: it returned the largest |λ|, not the largest λ
    ("probe.mode=thread", "probe.mode"),
    ("probe.tolerance=0", "probe.tolerance"),
    ("probe.trace_every=150", "probe.trace_every"),  # not a multiple of probe.every (100)
    ("probe.max_queued=0", "probe.max_queued"),
])
def test_bad_probe_settings_name_the_field(override, key):
    from eosrl.agents.config import ConfigError
    with pytest.raises(ConfigError, match=key) as err:
        load_config(CONFIGS / "dqn_cartpole.yaml", [override])
    assert "\n" not in str(err.value)


def _train_fails_with_one_line(tmp_path, config_path, overrides=()):
    """Runs `eosrl train` on bad input: exit code 2, one line on stderr (returned), no run directory."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "eosrl.launch.cli", "train", str(config_path), "--run-dir", str(run_dir),
            "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eosrl: error:"), result.stderr
    assert not run_dir.exists()
    return lines[0]


@pytest.mark.parametrize("text", ["", "# a config, one day\n\n   \n"], ids=["blank", "comments"])
def test_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = _train_fails_with_one_line(tmp_path, path)
    assert f"{path}: the config file is empty" in line


def test_duplicate_key_is_refused_with_its_path_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text((CONFIGS / "dqn_cartpole.yaml").read_text().replace(
        "  n_step: 3\n", "  n_step: 3\n  discount: 0.9\n"))  # agent.discount is set above it too
    first = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("  discount:"))
    line = _train_fails_with_one_line(tmp_path, path)
    assert f"duplicate key 'agent.discount' on lines {first} and " in line and str(path) in line


@pytest.mark.parametrize("text,key,lines", [
    ("agent: {kind: dqn, kind: c51}\n", "agent.kind", (1, 1)),  # flow style
    ("name: a\nrun: {seed: 1}\nname: b\n", "name", (1, 3)),  # top level
    ("agent:\n  optimizer:\n    lr: 0.1\n    name: sgd\n    lr: 0.2\n", "agent.optimizer.lr", (3, 5)),
    ("agent: {hidden_sizes: [{a: 1, a: 2}]}\n", "agent.hidden_sizes[0].a", (1, 1)),  # inside a list
])
def test_duplicate_keys_are_found_at_every_depth(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"duplicate key '{re.escape(key)}' on lines {lines[0]} and {lines[1]}"):
        load_config(path)


def test_a_merge_key_may_be_overridden(tmp_path):
    """`<<: *base` then a key of base is YAML's way to override, not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("name: merged\nagent:\n  <<: &base {kind: dqn, n_step: 3}\n  n_step: 5\n")
    assert load_config(path).agent.n_step == 5


def test_zero_env_step_budget_is_refused(tmp_path):
    line = _train_fails_with_one_line(tmp_path, CONFIGS / "dqn_cartpole.yaml", ["run.total_env_steps=0"])
    assert "run.total_env_steps: must be > 0" in line


@pytest.mark.parametrize("overrides,key", [
    (["run.total_env_steps=-1"], "run.total_env_steps"),
    (["regime.mode=offline_to_online", "regime.dataset=d", "run.total_env_steps=0"], "run.total_env_steps"),
    (["regime.mode=offline", "regime.dataset=d", "run.total_updates=0"], "run.total_updates"),
])
def test_the_budget_a_regime_runs_on_must_be_positive(overrides, key):
    with pytest.raises(ConfigError, match=rf"{key}: must be > 0") as err:
        load_config(CONFIGS / "dqn_cartpole.yaml", overrides)
    assert "\n" not in str(err.value)


def test_an_offline_run_needs_no_env_steps():
    config = load_config(CONFIGS / "dqn_cartpole.yaml", ["regime.mode=offline", "regime.dataset=d",
                                                         "run.total_updates=100", "run.total_env_steps=0"])
    assert config.run.total_env_steps == 0 and config.run.total_updates == 100


@pytest.mark.parametrize("key,value", [("env.id", "NoSuchEnv-v9"), ("agent.spectral_norm.layers", "-7")])
def test_every_loader_runs_every_check(tmp_path, key, value):
    """The checks the CLI alone once made (the env exists; the spectral-norm layers are
    layers of the network) are `validate`'s: `load_config`, Ray's `from_dict` and a study's
    plan refuse the config too, naming the key."""
    import yaml
    from eosrl.launch import study
    from eosrl.launch.config import from_dict, to_dict
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "dqn_cartpole.yaml", [f"{key}={value}"])
    data = to_dict(load_config(CONFIGS / "dqn_cartpole.yaml"))
    *sections, last = key.split(".")
    node = data
    for section in sections:
        node = node[section]
    node[last] = value
    with pytest.raises(ConfigError, match=key):
        from_dict(data)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "base": str(CONFIGS / "dqn_cartpole.yaml"),
                                    "stages": [{"name": "a", "runs": [{"name": "one", "set": {key: value}}]}]}))
    with pytest.raises(ConfigError, match=key):
        study.plan_study(study.load_study(path), path, tmp_path / "out")
