"""QR-DQN (Dabney et al., 2018, "Distributional Reinforcement Learning with Quantile
Regression") as an agent kind (agents/kinds.py): per action, `agent.num_quantiles` values
at the quantile midpoints τ̂_i = (2i − 1)/(2N), learnt with the quantile Huber loss of
κ = 1; the Q-values are the quantiles' means.

It is the edge-of-stability study's control: a Huber loss (as DQN's) on a distributional
head (as C51's). The loss is the paper's, a sum over the N online quantiles of the mean
over the N target ones (rlax's), so its scale, and the Hessian's, grows with N: compare
its sharpness with DQN's against each agent's own threshold, not in absolute value.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import rlax

from eosrl.agents.config import AgentConfig

KAPPA = 1.0  # κ of the quantile Huber loss, the paper's


def td_loss(dist_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray, discount_t: jnp.ndarray,
            dist_t_target: jnp.ndarray, q_t_selector: jnp.ndarray, tau: jnp.ndarray) -> jnp.ndarray:
    """Mean over the batch of the quantile Huber loss; quantiles are [B, A, N], `tau` [N]. The
    bootstrap action is the argmax of `q_t_selector` [B, A]: the target network's Q-values
    for QR-DQN, the online network's for double QR-DQN."""
    chex.assert_rank([dist_tm1, a_tm1, r_t, discount_t, dist_t_target, q_t_selector, tau],
                     [3, 1, 1, 1, 3, 2, 1])
    chex.assert_equal_shape([dist_tm1, dist_t_target])
    chex.assert_equal_shape([dist_tm1[..., 0], q_t_selector])
    chex.assert_equal_shape([dist_tm1[0, 0], tau])

    def one(dist_tm1, a_tm1, r_t, discount_t, dist_t, q_t_selector):
        # rlax takes [N, A] distributions and bootstraps from the argmax of its selector's mean
        # over quantiles: a one-row selector holding the Q-values the learner chose picks the
        # same action as DQN and C51 do with them.
        return rlax.quantile_q_learning(dist_tm1.T, tau, a_tm1, r_t, discount_t, q_t_selector[None, :],
                                        dist_t.T, huber_param=KAPPA)

    return jnp.mean(jax.vmap(one)(dist_tm1, a_tm1, r_t, discount_t, dist_t_target, q_t_selector))


def pairwise_errors(dist_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray, discount_t: jnp.ndarray,
                    dist_t_target: jnp.ndarray, q_t_selector: jnp.ndarray) -> jnp.ndarray:
    """The errors u_ij = (r + γ θ'_j) − θ_i [B, N, N] (i online, j target quantile) whose
    quantile Huber loss `td_loss` takes, as rlax.quantile_q_learning forms them: the
    target quantiles are those of the selector's argmax action."""
    def one(dist_tm1, a_tm1, r_t, discount_t, dist_t, q_t_selector):
        target = r_t + discount_t * dist_t[jnp.argmax(q_t_selector)]  # [N]
        return target[None, :] - dist_tm1[a_tm1][:, None]

    return jax.vmap(one)(dist_tm1, a_tm1, r_t, discount_t, dist_t_target, q_t_selector)


class QrDqn(NamedTuple):
    """The QR-DQN head ([A, N] quantiles per observation) and its loss."""
    tau: jnp.ndarray  # [N], the quantile midpoints

    def head_shape(self, num_actions: int) -> Tuple[int, ...]:
        return (num_actions, self.tau.shape[0])

    def q_values(self, output: jnp.ndarray) -> jnp.ndarray:
        return jnp.mean(output, axis=-1)

    def loss(self, out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector) -> jnp.ndarray:
        return td_loss(out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector, self.tau)

    def loss_diagnostics(self, out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector):
        u = pairwise_errors(out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector)
        return {"huber_fraction": jnp.mean((jnp.abs(u) > KAPPA).astype(jnp.float32))}


def make(agent: AgentConfig) -> QrDqn:
    n = agent.num_quantiles
    return QrDqn((2 * jnp.arange(n, dtype=jnp.float32) + 1) / (2 * n))
