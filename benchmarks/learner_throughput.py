"""Learner updates/s when fed from Reverb (the prefetching batch stream) against a
bare jitted update on a pre-made batch of the same shapes, in the same process.

    python benchmarks/learner_throughput.py [--env minatar|atari] [--updates N]

Prints both figures and their ratio (target >= 0.9).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import reverb  # noqa: E402

from eosrl.agents import replay  # noqa: E402
from eosrl.launch.config import load_config  # noqa: E402
from eosrl.launch.builder import Builder  # noqa: E402
from benchmarks import record  # noqa: E402

CONFIGS = {"minatar": "configs/dqn_minatar_breakout.yaml", "atari": "configs/dqn_atari_pong.yaml"}


def fill(client, parts, transitions: int, seed: int = 0) -> None:
    """Random episodes of the env's shapes written through the real adder."""
    rng = np.random.default_rng(seed)
    spec = parts.spec
    adder = parts.make_adder(client)

    def obs():
        if spec.obs_dtype == np.uint8:
            return rng.integers(0, 255, spec.obs_shape, dtype=np.uint8)
        return rng.random(spec.obs_shape) < 0.1  # MinAtar: sparse bool object maps

    written = 0
    while written < transitions:
        adder.add_first(obs())
        for t in range(100):
            adder.add(int(rng.integers(spec.num_actions)), float(rng.normal()), False, t == 99, obs())
        written += 100
    adder.flush()
    adder.close()


def time_updates(step, count: int) -> float:
    out = step()
    jax.block_until_ready(out)  # compile and warm up
    start = time.perf_counter()
    for _ in range(count):
        out = step()
    jax.block_until_ready(out)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--env", choices=sorted(CONFIGS), default="minatar")
    parser.add_argument("--updates", type=int, default=None, help="timed updates (default by env)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    count = args.updates or (2000 if args.env == "minatar" else 100)
    config = load_config(CONFIGS[args.env], [f"replay.batch_size={args.batch_size}"])
    parts = Builder(config)
    server = replay.start_server([replay.replay_table(20_000, 1000, parts.signature())])
    client = reverb.Client(f"localhost:{server.port}")
    fill(client, parts, 5000 if args.env == "minatar" else 2000)
    learner = parts.make_learner()

    fixed = jax.device_put(replay.sample_items(client, args.batch_size, parts.signature()))
    bare = time_updates(lambda: learner.update(fixed), count)
    stream = replay.batch_stream(f"localhost:{server.port}", args.batch_size)
    fed = time_updates(lambda: learner.update(next(stream)), count)
    print(f"env={args.env} network={parts.network.layer_names} batch={args.batch_size} updates={count}")
    print(f"bare jitted update (pre-made batch): {bare:8.1f} updates/s")
    print(f"fed from Reverb (batch stream):      {fed:8.1f} updates/s")
    print(f"ratio fed/bare: {fed / bare:.3f}  (target >= 0.9)")
    server.stop()
    network = "MinAtar CNN" if args.env == "minatar" else "Nature CNN"
    record.save(args, [record.figure(f"fed from Reverb, {network}, batch {args.batch_size}", round(fed, 1),
                                     "updates/s", baselines={"bare": round(bare, 1)}, target="≥ 0.9 × bare")])


if __name__ == "__main__":
    main()
