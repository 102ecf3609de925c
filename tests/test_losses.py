"""The TD losses of the agent kinds against values computed by hand."""
import jax.numpy as jnp
import numpy as np
import pytest

from eosrl.agents.c51 import td_loss as c51_loss
from eosrl.agents.dqn import td_loss as dqn_loss
from eosrl.agents.qrdqn import td_loss as qrdqn_loss


def test_dqn_huber_loss_by_hand():
    q_tm1 = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    a_tm1 = jnp.array([1, 0])
    r_t = jnp.array([1.0, -2.0])
    discount_t = jnp.array([0.9, 0.0])
    q_t = jnp.array([[3.0, 1.0], [10.0, 10.0]])
    # Row 0: target 1 + 0.9*3 = 3.7, td = 3.7 - 2 = 1.7 -> Huber(δ=1) = 1.7 - 0.5 = 1.2
    # Row 1: target -2 + 0 = -2, td = -2 - 0.5 = -2.5 -> 2.5 - 0.5 = 2.0
    loss = dqn_loss(q_tm1, a_tm1, r_t, discount_t, q_t, q_t, huber_delta=1.0)  # selector = target: Q-learning
    assert float(loss) == pytest.approx((1.2 + 2.0) / 2, rel=1e-6)
    # Inside δ the loss is quadratic: δ=10 gives 0.5*td^2.
    loss = dqn_loss(q_tm1, a_tm1, r_t, discount_t, q_t, q_t, huber_delta=10.0)
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


def test_qrdqn_quantile_huber_loss_by_hand():
    tau = jnp.array([0.25, 0.75])
    # [B, A, N]: row 0 took action 0 (quantiles 0, 1), row 1 action 1 (quantiles 2, 4).
    dist_tm1 = jnp.array([[[0.0, 1.0], [9.0, 9.0]], [[7.0, 7.0], [2.0, 4.0]]])
    # Row 0: the target network prefers action 0 (mean 5), the selector picks action 1: the
    # bootstrap is action 1's quantiles (1, 3). Row 1 is terminal.
    dist_t = jnp.array([[[5.0, 5.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    selector = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    # Row 0: target 0.5 + 0.5·(1, 3) = (1, 2). u_ij = T_j − θ_i ≥ 0, weight τ_i; Huber(κ=1):
    # H(0) = 0, H(1) = 0.5, H(2) = 2 − 0.5 = 1.5. θ=0 (τ=¼): ¼·(0.5 + 1.5)/2 = 0.25;
    # θ=1 (τ=¾): ¾·(0 + 0.5)/2 = 0.1875. Sum over i: 0.4375.
    # Row 1: target (1, 1). θ=2 (τ=¼): u = −1 < 0, weight ¾: ¾·0.5 = 0.375;
    # θ=4 (τ=¾): u = −3, weight ¼: ¼·2.5 = 0.625. Sum: 1.0.
    loss = qrdqn_loss(dist_tm1, jnp.array([0, 1]), jnp.array([0.5, 1.0]), jnp.array([0.5, 0.0]), dist_t,
                      selector, tau)
    assert float(loss) == pytest.approx((0.4375 + 1.0) / 2, rel=1e-6)


def jax_softmax(x):
    import jax
    return jax.nn.softmax(x, axis=-1)
