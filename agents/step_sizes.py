"""Stability-aware step sizes: rules that set the step size η_t of each update from
the loss and curvature at the current parameters (`agent.optimizer.step_size_rule`).

Both rules are for SGD with or without heavy-ball momentum. As in the authors' code
for the drift-adjusted rule, η_t scales the gradient before the optimiser, which then
runs at learning rate 1: v ← βv + η_t g, θ ← θ − v (with a constant η_t this is the
heavy-ball step of agents/thresholds.py, so the probe's threshold (2+2β)/η_t is the
local one; agents/thresholds.py says why the last η_t, not an average of recent ones).
`corridor` is capped at `lr`, so it only ever shortens the configured step;
`drift_adjusted` is capped at the absolute step `dal_max_lr` (the authors' 5), so its
steps may be longer than `lr`, which it does not use.

- `drift_adjusted` (Rosca, Wu, Qin & Dherin, 2023, "On a continuous time model of
  gradient descent dynamics and instability in deep learning", TMLR; DAL): with
  g = ∇L(θ) and H = ∇²L(θ), η_t = min(2 / (‖Hg‖/‖g‖)^p, dal_max_lr). ‖Hg‖/‖g‖ is
  the drift's curvature along the gradient (at most |λ|max), so p = 1 sets the step
  2/curvature that the principal flow says is stable along g; p trades stability
  against progress. The rule is read from the authors' released code
  (github.com/deepmind/discretisation_drift at e5c5623, principal_flow_instability_single_objective/
  dal.py, `DriftAdaptiveLearningRateScaler`): v = ‖Hg‖/‖g‖ (line 100), the gradient is
  multiplied by clip(1 / (static_lr · v^p / 2), 0, max_lr_scale / static_lr) (lines 97,
  107-108; `max_lr_scale=5`, line 61) and the optimiser then steps at `static_lr`, which
  "has no effect if DAL is used" (lines 43-45): the step is min(2/v^p, 5), an absolute
  cap, whatever `static_lr` is. `scaling_power` 0 leaves the gradient unscaled (lines
  92-94), plain SGD at `static_lr`: here p = 0 steps at `lr`. Hg takes one
  Hessian-vector product per step (forward over reverse, their `hvp`, lines 164-182), on
  the mini-batch for SGD, as here. Their `scaling_start`/`scaling_stop` window (default:
  every step) is not carried over.
- `corridor` (Dherin & Rosca, 2024, "Corridor geometry in gradient-based
  optimization"): the corridor learning rate, a Polyak step η_t = min(c·L/‖g‖², lr).
  L is the TD loss, whose lower bound 0 is reached by DQN's Huber loss but not by
  C51's cross-entropy (its minimum is the target distribution's entropy), so for C51
  the step is longer than Polyak's with the true minimum.
  optax's `scale_by_polyak` computes the same step but does not return it, and the
  probes and `train` records need η_t.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from eosrl.agents.config import OptimizerConfig


def drift_adjusted(grads: Any, hessian_grads: Any, power: float, max_lr: float) -> jax.Array:
    """min(2 / (‖Hg‖/‖g‖)^p, max_lr); `max_lr` where the gradient or its drift is 0."""
    drift = optax.global_norm(hessian_grads) / optax.global_norm(grads)
    step = 2.0 / jnp.power(drift, power)
    return jnp.where(jnp.isfinite(step) & (drift > 0), jnp.minimum(step, max_lr), max_lr)


def corridor(loss: jax.Array, grads: Any, scale: float, max_lr: float) -> jax.Array:
    """min(c·L / ‖g‖², max_lr); `max_lr` where the gradient is 0."""
    squared_norm = jnp.square(optax.global_norm(grads))
    step = scale * loss / squared_norm
    return jnp.where(squared_norm > 0, jnp.minimum(step, max_lr), max_lr)


def hessian_gradient_product(loss_of_params: Callable[[Any], jax.Array], params: Any, grads: Any) -> Any:
    """H g by forward-over-reverse differentiation: one Hessian-vector product."""
    return jax.jvp(jax.grad(loss_of_params), (params,), (grads,))[1]


def step_size(config: OptimizerConfig, loss_of_params: Callable[[Any], jax.Array], params: Any,
              loss: jax.Array, grads: Any) -> jax.Array:
    """η_t of the configured rule at `params` (`loss`, `grads`: the objective's there)."""
    if config.step_size_rule == "drift_adjusted":
        if config.dal_power == 0:  # the authors' plain SGD at static_lr (dal.py lines 92-94)
            return jnp.asarray(config.lr, jnp.float32)
        return drift_adjusted(grads, hessian_gradient_product(loss_of_params, params, grads),
                              config.dal_power, config.dal_max_lr)
    if config.step_size_rule == "corridor":
        return corridor(loss, grads, config.corridor_scale, config.lr)
    raise ValueError(f"agent.optimizer.step_size_rule: {config.step_size_rule!r} has no η_t")


def scale_by_step_size() -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by the `step_size` extra argument of `update` (η_t)."""

    def update_fn(updates, state, params=None, *, step_size: jax.Array, **extra_args):
        del params, extra_args
        return jax.tree_util.tree_map(lambda u: step_size * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)
