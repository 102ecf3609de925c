"""Data regimes: record -> info -> offline training round trip, offline-to-online,
a dataset of another env refused before anything starts, and divergence recorded."""
import json
import subprocess
import sys

import pytest
from eosrl.launch.config import load_config
from conftest import CONFIGS, ROOT
from eosrl.launch.rundir import read_metrics
from eosrl.launch.train import train

# Learning, launches and studies take seconds to minutes each: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

QUICK = ["run.eval_every=0", "run.eval_episodes=2", "run.log_every=250", "replay.min_size=500"]


def _events(run_dir, name):
    return [r for r in read_metrics(run_dir / "metrics.jsonl", "event") if r["event"] == name]


def test_record_info_offline_round_trip(tmp_path):
    data = tmp_path / "collect" / "dataset"
    config = load_config(CONFIGS / "dqn_cartpole.yaml",
                         QUICK + ["run.total_env_steps=2000", f"replay.record_to={data}"])
    online = train(config, tmp_path / "collect", progress=False)
    assert online["dataset"] == str(data)

    info = subprocess.run([sys.executable, "-m", "eosrl.launch.cli", "dataset", "info", str(data), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    info = json.loads(info.stdout)
    assert info["transitions"] == 2000
    assert info["env"]["id"] == "CartPole-v1"
    assert info["episodes"] >= 2000 // 500  # CartPole episodes end well before 500 steps here

    for subset, expected in (("all", 2000), ("first 800", 800), ("last 800", 800), ("random 800", 800)):
        run_dir = tmp_path / f"offline_{subset.split()[0]}"
        config = load_config(CONFIGS / "dqn_cartpole.yaml", QUICK + [
            "regime.mode=offline", f"regime.dataset={data}", f"regime.subset={subset}",
            "run.total_updates=300", "regime.corruption=0.25"])
        summary = train(config, run_dir, progress=False)
        assert summary["status"] == "completed" and summary["learner_updates"] == 300
        assert summary["env_steps"] == 0  # no acting for data
        loaded = _events(run_dir, "dataset_loaded")[0]
        assert loaded["transitions"] == expected
        assert loaded["corrupted"] == round(0.25 * expected)
        assert list(read_metrics(run_dir / "metrics.jsonl", "eval"))  # the policy is still measured


def test_offline_to_online_starts_from_the_dataset(tmp_path):
    data = tmp_path / "collect" / "dataset"
    train(load_config(CONFIGS / "dqn_cartpole.yaml", QUICK + ["run.total_env_steps=1000",
                                                               f"replay.record_to={data}"]),
          tmp_path / "collect", progress=False)
    config = load_config(CONFIGS / "dqn_cartpole.yaml", QUICK + [
        "regime.mode=offline_to_online", f"regime.dataset={data}", "run.total_env_steps=300"])
    summary = train(config, tmp_path / "o2o", progress=False)
    # Replay held the 1000 recorded transitions, so learning started at the first env step.
    assert summary["env_steps"] == 300 and summary["learner_updates"] == 300


def test_dataset_of_another_env_is_refused(tmp_path):
    data = tmp_path / "collect" / "dataset"
    train(load_config(CONFIGS / "dqn_cartpole.yaml", QUICK + ["run.total_env_steps=600",
                                                               f"replay.record_to={data}"]),
          tmp_path / "collect", progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "eosrl.launch.cli", "train", str(CONFIGS / "dqn_minatar_breakout.yaml"),
         "--run-dir", str(tmp_path / "wrong"), "--no-progress", "--set", "regime.mode=offline",
         "--set", f"regime.dataset={data}", "--set", "run.total_updates=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "CartPole" in result.stderr and "breakout" in result.stderr.lower()
    assert len(result.stderr.strip().splitlines()) == 1


def test_divergence_is_recorded_with_its_step(tmp_path):
    config = load_config(CONFIGS / "dqn_cartpole.yaml", QUICK + [
        "run.total_env_steps=3000", "agent.optimizer.name=sgd", "agent.optimizer.lr=1e6",
        "run.log_every=100"])
    summary = train(config, tmp_path / "nan", progress=False)
    assert summary["status"] == "diverged"
    event = _events(tmp_path / "nan", "divergence")[0]
    assert 0 < event["step"] < 2500
    assert summary["checkpoint"] is None or "ckpt_" in summary["checkpoint"]
