"""Readings of the step the optimiser takes, beside λ₁ (agents/probes.py uses them):
how the top eigenvector moved since the last probe, how the last update lies on it,
and the batch sharpness along the momentum step. Pure functions of flat vectors.

In a probe the top eigenvector v₁ is that of A = D^½ H D^½, the operator the next
step θ ← θ − η D m sees (probes.py's module docstring): a unit vector in the
coordinates φ = D^{-½} θ, where the step is plain (heavy-ball, Adam-moment) descent.
A parameter change Δθ is Δφ = D^{-½} Δθ there.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from eosrl.agents.config import OptimizerConfig

_dot = functools.partial(jnp.vdot, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPUs


def _unit(x: jnp.ndarray) -> jnp.ndarray:
    norm = jnp.linalg.norm(x)
    return x / jnp.where(norm > 0, norm, 1.0)


def orient(previous: jnp.ndarray, v1: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(v₁ as a unit vector with the sign that continues `previous`, |⟨previous, v₁⟩|), both
    unit-normalised. An eigenvector's sign is arbitrary; choosing ⟨previous, v₁⟩ ≥ 0 makes
    the sign of `update_projection` comparable from probe to probe."""
    previous, v1 = _unit(previous), _unit(v1)
    overlap = _dot(previous, v1)
    return jnp.where(overlap < 0, -v1, v1), jnp.abs(overlap)


def update_projection(update: jnp.ndarray, v1: jnp.ndarray,
                      scaling: Optional[jnp.ndarray]) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """(⟨Δφ, v₁⟩, ⟨Δφ, v₁⟩/‖Δφ‖) with Δφ = D^{-½} Δθ (`scaling` = D^½, None for D = 1):
    the component of the parameter change Δθ along the unit top eigenvector, and its
    cosine with it (0 for no change)."""
    delta = update if scaling is None else update / scaling
    projection = _dot(delta, v1)
    norm = jnp.linalg.norm(delta)
    return projection, jnp.where(norm > 0, projection / jnp.where(norm > 0, norm, 1.0), 0.0)


# ----------------------------------------------------------------------------
# The momentum step.

_MOMENTUM_STATES = (optax.TraceState, optax.ScaleByAdamState)


def momentum_buffer(opt_state: Any) -> Optional[Any]:
    """The momentum buffer inside `opt_state` (params-shaped), wherever `optax.chain` nested
    it: heavy ball's trace (optax.sgd with momentum) or Adam's first moment μ; None for an
    optimiser without one (plain SGD, RMSProp). Read from the state, no optimiser built."""
    is_state = lambda node: isinstance(node, _MOMENTUM_STATES)  # noqa: E731
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state):
        if isinstance(node, optax.TraceState):
            return node.trace
        if isinstance(node, optax.ScaleByAdamState):
            return node.mu
    return None


def step_coefficients(opt: OptimizerConfig, lr: float) -> Tuple[float, float]:
    """(a, b) such that the next step, on a batch of gradient g with momentum buffer m, is
    θ ← θ − c·D(a·m + b·g) for some c > 0 (agents/optimizers.py builds the optimisers):

    - heavy ball (optax trace m ← βm + g; θ ← θ − ηm): (β, 1); Nesterov, whose step is
      g + β(βm + g): (β², 1 + β);
    - with a step-size rule the trace holds η_t-scaled gradients (m ← βm + η_t g; θ ← θ − m):
      b is η_t, taken as `lr` (the last update's, which the probe records);
    - Adam (μ ← β₁μ + (1−β₁)g, step ∝ μ̂/(√ν̂ + ε) = P⁻¹μ up to the bias corrections,
      positive factors): (β₁, 1 − β₁).
    """
    if opt.name == "adam":
        return opt.b1, 1.0 - opt.b1
    beta = opt.momentum
    a, b = (beta * beta, 1.0 + beta) if opt.nesterov else (beta, 1.0)
    if opt.step_size_rule != "constant":
        b = b * lr
    return a, b


def directional_sharpness(hvp, direction: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
    """sᵀHs / sᵀg along the step direction s (0 where sᵀg = 0). Invariant under positive
    rescaling of s and under the change of coordinates φ = D^{-½}θ (both terms are), and
    for s = g it is gᵀHg/‖g‖². The loss's quadratic model along the step θ − ηs,
    L − η sᵀg + ½η² sᵀHs, is below L iff it is < 2/η (for sᵀg > 0)."""
    curvature, slope = _dot(direction, hvp(direction)), _dot(direction, grad)
    return jnp.where(slope != 0, curvature / jnp.where(slope != 0, slope, 1.0), 0.0)
