"""eosrl against the loop a user would otherwise write: env steps/s in the learning
phase of our own minimal single-file DQN (numpy ring buffer, CleanRL-style), of
`eosrl train` and of `eosrl launch --actors 1`, on the same config, measured
side by side in one run (targets: train ≥ 0.8 ×, launch ≥ 1.0 × the single-file loop).

    python benchmarks/versus_single_file.py [--config configs/dqn_minatar_breakout.yaml] [--timed-steps 20000]

The single-file loop uses the config's network, optimiser, loss, ε schedule, batch
size, target period and update period (one update per env step in the shipped
config), so the three differ only in how data moves: a numpy array here, Reverb
in one process for `eosrl train`, Reverb over gRPC between processes for `launch`.
Each run takes `replay.min_size` steps of warm-up, then `--warmup-updates` env
steps whose updates compile and settle, then the timed steps.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from eosrl.launch.builder import Builder  # noqa: E402
from eosrl.launch.config import load_config  # noqa: E402
from eosrl.agents.learner import make_loss_fn  # noqa: E402
from eosrl.agents.optimizers import make_optimizer  # noqa: E402
from eosrl.agents.types import Transition  # noqa: E402
from eosrl.envs.factory import make_env  # noqa: E402
from eosrl.launch.rundir import read_metrics  # noqa: E402
from benchmarks import record  # noqa: E402


def single_file_dqn(config, total_steps: int, timed_from: int) -> float:
    """The loop a user writes: returns env steps/s from step `timed_from` to the end."""
    agent, replay_config = config.agent, config.replay
    assert agent.n_step == 1, "the single-file loop is one-step DQN"
    network = Builder(config).network
    loss_fn = make_loss_fn(network, agent)
    optimizer = make_optimizer(agent.optimizer)
    env = make_env(config.env, config.run.seed, training=True)
    obs, _ = env.reset(seed=config.run.seed)

    capacity = replay_config.capacity
    observations = np.zeros((capacity,) + obs.shape, obs.dtype)
    next_observations = np.zeros_like(observations)
    actions = np.zeros(capacity, np.int32)
    rewards = np.zeros(capacity, np.float32)
    discounts = np.zeros(capacity, np.float32)

    params, net_state = network.init(jax.random.PRNGKey(config.run.seed))
    target_params, opt_state = params, optimizer.init(params)

    @jax.jit
    def q_values(params, net_state, obs):
        return network.apply(params, net_state, obs[None], False)[0][0]

    @jax.jit
    def update(params, target_params, net_state, opt_state, batch):
        (loss, (net_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, target_params, net_state, net_state, batch, True)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), net_state, opt_state, loss

    rng = np.random.default_rng(config.run.seed)
    size, updates, start = 0, 0, None
    for step in range(total_steps):
        if step == timed_from:
            jax.block_until_ready(params)
            start = time.perf_counter()
        fraction = min(1.0, step / max(1, agent.epsilon_decay_steps))
        epsilon = agent.epsilon_start + fraction * (agent.epsilon_end - agent.epsilon_start)
        if rng.random() < epsilon:
            action = int(rng.integers(network.num_actions))
        else:
            action = int(np.argmax(q_values(params, net_state, obs)))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        if config.env.clip_rewards:
            reward = np.clip(reward, -1.0, 1.0)
        i = step % capacity
        observations[i], next_observations[i], actions[i] = obs, next_obs, action
        rewards[i], discounts[i] = reward, 0.0 if terminated else agent.discount
        size = min(size + 1, capacity)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if size >= replay_config.min_size and step % replay_config.update_period == 0:
            idx = rng.integers(0, size, replay_config.batch_size)
            batch = Transition(observations[idx], actions[idx], rewards[idx], discounts[idx],
                               next_observations[idx])
            params, net_state, opt_state, _ = update(params, target_params, net_state, opt_state, batch)
            updates += 1
            if updates % agent.target_update_period == 0:
                target_params = params
    jax.block_until_ready(params)
    assert start is not None
    return (total_steps - timed_from) / (time.perf_counter() - start)


def eosrl_run(command: str, config_path: str, total_steps: int, timed_from: int, run_dir: Path,
              extra: list) -> float:
    """`eosrl train` or `eosrl launch`: env steps/s between its first `train` record at or
    after `timed_from` env steps and its last one."""
    cmd = [sys.executable, "-m", "eosrl.launch.cli", command, config_path, "--run-dir", str(run_dir),
           "--no-progress", "--set", f"run.total_env_steps={total_steps}", "--set", "run.eval_every=0",
           "--set", f"run.checkpoint_every={total_steps}", "--set", "run.log_every=1000", "--set", "replay.checkpoint=false",
           *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl", "train") if r["env_steps"] >= timed_from]
    first, last = records[0], records[-1]
    return (last["env_steps"] - first["env_steps"]) / (last["time"] - first["time"])


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--config", default="configs/dqn_minatar_breakout.yaml")
    parser.add_argument("--timed-steps", type=int, default=20_000)
    parser.add_argument("--warmup-updates", type=int, default=2_000)
    args = parser.parse_args()
    config = load_config(args.config)
    timed_from = config.replay.min_size + args.warmup_updates * config.replay.update_period
    total = timed_from + args.timed_steps
    single = single_file_dqn(config, total, timed_from)
    print(f"single-file loop:        {single:7.1f} env steps/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        train = eosrl_run("train", args.config, total, timed_from, Path(tmp) / "train", [])
        print(f"eosrl train:             {train:7.1f} env steps/s  ({train / single:.2f} × single-file, target ≥ 0.8)",
              flush=True)
        launch = eosrl_run("launch", args.config, total, timed_from, Path(tmp) / "launch", ["--actors", "1"])
        print(f"eosrl launch --actors 1: {launch:7.1f} env steps/s  ({launch / single:.2f} × single-file, target ≥ 1.0)",
              flush=True)
    print(f"{args.config}: {args.timed_steps} timed env steps after {timed_from} (min_size + warm-up updates)")
    single_file = {"single-file": round(single, 1)}
    record.save(args, [
        record.figure("eosrl train, learning phase", round(train, 1), "env steps/s", baselines=single_file,
                      target="≥ 0.8 × single-file"),
        record.figure("eosrl launch --actors 1, learning phase", round(launch, 1), "env steps/s",
                      baselines=single_file, target="≥ 1.0 × single-file")])


if __name__ == "__main__":
    main()
