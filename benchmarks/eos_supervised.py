"""Accuracy benchmark of the Hessian probe: the edge of stability of full-batch
gradient descent in supervised learning (Cohen et al., 2021), measured with the
same Lanczos code (`agents.probes.top_eigenvalues`) that probes the RL learner.

A tanh MLP regresses a few hundred points with MSE under plain full-batch GD
(`optax.sgd`, step size η). What should be seen:
  1. progressive sharpening: λ₁ starts well below 2/η and rises;
  2. edge of stability: λ₁ then hovers at 2/η (within ±10% here) while the
     loss keeps falling, non-monotonically.
If the probe were wrong (e.g. a wrongly scaled HVP, a non-converged Lanczos),
the plateau would not sit at 2/η.

    python benchmarks/eos_supervised.py [--steps 3000] [--lr 0.1]

prints one line per probe and a final verdict, and writes
benchmarks/plots/eos_supervised.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from anywhere
    sys.path.insert(0, str(ROOT))

from eosrl.agents.probes import top_eigenvalues  # noqa: E402
from benchmarks import record  # noqa: E402

DEFAULT_PLOT = ROOT / "benchmarks" / "plots" / "eos_supervised.png"


def make_problem(num_points: int = 256, input_dim: int = 8, output_dim: int = 4,
                 width: int = 64, depth: int = 2, seed: int = 0) -> Tuple[Callable, Any]:
    """A regression problem and an MLP: returns (loss_of_params, initial params).

    Targets come from a fixed random nonlinear teacher, sin(3·x W); the
    student is a tanh MLP. Loss: mean over points of ½‖f(x) − y‖².
    """
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(num_points, input_dim)).astype(np.float32)
    teacher = rng.normal(size=(input_dim, output_dim)) / np.sqrt(input_dim)
    targets = np.sin(3.0 * inputs @ teacher).astype(np.float32)

    def forward(x):
        for _ in range(depth):
            x = jnp.tanh(hk.Linear(width)(x))
        return hk.Linear(output_dim)(x)

    net = hk.without_apply_rng(hk.transform(forward))
    params = net.init(jax.random.PRNGKey(seed), inputs)

    def loss_of_params(params):
        residual = net.apply(params, inputs) - targets
        return 0.5 * jnp.mean(jnp.sum(jnp.square(residual), axis=-1))

    return loss_of_params, params


def make_trainer(loss_of_params: Callable, optimizer: optax.GradientTransformation,
                 num_steps: int) -> Callable:
    """`num_steps` full-batch GD steps in one jitted scan; returns the losses
    before each step, so every step's loss is recorded without host syncs."""

    @jax.jit
    def train(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_of_params)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), None,
                                                   length=num_steps)
        return params, opt_state, losses

    return train


def summarise(steps: np.ndarray, sharpness: np.ndarray, threshold: float,
              last_fraction: float, tolerance: float = 0.1) -> Dict[str, float]:
    """The verdict's figures: how sharpness in the last part of training
    compares with the threshold, and whether it started below it."""
    ratio = sharpness / threshold
    last = steps >= steps[-1] * (1.0 - last_fraction)
    within = np.abs(ratio[last] - 1.0) <= tolerance
    crossed = np.nonzero(ratio >= 1.0 - tolerance)[0]
    return {
        "initial_ratio": float(ratio[0]),
        "max_ratio": float(ratio.max()),
        "first_step_near_threshold": int(steps[crossed[0]]) if crossed.size else -1,
        "last_part_probes": int(last.sum()),
        "last_part_within_fraction": float(within.mean()),
        "last_part_mean_ratio": float(ratio[last].mean()),
        "last_part_min_ratio": float(ratio[last].min()),
        "last_part_max_ratio": float(ratio[last].max()),
        "rose": bool(ratio[0] < 1.0 - tolerance),
    }


