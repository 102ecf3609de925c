"""End-to-end learning through the real loop (env -> Reverb -> learner), evaluation
of the learnt checkpoint, and resume."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from eosrl.launch.config import load_config
from conftest import CONFIGS, ROOT
from eosrl.launch.rundir import read_metrics
from eosrl.launch.builder import Builder
from eosrl.launch.train import train

# Learning, launches and studies take seconds to minutes each: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow


def _best_eval(run_dir):
    return max(r["return_mean"] for r in read_metrics(run_dir / "metrics.jsonl", "eval"))


# DQN's evaluations on CartPole swing, and Reverb's sampling makes each run different: seed 1
# with 45k steps is the budget measured to reach 400 (benchmarks/README.md, learning tests).
# Since exploration is drawn on the host, 1 of 5 such DQN runs stayed near 230 throughout, so
# a run that does not reach 400 gets one more run, with seed 2 (RETRY_SEED): a broken learner
# fails both; a healthy DQN fails both about 1 time in 25 by that measure. The distributional
# agents get the same second run: a clean-clone suite of 2026-12-06 saw QR-DQN's 20k-step run
# peak at 369.6 (it had reached 400 in every earlier suite).
DQN_RUN = ["run.seed=1", "run.total_env_steps=45000", "run.eval_every=1500"]
RETRY_SEED = 2


@pytest.mark.xdist_group("learning")  # CPU-bound: never beside another learning run (Makefile, test)
@pytest.mark.parametrize("name,overrides", [
    ("dqn_cartpole", DQN_RUN),
    # The distributional agents reached 400 by 3.5-8k env steps in most runs measured (C51 held
    # 500 from 7.5k; QR-DQN's seed-0 runs by 6k): 20k of the presets' 30k keeps the suite short
    # and still fails a learner that does not learn (C51 with its loss's sign flipped: 9.8 at best).
    ("c51_cartpole", ["run.total_env_steps=20000"]),
    ("qrdqn_cartpole", ["run.total_env_steps=20000"]),
    # Spectral normalisation of the penultimate layer (Gogianu et al., 2021) still learns, in
    # `clip` mode (W/max(1, σ)); `divide` learns CartPole only sometimes (benchmarks/README.md).
    ("dqn_cartpole", [*DQN_RUN, "agent.spectral_norm.layers=-2", "agent.spectral_norm.mode=clip"]),
], ids=["dqn", "c51", "qrdqn", "dqn_sn-2"])
def test_cartpole_learns_to_400(tmp_path, name, overrides):
    config = load_config(CONFIGS / f"{name}.yaml", ["replay.checkpoint=false", *overrides])
    summary = train(config, tmp_path / name, progress=False)
    assert summary["status"] == "completed"
    run_dir = tmp_path / name
    best = _best_eval(run_dir)
    if best < 400:  # see RETRY_SEED
        retry = load_config(CONFIGS / f"{name}.yaml", ["replay.checkpoint=false", *overrides,
                                                        f"run.seed={RETRY_SEED}"])
        assert train(retry, tmp_path / "retry", progress=False)["status"] == "completed"
        retry_best = _best_eval(tmp_path / "retry")
        if retry_best > best:
            run_dir, best = tmp_path / "retry", retry_best
    assert best >= 400, f"{name}: best evaluation return {best:.1f} < 400 (seed {RETRY_SEED} too)"
    if name == "c51_cartpole":  # holds 500 once learnt: its final checkpoint must evaluate well
        _check_evaluate_command(run_dir)


def _check_evaluate_command(run_dir):
    """`eosrl evaluate RUN_DIR` loads the last checkpoint, prints one JSON record,
    appends it to the run's metrics and writes the requested GIF."""
    video = run_dir / "episode.gif"
    result = subprocess.run([sys.executable, "-m", "eosrl.launch.cli", "evaluate", str(run_dir), "--episodes", "3",
                             "--video", str(video)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["episodes"] == 3 and record["epsilon"] == 0.0
    assert record["return_mean"] >= 400, record
    assert record["checkpoint"].endswith(".npz") and video.stat().st_size > 0
    appended = [r for r in read_metrics(run_dir / "metrics.jsonl", "eval") if r.get("source") == "eosrl evaluate"]
    assert len(appended) == 1 and appended[0]["return_mean"] == record["return_mean"]
    missing = subprocess.run([sys.executable, "-m", "eosrl.launch.cli", "evaluate", str(run_dir / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "not a run directory or a checkpoint file" in missing.stderr


def test_checkpoint_round_trip_restores_identical_state(tmp_path):
    config = load_config(CONFIGS / "dqn_cartpole.yaml")
    parts = Builder(config)
    learner = parts.make_learner()
    rng = np.random.default_rng(0)
    batch = parts.layout.items(rng.normal(size=(64, 1, 4)), rng.integers(0, 2, 64), np.ones(64),
                               np.full(64, 0.99), rng.normal(size=(64, 1, 4)))
    for _ in range(5):
        learner.update(batch)
    path = learner.save(tmp_path, meta={"env_steps": 123})
    fresh = parts.make_learner()
    _, meta = fresh.restore(path)
    assert meta["env_steps"] == 123
    for a, b in zip(jax.tree_util.tree_leaves(learner.state), jax.tree_util.tree_leaves(fresh.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Both continue identically.
    np.testing.assert_allclose(float(learner.update(batch)["loss"]), float(fresh.update(batch)["loss"]))


def test_resume_continues_step_counters(tmp_path):
    run_dir = tmp_path / "run"
    base = ["run.total_env_steps=1500", "run.checkpoint_every=1500", "run.eval_every=0",
            "run.eval_episodes=1", "replay.min_size=500", "run.log_every=250"]
    config = load_config(CONFIGS / "dqn_cartpole.yaml", base)
    first = train(config, run_dir, progress=False)
    assert first["env_steps"] == 1500
    config = load_config(run_dir / "config.yaml", ["run.total_env_steps=2000"])
    second = train(config, run_dir, resume=True, progress=False)
    events = [r for r in read_metrics(run_dir / "metrics.jsonl", "event") if r["event"] == "resumed"]
    assert len(events) == 1
    assert events[0]["env_steps"] == 1500 and events[0]["step"] == first["learner_updates"]
    assert events[0]["replay_size"] > 0  # the Reverb checkpoint brought the data back
    assert second["env_steps"] == 2000
    assert second["learner_updates"] == first["learner_updates"] + 500
    steps = [r["env_steps"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    assert steps == sorted(steps) and steps[-1] == 2000
