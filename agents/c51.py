"""C51 (Bellemare et al., 2017) as an agent kind (agents/kinds.py): per action, logits of a
categorical distribution on `agent.num_atoms` fixed atoms from `agent.v_min` to
`agent.v_max`; the loss is the cross-entropy to the target distribution projected onto
the atoms, and the Q-values are the distributions' means.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import rlax

from eosrl.agents.config import AgentConfig


def td_loss(logits_tm1: jnp.ndarray, a_tm1: jnp.ndarray, r_t: jnp.ndarray, discount_t: jnp.ndarray,
            logits_t_target: jnp.ndarray, q_t_selector: jnp.ndarray, atoms: jnp.ndarray) -> jnp.ndarray:
    """Mean categorical (cross-entropy) loss; logits are [B, A, atoms]. The bootstrap action
    is the argmax of `q_t_selector` [B, A]: the target network's Q-values for C51, the
    online network's for double C51."""
    chex.assert_rank([logits_tm1, a_tm1, r_t, discount_t, logits_t_target, q_t_selector], [3, 1, 1, 1, 3, 2])
    chex.assert_equal_shape([logits_tm1, logits_t_target])
    chex.assert_equal_shape([logits_tm1[..., 0], q_t_selector])
    loss = jax.vmap(rlax.categorical_double_q_learning, in_axes=(None, 0, 0, 0, 0, None, 0, 0))(
        atoms, logits_tm1, a_tm1, r_t, discount_t, atoms, logits_t_target, q_t_selector)
    return jnp.mean(loss)


class C51(NamedTuple):
    """The C51 head ([A, atoms] logits per observation) and its loss."""
    atoms: jnp.ndarray  # [atoms], the support

    def head_shape(self, num_actions: int) -> Tuple[int, ...]:
        return (num_actions, self.atoms.shape[0])

    def q_values(self, output: jnp.ndarray) -> jnp.ndarray:
        return jnp.sum(jax.nn.softmax(output, axis=-1) * self.atoms, axis=-1)

    def loss(self, out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector) -> jnp.ndarray:
        return td_loss(out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector, self.atoms)

    def loss_diagnostics(self, out_tm1, a_tm1, r_t, discount_t, out_t_target, q_t_selector):
        return {}  # a cross-entropy has no linear region


def make(agent: AgentConfig) -> C51:
    return C51(jnp.linspace(agent.v_min, agent.v_max, agent.num_atoms))
