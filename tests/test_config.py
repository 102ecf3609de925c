"""Configs: every shipped YAML loads, overrides work, bad input fails with one line
that names the key, before any run directory or server exists."""
import subprocess
import sys

import pytest

from eosrl.agents.config import ConfigError, load_config
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
