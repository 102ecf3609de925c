"""Cost benchmark of the Hessian probe's building block: one Hessian-vector
product (forward-over-reverse, as in `agents.probes.make_hvp`) against one
gradient of the DQN TD loss, at the probe batch size of 512.

Theory says an HVP costs a small constant number of gradients (≈ 2-3: a
forward-mode pass through the backward pass); the target is ≤ 3×. A probe
costs about `iterations` (+ residual and Hutchinson) HVPs, so this ratio
times the iteration count is what a probe adds relative to one update.

    python benchmarks/hvp_cost.py [--repeats 5] [--nature-repeats 3]

Both functions are jitted on the flat parameter vector and timed after a
warm-up call (compilation excluded), alternating within each repeat; the
median of the repeats is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from anywhere
    sys.path.insert(0, str(ROOT))

from eosrl.agents import networks  # noqa: E402
from eosrl.agents.config import AgentConfig  # noqa: E402
from eosrl.agents.learner import Transition, make_loss_fn  # noqa: E402
from eosrl.agents.probes import make_hvp  # noqa: E402
from benchmarks import record  # noqa: E402

CASES = {
    # name: (env kind, observation shape, observation dtype)
    "minatar": ("minatar", (10, 10, 4), np.bool_),
    "nature": ("atari", (84, 84, 4), np.uint8),
}


def random_batch(obs_shape, obs_dtype, num_actions: int, batch_size: int, seed: int = 0) -> Transition:
    rng = np.random.default_rng(seed)
    if obs_dtype == np.uint8:
        def obs():
            return rng.integers(0, 256, (batch_size,) + obs_shape, dtype=np.uint8)
    else:
        def obs():
            return rng.random((batch_size,) + obs_shape) < 0.1
    return Transition(obs=obs(), action=rng.integers(0, num_actions, batch_size).astype(np.int32),
                      reward=rng.normal(size=batch_size).astype(np.float32),
                      discount=np.full(batch_size, 0.99, np.float32), next_obs=obs())


def paired_median_seconds(calls: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median wall time of each call. The calls alternate within every repeat,
    so a load change on a shared machine affects both alike."""
    for call in calls.values():
        jax.block_until_ready(call())  # compile and warm up
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(case: str, batch_size: int = 512, num_actions: int = 6,
            repeats: int = 5) -> Dict[str, float]:
    env_kind, obs_shape, obs_dtype = CASES[case]
    agent = AgentConfig(kind="dqn")
    network = networks.make_network(agent, env_kind, obs_shape, num_actions)
    params, net_state = network.init(jax.random.PRNGKey(0))
    loss_fn = make_loss_fn(network, agent)
    batch = jax.tree_util.tree_map(jnp.asarray,
                                   random_batch(obs_shape, obs_dtype, num_actions, batch_size))
    flat, unravel = ravel_pytree(params)

    # The probe's loss: target params (here a copy), batch and SN state fixed.
    # They are jit *arguments*, not closed-over constants: as constants, XLA
    # would constant-fold the target network's forward pass at compile time
    # (minutes on CPU) and time a different program than the probe runs.
    def loss_of_flat(x, target_params, batch):
        return loss_fn(unravel(x), target_params, net_state, net_state, batch, False)[0]

    grad = jax.jit(jax.grad(loss_of_flat))
    hvp = jax.jit(lambda x, v, tp, b: make_hvp(lambda y: loss_of_flat(y, tp, b), x)(v))
    v = jax.random.normal(jax.random.PRNGKey(1), flat.shape, flat.dtype)
    medians = paired_median_seconds({"grad": lambda: grad(flat, params, batch),
                                     "hvp": lambda: hvp(flat, v, params, batch)}, repeats)
    grad_s, hvp_s = medians["grad"], medians["hvp"]
    return {"params": int(flat.shape[0]), "grad_s": grad_s, "hvp_s": hvp_s,
            "ratio": hvp_s / grad_s}


def main(argv=None) -> int:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nature-repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=3.0)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch_size}, "
          f"DQN loss, median of repeats (compilation excluded)")
    ok, figures = True, []
    for case, repeats in (("minatar", args.repeats), ("nature", args.nature_repeats)):
        r = measure(case, args.batch_size, repeats=repeats)
        ok &= r["ratio"] <= args.target
        print(f"{case:8s} {r['params']:>9,d} params  grad {r['grad_s'] * 1e3:9.1f} ms  "
              f"HVP {r['hvp_s'] * 1e3:9.1f} ms  HVP/grad {r['ratio']:.2f}x  "
              f"({'within' if r['ratio'] <= args.target else 'ABOVE'} target {args.target:g}x, "
              f"{repeats} repeats)", flush=True)
        network = "MinAtar CNN" if case == "minatar" else "Nature CNN"
        figures.append(record.figure(f"one HVP, {network}, batch {args.batch_size}", round(r["hvp_s"] * 1e3, 1), "ms",
                                     baselines={"gradient": round(r["grad_s"] * 1e3, 1)},
                                     target=f"≤ {args.target:g} × gradient"))
    record.save(args, figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
