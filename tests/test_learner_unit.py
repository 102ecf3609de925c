"""Unit tests of the learner update against a hand-computed case, the target network,
double Q-learning, and the exploration schedules and policy.

The tiny network (2 inputs, 3 hidden units, 2 actions) is written out by hand here,
so the expected values do not go through the code under test.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from eosrl.agents import networks
from eosrl.agents.actor import EpsilonGreedy, linear_epsilon
from eosrl.agents.config import AgentConfig, OptimizerConfig
from eosrl.launch.config import load_config
from eosrl.agents.learner import Learner
from eosrl.agents.types import Transition

LR = 0.1
AGENT = AgentConfig(kind="dqn", network="mlp", hidden_sizes=[3],
                    optimizer=OptimizerConfig(name="sgd", lr=LR, momentum=0.0),
                    # The batch already holds n-step returns and γ^m: agent.discount must not
                    # enter the loss, so it is set to a value the batch does not use.
                    # δ = 10 is above every |TD error| of BATCH (< 5): the squared-loss regime.
                    discount=0.5, n_step=3, double_q=False, huber_delta=10.0,
                    target_update_period=2)
DOUBLE_AGENT = dataclasses.replace(AGENT, double_q=True)

ONLINE = {"dense_0": {"w": jnp.array([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0]]),
                      "b": jnp.array([0.1, 0.2, -0.1])},
          "head": {"w": jnp.array([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]]),
                   "b": jnp.array([0.0, 0.1])}}
TARGET = {"dense_0": {"w": jnp.array([[0.5, 1.0, -0.5], [1.0, -0.5, 0.5]]),
                      "b": jnp.array([0.0, -0.1, 0.2])},
          "head": {"w": jnp.array([[2.0, 0.5], [-1.0, 1.5], [0.5, -0.5]]),
                   "b": jnp.array([0.2, -0.2])}}
BATCH = Transition(
    obs=np.array([[1.0, 0.5], [-0.5, 1.0], [2.0, -1.0], [0.3, 0.3]], np.float32),
    action=np.array([0, 1, 1, 0], np.int32),
    reward=np.array([3.0, -2.0, 0.5, 1.0], np.float32),
    discount=np.array([0.81, 0.0, 0.729, 0.9], np.float32),  # γ^n, 0 after a terminal
    next_obs=np.array([[0.5, 1.5], [1.0, -1.0], [-1.0, 2.0], [1.5, 0.5]], np.float32))


def hand_q(p, obs):
    h = jax.nn.relu(obs @ p["dense_0"]["w"] + p["dense_0"]["b"])
    return h @ p["head"]["w"] + p["head"]["b"]


def hand_td(p, t, batch, double=False):
    q_sa = hand_q(p, batch.obs)[jnp.arange(len(batch.action)), batch.action]
    q_next = hand_q(t, batch.next_obs)
    if double:
        chosen = jnp.argmax(hand_q(p, batch.next_obs), axis=1)
        bootstrap = q_next[jnp.arange(len(chosen)), chosen]
    else:
        bootstrap = jnp.max(q_next, axis=1)
    return batch.reward + batch.discount * bootstrap - q_sa


def hand_loss(p, t, batch, double=False):
    """Squared TD loss (the Huber loss inside its quadratic region), mean over the batch."""
    return jnp.mean(0.5 * hand_td(p, t, batch, double) ** 2)


def assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.fixture(scope="module")
def network():
    return networks.make_network(AGENT, "gym", (2,), 2)


@pytest.fixture(scope="module")
def run(network):
    """A learner started from ONLINE / TARGET, and its state after each of 3 updates."""
    learner = Learner(network, AGENT, seed=0)
    learner.state = learner.state._replace(params=ONLINE, target_params=TARGET)
    states, metrics = [learner.state], []
    for _ in range(3):
        metrics.append(learner.update(BATCH))
        states.append(learner.state)
    return learner, states, metrics


def test_network_matches_the_hand_written_mlp(network):
    """Breaks if the MLP's layers, names or activation differ from the hand-written one."""
    out, _ = network.apply(ONLINE, {}, BATCH.obs, False)
    np.testing.assert_allclose(out, hand_q(ONLINE, BATCH.obs), rtol=1e-6)


