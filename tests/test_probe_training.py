"""Probes inside a real training run: records in metrics.jsonl, the fixed probe
batch kept in checkpoints across a resume, and plots of the run."""
import numpy as np

import pytest
from eosrl.agents import checkpoint
from eosrl.launch.config import load_config
from conftest import CONFIGS
from eosrl.launch.plot import plot_runs
from eosrl.launch.rundir import read_metrics
from eosrl.launch.builder import Builder
from eosrl.launch.train import train

# Learning, launches and studies take seconds to minutes each: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

PROBE_KEYS = {"eigenvalues", "residuals", "converged", "sharpness", "threshold", "sharpness_over_threshold",
              "grad_norm", "hvps", "seconds", "env_steps"}


def test_probes_during_training_and_fixed_batch_survives_resume(tmp_path):
    run_dir = tmp_path / "run"
    sets = ["probe.enabled=true", "probe.every=100", "probe.batch_size=128", "probe.iterations=10",
            "run.total_env_steps=1500", "replay.min_size=500", "run.eval_every=0",
            "run.eval_episodes=1", "agent.optimizer.name=sgd", "agent.optimizer.lr=0.01",
            "agent.optimizer.momentum=0.9", "run.log_every=250", "probe.trace_every=100",
            "probe.geometric_complexity_every=200", "probe.batch_sharpness_batches=2"]
    config = load_config(CONFIGS / "dqn_cartpole.yaml", sets)
    summary = train(config, run_dir, progress=False)
    probes = list(read_metrics(run_dir / "metrics.jsonl", "probe"))
    assert [p["step"] for p in probes] == list(range(100, summary["learner_updates"] + 1, 100))
    assert len(probes) >= 9
    for p in probes:
        assert PROBE_KEYS <= set(p)
        assert len(p["eigenvalues"]) == 5 and p["eigenvalues"] == sorted(p["eigenvalues"], reverse=True)
        assert abs(p["threshold"] - (2 + 2 * 0.9) / 0.01) < 1e-6   # heavy ball (2+2β)/η
        assert p["sharpness"] == p["eigenvalues"][0]
        assert "trace" in p and ("geometric_complexity" in p) == (p["step"] % 200 == 0)  # the extras' own `every`
        # Batch sharpness on 2 fresh batches of the training batch size (replay.batch_size 64).
        assert p["batch_sharpness_batches"] == 2 and p["batch_sharpness_batch_size"] == 64
        assert np.isfinite([p["batch_sharpness"], p["batch_lambda_max"]]).all()
        assert p["batch_sharpness_over_threshold"] == pytest.approx(p["batch_sharpness"] / p["threshold"])
    assert [p["warm_start"] for p in probes] == [False] + [True] * (len(probes) - 1)

    parts = Builder(config)
    path = checkpoint.latest(run_dir / "checkpoints")
    template = {"learner": parts.make_learner().state, "extra": {"probe_batch": parts.batch_template(128)}}
    saved, meta = checkpoint.load(path, template)
    assert meta["has_probe_batch"]
    batch_before = saved["extra"]["probe_batch"]

    config = load_config(run_dir / "config.yaml", ["run.total_env_steps=1800"])
    train(config, run_dir, resume=True, progress=False)
    saved, _ = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"), template)
    for key in batch_before:
        np.testing.assert_array_equal(saved["extra"]["probe_batch"][key], batch_before[key])

    written = plot_runs([run_dir])
    names = {p.name for p in written}
    assert {"sharpness.png", "eigenvalues.png", "loss.png", "returns.png"} <= names
