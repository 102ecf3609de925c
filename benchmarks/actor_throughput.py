"""Env steps/s of one actor process (eosrl actor, writing to a Reverb replay
server over gRPC) against a bare loop of the same env and the same ε-greedy
policy (the config's ε schedule from step 0, as the actor's) in one process, measured in the same run (target ratio >= 0.9). The
actor's figure is the steps the server took in per second between 10 % and
90 % of its run.

With --envs-per-actor N > 1 the actor steps N envs together
(`distributed.envs_per_actor`) and the bare loop steps the same N envs with the
same batched policy (targets: ratio >= 0.85, and >= 3x the single-env actor,
which is measured in the same run).

    python benchmarks/actor_throughput.py [--config configs/dqn_minatar_breakout.yaml] [--steps N]
        [--envs-per-actor N] [--epsilon E]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from eosrl.agents.actor import EpsilonGreedy  # noqa: E402
from eosrl.launch.config import load_config  # noqa: E402
from eosrl.envs.factory import make_env  # noqa: E402
from eosrl.launch.channels import ParamsChannel, connect, inserted_steps  # noqa: E402
from eosrl.launch.builder import Builder  # noqa: E402
from benchmarks import record  # noqa: E402


def bare_loop(config, parts, steps: int, envs: int = 1) -> float:
    """Env steps/s of `envs` envs stepped in a loop with the actor's ε-greedy policy (the
    same ε schedule, so the same share of steps that call the network)."""
    params, net_state = parts.network.init(jax.random.PRNGKey(0))
    vector = [make_env(config.env, seed=1 + i) for i in range(envs)]
    policy = EpsilonGreedy(parts.network, [1 + i for i in range(envs)])
    epsilon = parts.epsilon()
    observations = [env.reset()[0] for env in vector]
    policy(params, net_state, observations, [0.0] * envs)  # compile
    start = time.perf_counter()
    for t in range(steps // envs):
        actions = policy(params, net_state, observations, [epsilon(t)] * envs)
        for i, action in enumerate(actions):
            obs, _, terminated, truncated, _ = vector[i].step(action)
            observations[i] = vector[i].reset()[0] if terminated or truncated else obs
    return steps // envs * envs / (time.perf_counter() - start)


def actor_process(config_path: str, parts, steps: int, tmp: Path, envs: int = 1,
                  overrides: Sequence[str] = ()) -> float:
    import portpicker
    port = portpicker.pick_unused_port()
    address = f"localhost:{port}"
    # No learner samples here, so the rate limiter gets a buffer that never blocks inserts.
    big = ["--set", f"replay.capacity={steps + 1000}", "--set", "replay.min_size=32",
           "--set", "distributed.error_buffer=1e12", "--set", f"distributed.envs_per_actor={envs}",
           *[arg for override in overrides for arg in ("--set", override)]]
    server = subprocess.Popen([sys.executable, "-m", "eosrl.launch.cli", "replay-server", config_path,
                               "--port", str(port), *big], cwd=ROOT)
    try:
        client = connect(address)
        params, net_state = parts.network.init(jax.random.PRNGKey(0))
        ParamsChannel(client, (params, net_state)).publish(params, net_state, 0, 0)
        # Steps the server has taken in, between 10 % and 90 % of the run: leaves out the
        # actor's start-up, and needs no episode to end (a Pong episode is ~900 steps).
        first = last = None
        with open(tmp / "actor.log", "w+") as log:
            actor = subprocess.Popen([sys.executable, "-m", "eosrl.launch.cli", "actor", config_path,
                                      "--replay", address, "--id", "0", "--num-actors", "1", "--steps", str(steps),
                                      "--run-dir", str(tmp), *big], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            while actor.poll() is None:
                now, count = time.perf_counter(), inserted_steps(client)
                if count >= 0.1 * steps and first is None:
                    first = (now, count)
                if count <= 0.9 * steps:
                    last = (now, count)
                time.sleep(0.1)
            log.seek(0)
            assert actor.returncode == 0, log.read()[-2000:]
    finally:
        server.terminate()
        server.wait(30)
    assert first is not None and last is not None and last[1] > first[1], "too few steps to measure"
    return (last[1] - first[1]) / (last[0] - first[0])


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--config", default="configs/dqn_minatar_breakout.yaml")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--envs-per-actor", type=int, default=1,
                        help="envs stepped together by the actor and the bare loop")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="a fixed ε for the actors and the bare loop (default: the config's schedule "
                             "from step 0, mostly exploring, so mostly without a network call)")
    args = parser.parse_args()
    overrides = [] if args.epsilon is None else [f"agent.epsilon_start={args.epsilon}",
                                                 f"agent.epsilon_end={args.epsilon}"]
    config = load_config(args.config, overrides)
    parts = Builder(config)
    envs = args.envs_per_actor
    bare = bare_loop(config, parts, args.steps, envs)
    with tempfile.TemporaryDirectory() as tmp:
        actor = actor_process(args.config, parts, args.steps, Path(tmp), envs, overrides)
    single = None
    if envs > 1:
        with tempfile.TemporaryDirectory() as tmp:
            single = actor_process(args.config, parts, args.steps, Path(tmp), 1, overrides)
    epsilon = "the config's schedule" if args.epsilon is None else f"{args.epsilon:g}"
    print(f"{args.config}: {args.steps} env steps, {envs} env(s) per actor, ε {epsilon}")
    print(f"bare loop (env(s) + jitted policy, one process): {bare:8.1f} steps/s")
    print(f"actor process writing to Reverb:                {actor:8.1f} steps/s")
    print(f"ratio actor/bare: {actor / bare:.3f}  (target >= {0.9 if envs == 1 else 0.85})")
    if single is not None:
        print(f"single-env actor process writing to Reverb:     {single:8.1f} steps/s")
        print(f"ratio actor/single-env actor: {actor / single:.2f}  (target >= 3)")
    env = f"{'MinAtar' if config.env.kind == 'minatar' else 'Atari'} {config.env.id.capitalize()}"
    policy = "ε schedule" if args.epsilon is None else f"fixed ε {args.epsilon:g}"
    if envs == 1:
        name, baselines, target = f"one actor process writing to Reverb, {env}, {policy}", {}, "≥ 0.9 × bare"
    else:
        name, target = f"{envs} envs in one actor, {env}, {policy}", "≥ 0.85 × bare, ≥ 3 × single-env"
        baselines = {"single-env": round(single, 1)}
    record.save(args, [record.figure(name, round(actor, 1), "steps/s", baselines={"bare": round(bare, 1), **baselines},
                                     target=target)])


if __name__ == "__main__":
    main()
