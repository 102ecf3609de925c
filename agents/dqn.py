"""DQN (Mnih et al., 2015) as an agent kind (agents/kinds.py): one Q-value per action and
the Huber TD loss of `agent.huber_delta`; double DQN (van Hasselt et al., 2016) when the
learner passes the online network's Q-values as the selector (`agent.double_q`).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import rlax

from eosrl.agents.config import AgentConfig


def huber_loss(x: jnp.ndarray, delta: float) -> jnp.ndarray:
    """0.5·x² for |x| ≤ δ, δ·(|x| − 0.5·δ) beyond, elementwise. Written as a `jnp.where`, so the
    gradient inside is x itself: rlax.huber_loss (0.5·min(|x|,δ)² + δ·(|x| − min(|x|,δ))) forms
    (min(|x|,δ) − δ) + δ in its reverse pass, which rounds the gradient to multiples of ulp(δ)
    in float32 (at δ = 100, configs/dqn_cartpole.yaml, by up to ~4e-6 per example)."""
    abs_x = jnp.abs(x)
    return jnp.where(abs_x <= delta, 0.5 * jnp.square(x), delta * (abs_x - 0.5 * delta))


def td_loss(q_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray, discount_t: jnp.ndarray,
            q_t_target: jnp.ndarray, q_t_selector: jnp.ndarray, huber_delta: float) -> jnp.ndarray:
    """Mean Huber TD loss; the bootstrap action is the argmax of `q_t_selector` [B, A]
    (the target Q-values: Q-learning; the online ones: double Q-learning)."""
    chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, q_t_target, q_t_selector], [2, 1, 1, 1, 2, 2])
    chex.assert_equal_shape([q_tm1, q_t_target, q_t_selector])
    td = td_errors(q_tm1, a_tm1, r_t, discount_t, q_t_target, q_t_selector)
    return jnp.mean(huber_loss(td, huber_delta))


def td_errors(q_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray, discount_t: jnp.ndarray,
              q_t_target: jnp.ndarray, q_t_selector: jnp.ndarray) -> jnp.ndarray:
    """The TD errors [B] whose Huber loss `td_loss` averages."""
    return jnp.asarray(jax.vmap(rlax.double_q_learning)(q_tm1, a_tm1, r_t, discount_t, q_t_target, q_t_selector))


class Dqn(NamedTuple):
    """The DQN head ([A] Q-values per observation) and its loss."""
    huber_delta: float

    def head_shape(self, num_actions: int) -> Tuple[int, ...]:
        return (num_actions,)

    def q_values(self, output: jnp.ndarray) -> jnp.ndarray:
        return output

    def loss(self, out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector) -> jnp.ndarray:
        return td_loss(out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector, self.huber_delta)

    def loss_diagnostics(self, out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector):
        td = td_errors(out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector)
        return {"huber_fraction": jnp.mean((jnp.abs(td) > self.huber_delta).astype(jnp.float32))}


def make(agent: AgentConfig) -> Dqn:
    return Dqn(agent.huber_delta)
