"""The DQN and C51 losses against values computed by hand."""
import jax.numpy as jnp
import numpy as np
import pytest

from eosrl.agents.losses import c51_loss, dqn_loss


def test_dqn_huber_loss_by_hand():
    q_tm1 = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    a_tm1 = jnp.array([1, 0])
    r_t = jnp.array([1.0, -2.0])
    discount_t = jnp.array([0.9, 0.0])
    q_t = jnp.array([[3.0, 1.0], [10.0, 10.0]])
    # Row 0: target 1 + 0.9*3 = 3.7, td = 3.7 - 2 = 1.7 -> Huber(δ=1) = 1.7 - 0.5 = 1.2
    # Row 1: target -2 + 0 = -2, td = -2 - 0.5 = -2.5 -> 2.5 - 0.5 = 2.0
    loss = dqn_loss(q_tm1, a_tm1, r_t, discount_t, q_t, None, huber_delta=1.0)
    assert float(loss) == pytest.approx((1.2 + 2.0) / 2, rel=1e-6)
    # Inside δ the loss is quadratic: δ=10 gives 0.5*td^2.
    loss = dqn_loss(q_tm1, a_tm1, r_t, discount_t, q_t, None, huber_delta=10.0)
    assert float(loss) == pytest.approx((0.5 * 1.7**2 + 0.5 * 2.5**2) / 2, rel=1e-6)


def test_double_dqn_uses_online_selector():
    q_tm1 = jnp.array([[0.0, 0.0]])
    q_t_target = jnp.array([[5.0, 1.0]])
    q_t_online = jnp.array([[0.0, 3.0]])  # picks action 1, valued 1.0 by the target net
    loss = dqn_loss(q_tm1, jnp.array([0]), jnp.array([0.0]), jnp.array([1.0]), q_t_target,
                    q_t_online, huber_delta=100.0)
    assert float(loss) == pytest.approx(0.5 * 1.0**2, rel=1e-6)


def test_c51_loss_by_hand():
    atoms = jnp.array([0.0, 1.0, 2.0])
    # Online distribution for the taken action: uniform (logits all zero).
    logits_tm1 = jnp.zeros((1, 2, 3))
    # Target net: action 0 puts all mass on atom 1, action 1 on atom 0 -> greedy is action 0.
    big = 50.0
    logits_t = jnp.array([[[-big, big, -big], [big, -big, -big]]])
    # r = 0.5, γ = 1: mass moves to 1.5, projected half on atom 1, half on atom 2.
    loss = c51_loss(logits_tm1, jnp.array([0]), jnp.array([0.5]), jnp.array([1.0]), logits_t,
                    jnp.sum(jax_softmax(logits_t) * atoms, -1), atoms)
    expected = -(0.5 * np.log(1 / 3) + 0.5 * np.log(1 / 3))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # A terminal (discount 0) puts the target at r = 0.5 -> half on atoms 0 and 1.
    logits_tm1 = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
    loss = c51_loss(logits_tm1, jnp.array([0]), jnp.array([0.5]), jnp.array([0.0]), logits_t,
                    jnp.sum(jax_softmax(logits_t) * atoms, -1), atoms)
    assert float(loss) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)), rel=1e-5)


def jax_softmax(x):
    import jax
    return jax.nn.softmax(x, axis=-1)