def test_one_sgd_update_is_params_minus_lr_times_the_hand_gradient(run):
    """Breaks if the loss bootstraps from the online net, rescales the batch discount by
    agent.discount, uses Huber δ other than the config's, sums instead of averaging, or if
    the SGD step has the wrong sign or size."""
    _, states, metrics = run
    td = hand_td(ONLINE, TARGET, BATCH)
    assert 1.0 < float(jnp.max(jnp.abs(td))) < AGENT.huber_delta  # δ = 1 would clip it
    grads = jax.grad(hand_loss)(ONLINE, TARGET, BATCH)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
    expected = jax.tree_util.tree_map(lambda p, g: p - LR * g, ONLINE, grads)
    got = states[1].params
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        # rlax's Huber gradient is exact to about ulp(δ) = 1e-6 per example, not bitwise.
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics[0]["loss"], hand_loss(ONLINE, TARGET, BATCH), rtol=1e-6)
    assert int(states[1].step) == 1


def test_target_is_unchanged_until_the_period_and_copied_at_it(run):
    """Breaks if the target is copied every update, one update early or late, or never."""
    _, states, _ = run
    assert_trees_equal(states[1].target_params, TARGET)          # update 1 of period 2
    assert_trees_equal(states[2].target_params, states[2].params)  # update 2: copied
    assert_trees_equal(states[3].target_params, states[2].params)  # update 3: kept
    assert not np.array_equal(states[3].params["head"]["w"], states[2].params["head"]["w"])


@pytest.mark.parametrize("agent", [AGENT, DOUBLE_AGENT], ids=["dqn", "double_dqn"])
def test_loss_has_zero_gradient_with_respect_to_the_target_params(network, agent):
    """Breaks if the target network's output is not behind a stop_gradient, or if the
    online Q(s, a) is computed with the target parameters."""
    loss_fn = Learner(network, agent, seed=0).loss_fn
    grads = jax.grad(lambda t: loss_fn(ONLINE, t, {}, {}, BATCH, False)[0])(TARGET)
    for g in jax.tree_util.tree_leaves(grads):
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_double_q_bootstraps_from_the_target_at_the_online_argmax(network):
    """Breaks if double_q is ignored (max of the target), or the bootstrap action or value
    comes from the wrong network."""
    # Target = online with the head negated: the two argmax differ on every next_obs.
    target = {**ONLINE, "head": jax.tree_util.tree_map(lambda x: -x, ONLINE["head"])}
    online_argmax = jnp.argmax(hand_q(ONLINE, BATCH.next_obs), axis=1)
    target_argmax = jnp.argmax(hand_q(target, BATCH.next_obs), axis=1)
    assert bool(jnp.all(online_argmax != target_argmax))
    expected = hand_loss(ONLINE, target, BATCH, double=True)
    wrong = [hand_loss(ONLINE, target, BATCH, double=False),   # plain max of the target
             hand_loss(ONLINE, ONLINE, BATCH, double=False)]   # online value at its argmax
    for w in wrong:
        assert abs(float(w) - float(expected)) > 0.1
    loss_fn = Learner(network, DOUBLE_AGENT, seed=0).loss_fn
    loss, _ = loss_fn(ONLINE, target, {}, {}, BATCH, False)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    plain, _ = Learner(network, AGENT, seed=0).loss_fn(ONLINE, target, {}, {}, BATCH, False)
    np.testing.assert_allclose(plain, wrong[0], rtol=1e-6)


def test_huber_gradient_inside_the_quadratic_region_is_the_td_error_for_a_large_delta():
    """Breaks if the Huber loss loses gradient precision for a large δ, as rlax.huber_loss
    = 0.5·min(|x|,δ)² + δ·(|x| − min(|x|,δ)) does: its reverse pass forms (min(|x|,δ) − δ) + δ
    in float32, so at δ = 1e6 a TD error of 1e-3 got gradient 0 (ulp(1e6) = 0.0625)."""
    from eosrl.agents import dqn
    td = 1e-3

    def loss(q):
        return dqn.td_loss(q, jnp.array([0]), jnp.array([td], jnp.float32), jnp.array([0.0]),
                           jnp.zeros((1, 2)), jnp.zeros((1, 2)), 1e6)
    grad = jax.grad(loss)(jnp.zeros((1, 2)))
    np.testing.assert_allclose(grad[0, 0], -td, rtol=1e-4)


# ----------------------------------------------------------------------------
# Exploration.

def test_linear_epsilon_at_start_half_end_beyond_and_zero_decay():
    """Breaks if the schedule is not linear, does not stop at `end`, or divides by a zero decay."""
    eps = linear_epsilon(1.0, 0.1, 100)
    assert eps(0) == pytest.approx(1.0)
    assert eps(50) == pytest.approx(0.55)
    assert eps(100) == pytest.approx(0.1)
    assert eps(10_000) == pytest.approx(0.1)
    assert linear_epsilon(1.0, 0.1, 0)(0) == pytest.approx(0.1)
    assert linear_epsilon(1.0, 0.1, 0)(5) == pytest.approx(0.1)


