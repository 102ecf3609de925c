"""Env steps/s of one actor process (eosrl actor, writing to a Reverb replay
server over gRPC) against a bare loop of the same env and the same jitted
policy in one process, measured in the same run (target ratio >= 0.9).

    python benchmarks/actor_throughput.py [--config configs/dqn_minatar_breakout.yaml] [--steps N]
"""
from __future__ import annotations

import argparse
import json
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

from eosrl.agents.actor import make_policy  # noqa: E402
from eosrl.agents.config import load_config  # noqa: E402
from eosrl.envs.factory import make_env  # noqa: E402
from eosrl.launch.channels import ParamsChannel, connect  # noqa: E402
from eosrl.agents.builder import Builder  # noqa: E402


def bare_loop(config, parts, steps: int) -> float:
    env = make_env(config.env, seed=1)
    policy = make_policy(parts.network)
    params, net_state = parts.network.init(jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)
    obs, _ = env.reset()
    policy(params, net_state, obs, rng, 0.1)  # compile
    start = time.perf_counter()
    for _ in range(steps):
        action, rng = policy(params, net_state, obs, rng, 0.1)
        obs, _, terminated, truncated, _ = env.step(int(action))
        if terminated or truncated:
            obs, _ = env.reset()
    return steps / (time.perf_counter() - start)


def actor_process(config_path: str, parts, steps: int, tmp: Path) -> float:
    import portpicker
    port = portpicker.pick_unused_port()
    address = f"localhost:{port}"
    # No learner samples here, so the rate limiter gets a buffer that never blocks inserts.
    big = ["--set", f"replay.capacity={steps + 1000}", "--set", "replay.min_size=32",
           "--set", "distributed.error_buffer=1e12"]
    server = subprocess.Popen([sys.executable, "-m", "eosrl.launch.cli", "replay-server", config_path,
                               "--port", str(port), *big], cwd=ROOT)
    try:
        client = connect(address)
        params, net_state = parts.network.init(jax.random.PRNGKey(0))
        ParamsChannel(client, (params, net_state)).publish(params, net_state, 0, 0)
        actor = subprocess.run([sys.executable, "-m", "eosrl.launch.cli", "actor", config_path, "--replay", address,
                                "--id", "0", "--num-actors", "1", "--steps", str(steps),
                                "--run-dir", str(tmp), *big], cwd=ROOT, capture_output=True, text=True)
        assert actor.returncode == 0, actor.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(30)
    # The actor's own figure over its whole run (first record excludes start-up).
    records = [json.loads(l) for l in open(tmp / "metrics.jsonl") if '"actor"' in l]
    first, last = records[0], records[-1]
    return (last["env_steps"] - first["env_steps"]) / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/dqn_minatar_breakout.yaml")
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args()
    config = load_config(args.config)
    parts = Builder(config)
    bare = bare_loop(config, parts, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        actor = actor_process(args.config, parts, args.steps, Path(tmp))
    print(f"{args.config}: {args.steps} env steps")
    print(f"bare loop (env + jitted policy, one process): {bare:8.1f} steps/s")
    print(f"actor process writing to Reverb:             {actor:8.1f} steps/s")
    print(f"ratio actor/bare: {actor / bare:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
