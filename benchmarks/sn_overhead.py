"""Cost of spectral normalisation in the learner: updates/s of the jitted
Learner update with SN off, SN(-2) and SN(all), on the MinAtar and Nature
networks, from a random pre-made batch (no replay in the loop).

    python benchmarks/sn_overhead.py [--nets minatar,nature] [--conv reshape|operator]
                                     [--repeats R] [--batch-size 32]

Prints, per network and variant, the median updates/s over R repeats and the
overhead ratio (time per update / time per update without SN), and the same
from the fastest repeat: on a shared machine other jobs only ever add time, so
when the spread is large the best-of-R figures are the steadier estimate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from eosrl.agents.config import AgentConfig, SpectralNormConfig  # noqa: E402
from eosrl.agents.learner import Learner, Transition  # noqa: E402
from eosrl.agents.networks import make_network  # noqa: E402
from benchmarks import record  # noqa: E402

# (env kind, obs shape, obs dtype, updates per timed repeat). A Nature update
# on 2 CPU cores takes tens of ms, so its repeats are short to keep the run under 2 minutes.
NETS = {
    "minatar": ("minatar", (10, 10, 4), np.float32, 50),
    "nature": ("atari", (84, 84, 4), np.uint8, 5),
}
VARIANTS = ("none", "-2", "all")
LABELS = {"minatar": "MinAtar", "nature": "Nature"}
NUM_ACTIONS = 6


def random_batch(shape, dtype, batch: int, seed: int = 0) -> Transition:
    rng = np.random.default_rng(seed)

    def obs():
        if dtype == np.uint8:
            return rng.integers(0, 256, (batch,) + shape, dtype=np.uint8)
        return rng.random((batch,) + shape, dtype=np.float32)

    return jax.device_put(Transition(
        obs=obs(), next_obs=obs(),
        action=rng.integers(0, NUM_ACTIONS, batch).astype(np.int32),
        reward=rng.normal(size=batch).astype(np.float32),
        discount=np.full(batch, 0.99, np.float32)))


def make_learner(env_kind, shape, layers: str, conv: str) -> Learner:
    # Default agent (DQN, Adam); SN in `divide` mode, one power iteration, as in Gogianu et al.
    agent = AgentConfig(spectral_norm=SpectralNormConfig(layers=layers, conv=conv))
    return Learner(make_network(agent, env_kind, shape, NUM_ACTIONS), agent, seed=0)


def seconds_per_update(learner: Learner, batch, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        metrics = learner.update(batch)
    jax.block_until_ready((metrics, learner.state))
    return (time.perf_counter() - start) / count


def bench(name: str, conv: str, repeats: int, batch_size: int) -> List[Dict]:
    env_kind, shape, dtype, count = NETS[name]
    batch = random_batch(shape, dtype, batch_size)
    learners = {v: make_learner(env_kind, shape, v, conv) for v in VARIANTS}
    for learner in learners.values():  # compile, then a few updates to settle caches
        seconds_per_update(learner, batch, 1)
        seconds_per_update(learner, batch, max(1, count // 5))
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        # Round-robin over the variants: a machine-load swing then hits every
        # variant alike instead of biasing whichever ran during it.
        for v, learner in learners.items():
            times[v].append(seconds_per_update(learner, batch, count))
    base, best_base = median(times["none"]), min(times["none"])
    layers = learners["none"].network.layer_names
    print(f"{name}: obs {shape} {np.dtype(dtype).name}, layers {', '.join(layers)}, batch {batch_size}, "
          f"conv σ {conv}, {repeats} repeats x {count} updates")
    figures = []
    for v in VARIANTS:
        t = median(times[v])
        spread = (max(times[v]) - min(times[v])) / t
        selected = ", ".join(learners[v].network.layer_names if v == "all" else
                             () if v == "none" else (layers[int(v)],)) or "-"
        best = min(times[v])
        print(f"  SN {v:>4} ({selected:<{len(', '.join(layers))}}): median {1 / t:7.1f} updates/s "
              f"{1e3 * t:7.2f} ms  overhead x{t / base:.3f}  | best {1 / best:7.1f} updates/s  "
              f"overhead x{best / best_base:.3f}  | spread {100 * spread:.0f}%")
        if v != "none":
            figures.append(record.figure(f"{LABELS[name]} update with SN({v}), batch {batch_size}", round(t / base, 2),
                                         "× no SN", details={"best of repeats": round(best / best_base, 2)}))
    return figures


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--nets", default="minatar,nature", help="comma-separated: minatar, nature")
    parser.add_argument("--conv", choices=("reshape", "operator"), default="reshape",
                        help="σ of conv layers (the config's agent.spectral_norm.conv)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs visible")
    figures = [f for name in args.nets.split(",") for f in bench(name.strip(), args.conv, args.repeats,
                                                                   args.batch_size)]
    record.save(args, figures)


if __name__ == "__main__":
    main()
