"""Cost per learner update of each stability control (agents/step_sizes.py,
agents/regularisers.py) against a plain update, same process, same batch: the
MinAtar CNN with SGD and heavy-ball momentum (configs/eos_dqn_minatar_breakout.yaml),
DQN and C51, from a random pre-made batch (no replay in the loop).

    python benchmarks/step_size_cost.py [--batch-size 512] [--repeats 5] [--updates 20]

Prints, per agent and option, the median time per update over the repeats (taken
round-robin, so a load swing hits every option alike) and its ratio to the plain update.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import median
from typing import Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from eosrl.launch.builder import Builder  # noqa: E402
from eosrl.launch.config import load_config  # noqa: E402
from eosrl.agents.learner import Learner  # noqa: E402
from eosrl.agents.types import Transition  # noqa: E402
from benchmarks import record  # noqa: E402
from benchmarks.sn_overhead import seconds_per_update  # noqa: E402

CONFIG = "configs/eos_dqn_minatar_breakout.yaml"
OPTIONS = {
    "plain": [],
    "drift_adjusted": ["agent.optimizer.step_size_rule=drift_adjusted"],
    "corridor": ["agent.optimizer.step_size_rule=corridor"],
    "gradient_penalty": ["agent.gradient_penalty=0.1"],
    "geometric_complexity_penalty": ["agent.geometric_complexity_penalty=0.01"],
}


def bench(kind: str, batch_size: int, repeats: int, count: int) -> List[Dict]:
    learners = {}
    for name, sets in OPTIONS.items():
        config = load_config(CONFIG, [f"agent.kind={kind}", f"replay.batch_size={batch_size}", *sets])
        learners[name] = Learner(Builder(config).network, config.agent, seed=0)  # takes Transitions
    spec, rng = Builder(config).spec, np.random.default_rng(0)
    batch = jax.device_put(Transition(
        obs=rng.random((batch_size, *spec.obs_shape)) < 0.1, next_obs=rng.random((batch_size, *spec.obs_shape)) < 0.1,
        action=rng.integers(0, spec.num_actions, batch_size).astype(np.int32),
        reward=rng.normal(size=batch_size).astype(np.float32), discount=np.full(batch_size, 0.99, np.float32)))
    for learner in learners.values():  # compile, then a few updates to settle caches
        seconds_per_update(learner, batch, 1)
        seconds_per_update(learner, batch, max(1, count // 4))
    times = {name: [] for name in learners}
    for _ in range(repeats):
        for name, learner in learners.items():
            times[name].append(seconds_per_update(learner, batch, count))
    plain = median(times["plain"])
    print(f"{kind}: batch {batch_size}, {repeats} repeats x {count} updates")
    figures = [record.figure(f"{kind.upper()} plain update, batch {batch_size}", round(1e3 * plain, 1), "ms")]
    for name, values in times.items():
        t = median(values)
        spread = (max(values) - min(values)) / t
        print(f"  {name:<29} {1e3 * t:8.2f} ms/update  x{t / plain:.2f} plain  | spread {100 * spread:.0f}%")
        if name != "plain":
            figures.append(record.figure(f"{kind.upper()} update with {name}, batch {batch_size}", round(t / plain, 2),
                                         "× plain", details={"spread %": round(100 * spread)}))
    return figures


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--agents", default="dqn,c51")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--updates", type=int, default=20, help="updates per timed repeat")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs visible")
    figures = [f for kind in args.agents.split(",") for f in bench(kind.strip(), args.batch_size, args.repeats,
                                                                     args.updates)]
    record.save(args, figures)


if __name__ == "__main__":
    main()
