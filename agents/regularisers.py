"""Explicit curvature regularisers added to the TD loss (`agent.gradient_penalty`,
`agent.geometric_complexity_penalty`), and the geometric complexity that the probes
also report.

- Gradient-norm penalty λ‖∇_θ L‖²: implicit gradient regularisation (Barrett &
  Dherin, 2021) shows that gradient descent with step η follows the flow of
  L + (η/4)‖∇L‖², and its SGD form (Smith, Dherin, Barrett & De, 2021) adds the mean
  of the mini-batch squared gradient norms; with one batch per update both are the
  penalty on that batch. Here λ is set directly.
- Geometric complexity (Dherin, Munn, Rosca & Barrett, 2022): the mean over the
  batch of the squared Frobenius norm of the network's input Jacobian, the quantity
  those papers tie to implicit regularisation and flatness.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from eosrl.agents import networks


def gradient_norm_penalty(loss_of_params: Callable[[Any], jax.Array], params: Any) -> jax.Array:
    """‖∇_θ L(θ)‖², differentiable (its gradient is 2Hg: a second backward pass)."""
    return jnp.square(optax.global_norm(jax.grad(loss_of_params)(params)))


def geometric_complexity(q_of_inputs: Callable[[jnp.ndarray], jnp.ndarray],
                         inputs: jnp.ndarray) -> jnp.ndarray:
    """Mean over the batch of ‖∂q(x_b)/∂x_b‖²_F (Dherin et al., 2022).

    `q_of_inputs` maps a batch [B, ...] to [B, A] with no interaction between
    rows (true of these networks: no batch norm), so the gradient of
    Σ_b q[b, a] w.r.t. the whole batch holds every row's Jacobian row a.
    That costs A backward passes instead of B·A.
    """
    q, vjp = jax.vjp(q_of_inputs, inputs)
    num_rows, num_actions = q.shape

    def squared_norm_of_column(a):
        (g,) = vjp(jax.nn.one_hot(jnp.full((num_rows,), a), num_actions, dtype=q.dtype))
        return jnp.sum(jnp.square(g))

    return jnp.sum(jax.lax.map(squared_norm_of_column, jnp.arange(num_actions))) / num_rows


def network_inputs(obs: jnp.ndarray) -> jnp.ndarray:
    """The float input the network actually sees: uint8 frames scaled to [0, 1]
    (as `networks.make_network` does), so the Jacobian is w.r.t. that."""
    if obs.dtype == jnp.uint8:
        return obs.astype(jnp.float32) / 255.0
    return obs.astype(jnp.float32)


def q_network_complexity(network: networks.Network, params: Any, net_state: Any, obs: jnp.ndarray) -> jax.Array:
    """Geometric complexity of the Q-values (of a distributional head: their means) on a batch of observations."""
    def q_of_inputs(x):
        output, _ = network.apply(params, net_state, x, False)
        return network.agent_kind.q_values(output)
    return geometric_complexity(q_of_inputs, network_inputs(obs))