def plot(result: Dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_l) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    thr = result["threshold"]
    ax_s.plot(result["probe_steps"], result["sharpness"], label="λ₁ (Lanczos)")
    ax_s.axhline(thr, color="k", ls="--", label=f"2/η = {thr:g}")
    ax_s.axhspan(0.9 * thr, 1.1 * thr, color="k", alpha=0.08, label="±10%")
    ax_s.set_ylabel("sharpness λ₁(H)")
    ax_s.set_title(f"Full-batch GD, η = {result['lr']:g}: edge of stability")
    ax_s.legend(loc="lower right")
    ax_l.plot(np.arange(len(result["losses"])), result["losses"], lw=0.8)
    ax_l.set_yscale("log")
    ax_l.set_xlabel("gradient step")
    ax_l.set_ylabel("training loss (MSE)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(steps: int = 3000, lr: float = 0.1, probe_every: int = 20, iterations: int = 20,
        last_fraction: float = 0.3, width: int = 64, depth: int = 2, num_points: int = 256,
        seed: int = 0, verbose: bool = True,
        plot_path: Optional[Path] = DEFAULT_PLOT) -> Dict[str, Any]:
    """Trains with full-batch GD, probing λ₁ every `probe_every` steps.

    Returns the probe trace (`probe_steps`, `sharpness`, `residuals`), every
    step's `losses`, `threshold` = 2/η, and the figures of `summarise`.
    """
    start = time.perf_counter()
    loss_of_params, params = make_problem(num_points=num_points, width=width, depth=depth,
                                          seed=seed)
    optimizer = optax.sgd(lr)
    opt_state = optimizer.init(params)
    train = make_trainer(loss_of_params, optimizer, probe_every)
    threshold = 2.0 / lr
    # Compiled once, reused by every probe.
    solve = jax.jit(lambda p, key: top_eigenvalues(loss_of_params, p, 1, iterations, key))
    probe_steps, sharpness, residuals, losses = [], [], [], []
    for i in range(steps // probe_every + 1):
        eig = jax.device_get(solve(params, jax.random.fold_in(jax.random.PRNGKey(seed), i)))
        step = i * probe_every
        probe_steps.append(step)
        sharpness.append(float(eig["values"][0]))
        residuals.append(float(eig["residuals"][0]))
        if step >= steps:
            break
        params, opt_state, chunk = train(params, opt_state)
        losses.extend(np.asarray(chunk).tolist())
        if verbose:
            print(f"step {step:6d}  loss {losses[-probe_every]:.5f}  λ₁ {sharpness[-1]:8.3f}  "
                  f"λ₁·η/2 {sharpness[-1] / threshold:6.3f}  residual {residuals[-1]:.1e}",
                  flush=True)
    result = {"lr": lr, "threshold": threshold, "probe_steps": probe_steps,
              "sharpness": sharpness, "residuals": residuals, "losses": losses}
    result.update(summarise(np.asarray(probe_steps), np.asarray(sharpness), threshold,
                            last_fraction))
    result["seconds"] = time.perf_counter() - start
    if plot_path is not None:
        result["plot"] = str(plot(result, Path(plot_path)))
    if verbose:
        print(verdict_line(result, last_fraction))
    return result


def verdict_line(r: Dict[str, Any], last_fraction: float) -> str:
    ok = r["rose"] and r["last_part_within_fraction"] == 1.0
    return (f"VERDICT {'EoS reproduced' if ok else 'EoS NOT reproduced'}: "
            f"η = {r['lr']:g}, 2/η = {r['threshold']:g}; λ₁ started at {r['initial_ratio']:.3f}·2/η, "
            f"first within 10% at step {r['first_step_near_threshold']}; "
            f"last {last_fraction:.0%} of training: {r['last_part_within_fraction']:.0%} of "
            f"{r['last_part_probes']} probes within ±10% of 2/η, mean λ₁/(2/η) = "
            f"{r['last_part_mean_ratio']:.3f} (min {r['last_part_min_ratio']:.3f}, "
            f"max {r['last_part_max_ratio']:.3f}); {r['seconds']:.1f} s")


def main(argv=None) -> int:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--probe-every", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--last-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    result = run(steps=args.steps, lr=args.lr, probe_every=args.probe_every,
                 iterations=args.iterations, last_fraction=args.last_fraction, seed=args.seed,
                 plot_path=args.plot)
    print(f"plot: {result['plot']}")
    record.save(args, [record.figure(
        f"mean λ₁/(2/η) over the last {100 * args.last_fraction:.0f} % of training", round(result["last_part_mean_ratio"], 3),
        "× 2/η", target="within ±10 % of 2/η",
        details={"min": round(result["last_part_min_ratio"], 3), "max": round(result["last_part_max_ratio"], 3),
                 "probes within ±10 %": f"{result['last_part_within_fraction']:.0%} of {result['last_part_probes']}",
                 "first within 10 % at step": result["first_step_near_threshold"]})])
    return 0 if result["rose"] and result["last_part_within_fraction"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
