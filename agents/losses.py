"""TD losses of DQN and C51 as small pure functions over a batch.

Both are means over the batch, so their Hessians (and sharpness) are on the
same scale. `discount_t` already holds γ^m·(1 − terminal) for an m-step
return, as written by the replay adder.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import rlax


def dqn_loss(q_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray,
             discount_t: jnp.ndarray, q_t_target: jnp.ndarray,
             q_t_selector: jnp.ndarray | None, huber_delta: float) -> jnp.ndarray:
    """Mean Huber TD loss; double Q-learning when `q_t_selector` (online Q at t) is given."""
    chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, q_t_target], [2, 1, 1, 1, 2])
    chex.assert_equal_shape([q_tm1, q_t_target])
    if q_t_selector is None:
        td = jnp.asarray(jax.vmap(rlax.q_learning)(q_tm1, a_tm1, r_t, discount_t, q_t_target))
    else:
        td = jnp.asarray(jax.vmap(rlax.double_q_learning)(q_tm1, a_tm1, r_t, discount_t, q_t_target,
                                                          q_t_selector))
    return jnp.mean(rlax.huber_loss(td, huber_delta))


def c51_loss(logits_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray,
             discount_t: jnp.ndarray, logits_t_target: jnp.ndarray,
             q_t_selector: jnp.ndarray, atoms: jnp.ndarray) -> jnp.ndarray:
    """Mean categorical (cross-entropy) loss of C51 (Bellemare et al., 2017).

    `q_t_selector` picks the bootstrap action: the target network's Q-values
    for plain C51, the online network's for double C51.
    """
    chex.assert_rank([logits_tm1, a_tm1, r_t, discount_t, logits_t_target], [3, 1, 1, 1, 3])
    chex.assert_equal_shape([logits_tm1, logits_t_target])
    loss = jax.vmap(rlax.categorical_double_q_learning, in_axes=(None, 0, 0, 0, 0, None, 0, 0))(
        atoms, logits_tm1, a_tm1, r_t, discount_t, atoms, logits_t_target, q_t_selector)
    return jnp.mean(loss)