def test_apex_actor_epsilons_follow_the_ape_x_formula():
    """Breaks if ε_i is not 0.4^(1 + 7 i/(N−1)) (exponent, spread or base), or varies with steps."""
    from eosrl.launch.builder import Builder  # actor i's ε (launch.roles.actor_epsilon before issue 13)

    def actor_epsilon(config, actor_id, num_actors):
        return Builder(config).epsilon(actor_id, num_actors)
    config = load_config(CONFIGS / "dqn_cartpole.yaml", ["distributed.actor_epsilon=apex"])
    n = 8
    values = [actor_epsilon(config, i, n)(0) for i in range(n)]
    assert values == pytest.approx([0.4 ** (1 + 7 * i / (n - 1)) for i in range(n)], rel=1e-12)
    assert values[0] == pytest.approx(0.4) and values[-1] == pytest.approx(0.4 ** 8)
    assert actor_epsilon(config, 3, n)(1_000_000) == values[3]
    assert actor_epsilon(config, 0, 1)(0) == pytest.approx(0.4)  # one actor: no division by 0
    schedule = actor_epsilon(load_config(CONFIGS / "dqn_cartpole.yaml"), 3, n)
    a = config.agent
    assert schedule(0) == pytest.approx(a.epsilon_start)
    assert schedule(a.epsilon_decay_steps) == pytest.approx(a.epsilon_end)


@pytest.fixture(scope="module")
def policy_setup():
    agent = AgentConfig(kind="dqn", network="mlp", hidden_sizes=[8])
    network = networks.make_network(agent, "gym", (2,), 4)
    params, net_state = network.init(jax.random.PRNGKey(3))
    return network, params, net_state


def test_epsilon_zero_always_takes_the_greedy_action(policy_setup):
    """Breaks if the policy explores at ε = 0, takes argmin, or mixes up the rows of a batch."""
    network, params, net_state = policy_setup
    obs = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    actions = EpsilonGreedy(network, range(256))(params, net_state, list(obs), [0.0] * 256)
    greedy = np.argmax(network.apply(params, net_state, obs, False)[0], axis=1)
    assert len(set(greedy.tolist())) > 1  # the check would be weak with one greedy action
    assert actions == greedy.tolist()


def test_epsilon_one_is_uniform_over_actions_and_calls_no_network(policy_setup):
    """Breaks if ε = 1 still takes the greedy action, the random action misses some actions,
    or a step on which every env explores calls the network (params None would fail there)."""
    network, _, _ = policy_setup
    n, envs = 4000, 8
    policy = EpsilonGreedy(network, range(envs))
    obs = [np.array([0.5, -0.5], np.float32)] * envs
    actions = [a for _ in range(n // envs) for a in policy(None, None, obs, [1.0] * envs)]
    freq = np.bincount(np.asarray(actions), minlength=4) / n
    np.testing.assert_allclose(freq, 0.25, atol=0.04)  # σ ≈ 0.007 per action


def test_each_env_explores_with_its_own_epsilon_and_seed(policy_setup):
    """Breaks if an env's ε is not its own (env 0 never explores, env 1 explores at 0.5), if
    its draws depend on the other envs, or if a partial step draws for the envs it leaves out."""
    network, params, net_state = policy_setup
    obs = np.array([0.5, -0.5], np.float32)
    greedy = int(np.argmax(network.apply(params, net_state, obs[None], False)[0][0]))
    pair, single = EpsilonGreedy(network, [7, 8]), EpsilonGreedy(network, [8])
    steps = [pair(params, net_state, [obs, obs], [0.0, 0.5]) for _ in range(1000)]
    assert all(a == greedy for a, _ in steps)
    explored = np.mean([b != greedy for _, b in steps])
    assert explored == pytest.approx(0.5 * 3 / 4, abs=0.05)  # a random action is greedy 1 in 4
    assert [b for _, b in steps] == [single(params, net_state, [obs], [0.5])[0] for _ in range(1000)]
    pair(params, net_state, [obs], [1.0])  # env 0 only: env 1's generator must not move
    assert [pair(params, net_state, [obs, obs], [0.0, 0.5])[1] for _ in range(50)] == \
        [single(params, net_state, [obs], [0.5])[0] for _ in range(50)]
