"""The operator a probe measures: the diagonal scaling D of the optimiser's next step
(θ ← θ − η D m), read from the optax state without building an optimiser, so that the
probes (agents/probes.py) measure D^½ H D^½, whose stability threshold is that of
agents/thresholds.py.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from eosrl.agents import spectral_norm
from eosrl.agents.config import AgentConfig, OptimizerConfig
from eosrl.agents.thresholds import is_adaptive


# ----------------------------------------------------------------------------
# The optimiser's diagonal preconditioner, read from its optax state.

_PRECONDITIONER_STATES = (optax.ScaleByAdamState, optax.ScaleByRStdDevState, optax.ScaleByRmsState)


def find_preconditioner_state(opt_state: Any) -> Any:
    """The first Adam / RMSProp moment state inside `opt_state`, wherever
    `optax.chain` (e.g. gradient clipping) nested it; None for SGD."""
    is_state = lambda node: isinstance(node, _PRECONDITIONER_STATES)
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state):
        if is_state(node):
            return node
    return None


def diagonal_preconditioner(opt_state: Any, opt: OptimizerConfig) -> Optional[Any]:
    """P as a params-shaped pytree, such that the optimiser's next step is
    θ ← θ − η P⁻¹ m (m the momentum / gradient); None for SGD.

    Adam (optax.scale_by_adam with eps_root = 0, as agents.optimizers builds it):
        P = (1 − β₁ᵗ)(√ν̂ₜ + ε),  ν̂ₜ = νₜ / (1 − β₂ᵗ)
    the (1 − β₁ᵗ) moves mu's bias correction into P, so that the update is
    η P⁻¹ μₜ. t is the state's count; before the first update (t = 0) ν = 0
    and there is no preconditioner yet, so t is taken as 1.
    RMSProp (optax.scale_by_rms, eps_in_sqrt=True by default, which is what
    agents.optimizers uses): P = √(ν + ε), ε inside the root; the centred
    variant (optax.scale_by_stddev) uses the variance: P = √(ν − μ² + ε).
    """
    state = find_preconditioner_state(opt_state)
    if state is None:
        return None
    eps = opt.eps
    if isinstance(state, optax.ScaleByAdamState):
        t = jnp.maximum(state.count, 1).astype(jnp.float32)
        mu_correction = 1.0 - jnp.power(opt.b1, t)
        nu_correction = 1.0 - jnp.power(opt.b2, t)
        return jax.tree_util.tree_map(
            lambda nu: mu_correction * (jnp.sqrt(nu / nu_correction) + eps), state.nu)
    if isinstance(state, optax.ScaleByRStdDevState):
        return jax.tree_util.tree_map(
            lambda mu, nu: jnp.sqrt(nu - jnp.square(mu) + eps), state.mu, state.nu)
    return jax.tree_util.tree_map(lambda nu: jnp.sqrt(nu + eps), state.nu)


# ----------------------------------------------------------------------------
# The operator the next update sees.


def step_scaling(opt_state: Any, net_state: Any, params: Any, agent: AgentConfig) -> Optional[jnp.ndarray]:
    """D^½ as a flat vector, where the next update is θ ← θ − η D m; None when D = 1."""
    scale = None
    precond = diagonal_preconditioner(opt_state, agent.optimizer)
    if precond is not None:
        scale = 1.0 / ravel_pytree(precond)[0]
    if agent.spectral_norm.scale_lr:
        ones = jax.tree_util.tree_map(jnp.ones_like, params)
        layer_scale = ravel_pytree(spectral_norm.scale_updates(ones, net_state))[0]
        scale = layer_scale if scale is None else scale * layer_scale
    return None if scale is None else jnp.sqrt(scale)


def operator_name(agent: AgentConfig) -> str:
    """How a record names the measured operator D^½ H D^½ (see the module docstring)."""
    parts = (["S"] if agent.spectral_norm.scale_lr else []) + (["P⁻¹"] if is_adaptive(agent.optimizer) else [])
    return " ".join(parts + ["H"])
