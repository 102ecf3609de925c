"""The batch sharpness of a probe (`probe.batch_sharpness_batches`; docs/design.md, "Batch
sharpness"): per fresh batch B of the training size, the curvature of L_B along the step
(g_B, and with a momentum buffer the momentum step) and λ_max of its Hessian, in the geometry
of λ₁. Pure functions of the TD loss and the probe's settings; `Prober` jits `measure` once.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eosrl.agents import step_readings
from eosrl.agents.config import OptimizerConfig, ProbeConfig
from eosrl.agents.eigensolvers import lanczos, make_hvp, preconditioned, ritz_residuals, top_eigenpairs


def measure(loss_fn: Callable, config: ProbeConfig, opt: OptimizerConfig, snap: Any, batches: Any,
            init: jnp.ndarray, rng: jax.Array) -> Dict[str, jnp.ndarray]:
    """Per batch B of `batches` (K batches stacked on a leading axis), in the
    geometry of λ₁: D^½ the step's scaling (D = 1 for SGD), A_B = D^½ H_B D^½.

    - Step sharpness uᵀA_Bu/‖u‖², u = D^½g_B (= g_BᵀDH_BDg_B / g_BᵀDg_B): the
      Rayleigh quotient of the operator the step sees along the step. For SGD
      it is g_BᵀH_Bg_B/‖g_B‖², whose mean over batches is the Batch Sharpness
      of Andreyev & Beneventano (2024, arXiv:2412.20553, "Edge of Stochastic
      Stability: Revisiting the Edge of Stability for SGD"; a mean of ratios,
      as their code estimates it). In φ = D^{-½}θ the step θ ← θ − ηDg_B is
      SGD on L_B, with gradient u and Hessian A_B: their quantity for the
      step actually taken. L_B(θ − ηDg_B) ≈ L_B − η‖u‖² + ½η²uᵀA_Bu falls
      iff the step sharpness < 2/η. A batch whose gradient vanishes counts 0.
    - λ_max(A_B): `lobpcg` on one vector started from this probe's top
      eigenvector of the probe batch (so inline and prober-process probes of
      a snapshot agree), to `probe.tolerance` or `probe.iterations`:
      iterations + 2 HVPs; `lanczos`: `probe.iterations` cold steps and a
      residual, iterations + 1 HVPs.

    - Momentum step sharpness sᵀH_Bs/sᵀg_B along the step the optimiser would
      take on B, s = D(a·m + b·g_B) with m the snapshot's momentum buffer
      (`step_readings.step_coefficients`: heavy ball s ∝ βm + g_B, Adam
      s ∝ P⁻¹(β₁μ + (1−β₁)g_B)); only when the snapshot has a buffer. One HVP more.

    One batch at a time (`lax.map`): memory stays that of one batch. HVPs:
    1 + the solver's per batch (plus a gradient, not counted)."""
    c = config
    flat, unravel = ravel_pytree(snap.params)
    scaling = snap.step_scaling
    num = jax.tree_util.tree_leaves(batches)[0].shape[0]

    def one(args):
        batch, key = args

        def loss(x):
            return loss_fn(unravel(x), snap.target_params, snap.net_state,
                                snap.target_net_state, batch, False)[0]
        hvp = make_hvp(loss, flat)
        grad = jax.grad(loss)(flat)
        operator, u = (hvp, grad) if scaling is None else (preconditioned(hvp, scaling), scaling * grad)
        dot = functools.partial(jnp.vdot, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPUs
        uu = dot(u, u)
        step_sharpness = jnp.where(uu > 0, dot(u, operator(u)) / jnp.where(uu > 0, uu, 1.0), 0.0)
        if c.method == "lanczos":
            values, vectors = lanczos(operator, flat.shape[0], c.iterations, key, flat.dtype)
            value, residual = values[0], ritz_residuals(operator, values[:1], vectors[:1])[0]
            hvps = jnp.asarray(min(c.iterations, flat.shape[0]) + 1, jnp.int32)
        else:
            top = top_eigenpairs(operator, init, c.tolerance, c.iterations)
            value, residual, hvps = top["values"][0], top["residuals"][0], top["hvps"]
        converged = residual <= c.tolerance * jnp.abs(value)
        momentum_sharpness = jnp.zeros((), flat.dtype)
        if snap.momentum is not None:  # along the momentum step s = D(a·m + b·g_B): one HVP more
            direction = a * snap.momentum + b * grad
            direction = direction if scaling is None else scaling * scaling * direction
            momentum_sharpness, hvps = step_readings.directional_sharpness(hvp, direction, grad), hvps + 1
        return step_sharpness, value, residual, converged, hvps + 1, momentum_sharpness

    a, b = step_readings.step_coefficients(opt, snap.lr)
    keys = jax.random.split(rng, num)
    step_sharpness, values, residuals, converged, hvps, momentum = jax.lax.map(one, (batches, keys))
    out = {"step_sharpness": step_sharpness, "lambda_max": values, "residuals": residuals,
           "converged": converged, "hvps": jnp.sum(hvps)}
    if snap.momentum is not None:
        out["momentum_sharpness"] = momentum
    return out

# -- readings beside λ₁ (agents/readings.py; docs/design.md, "Probe readings") --------


def record_fields(out: Dict[str, Any], num: int, batch_size: int, threshold: float) -> Dict[str, Any]:
    """The batch-sharpness fields of a `probe` record from `measure`'s output (on the host)
    over `num` batches of `batch_size` (`Prober.probe` lists them)."""
    fields: Dict[str, Any] = {"batch_sharpness_batches": num, "batch_sharpness_batch_size": batch_size}
    for name, key in (("batch_sharpness", "step_sharpness"), ("batch_lambda_max", "lambda_max"),
                      ("momentum_batch_sharpness", "momentum_sharpness")):
        if key not in out:  # no momentum buffer
            continue
        values = np.asarray(out[key], np.float64)
        mean = float(np.mean(values))
        fields[name] = mean
        fields[f"{name}_stderr"] = float(np.std(values, ddof=1) / math.sqrt(num)) if num > 1 else 0.0
        fields[f"{name}_over_threshold"] = mean / threshold if math.isfinite(threshold) else 0.0
    fields["batch_lambda_max_residual"] = float(np.max(out["residuals"]))
    fields["batch_lambda_max_converged"] = bool(np.all(out["converged"]))
    fields["batch_hvps"] = int(out["hvps"])
    return fields
