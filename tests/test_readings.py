"""Tests of the probe readings beside λ₁ (agents/readings.py, `Prober._add_readings`)
against dense or analytic references on tiny networks: the loss and the fraction of TD
errors beyond Huber's δ, λ₁ of the Gauss–Newton matrix, per-layer λ₁, λ₁ of a penalised
objective and λ₁ of the mean loss over a dataset. Float32, as in training."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from eosrl.agents import kinds, networks, probes, readings
from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
from eosrl.agents.learner import Learner, Transition

OBS_SHAPE = (4,)
NUM_ACTIONS = 3
BATCH = 64
ITERATIONS = 60
TOLERANCE = 1e-4
REL = 1e-3


def make_batch(seed: int, size: int = BATCH) -> Transition:
    rng = np.random.default_rng(seed)
    return Transition(
        obs=rng.normal(size=(size,) + OBS_SHAPE).astype(np.float32),
        action=rng.integers(0, NUM_ACTIONS, size).astype(np.int32),
        reward=(3.0 * rng.normal(size=size)).astype(np.float32),  # some TD errors beyond δ = 1
        discount=(0.99 * (rng.random(size) > 0.1)).astype(np.float32),
        next_obs=rng.normal(size=(size,) + OBS_SHAPE).astype(np.float32))


def make_learner(kind: str, hidden=(8, 8), **agent_fields) -> Learner:
    """A small learner, never updated (no update to compile): its target network is 0.8 times
    the online one, so the TD errors are those of a moved target."""
    agent = AgentConfig(kind=kind, hidden_sizes=list(hidden), num_atoms=11, v_min=-5.0, v_max=5.0,
                        num_quantiles=5, optimizer=OptimizerConfig(name="sgd", lr=0.01), **agent_fields)
    learner = Learner(networks.make_network(agent, "gym", OBS_SHAPE, NUM_ACTIONS), agent, seed=0)
    return moved_target(learner)


def moved_target(learner: Learner) -> Learner:
    s = learner.state
    learner.state = s._replace(target_params=jax.tree_util.tree_map(lambda w: 0.8 * w, s.params))
    return learner


def make_prober(learner: Learner, **config) -> probes.Prober:
    config = ProbeConfig(enabled=True, every=1, num_eigs=2, iterations=ITERATIONS, tolerance=TOLERANCE,
                         **config)
    return probes.Prober(config, learner.agent, learner.loss_fn, learner.network,
                         objective_fn=learner.objective_fn)


def probe_now(prober, learner, batch, **kw) -> dict:
    return prober.probe(prober.snapshot(learner.state, learner.current_lr(), 0), batch, **kw)


def flat_loss(learner: Learner, batch, fn=None):
    s = learner.state
    flat, unravel = ravel_pytree(s.params)
    fn = fn or learner.loss_fn
    return (lambda x: fn(unravel(x), s.target_params, s.net_state, s.target_net_state, batch, False)[0]), flat


def dense_hessian(loss, flat) -> np.ndarray:
    return np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)


def dense_of(matvec, dim: int) -> np.ndarray:
    """The matrix of a matvec, column by column."""
    return np.asarray(jax.jit(jax.vmap(matvec))(jnp.eye(dim)), np.float64).T


def dense_top(matrix) -> float:
    m = np.asarray(matrix, np.float64)
    return float(np.linalg.eigvalsh(0.5 * (m + m.T))[-1])


def assert_rel(actual, expected, rel=REL):
    assert abs(actual - expected) <= rel * abs(expected), (actual, expected)


def parts(learner: Learner, batch):
    s = learner.state
    return readings.td_loss_parts(learner.network, learner.agent, s.params, s.target_params, s.net_state,
                                  s.target_net_state, batch)


class Case:
    """One DQN learner with a gradient penalty and one prober with every batch reading on: a
    full probe and a λ₁-only one, shared by the tests (each compile happens once)."""

    def __init__(self):
        self.learner, self.batch = make_learner("dqn", gradient_penalty=0.5), make_batch(1)
        self.prober = make_prober(self.learner, gauss_newton_every=1, layer_every=1)
        self.full = probe_now(self.prober, self.learner, self.batch)
        self.partial = probe_now(self.prober, self.learner, self.batch, full=False)
        self.loss, self.flat = flat_loss(self.learner, self.batch)
        self.hessian = dense_hessian(self.loss, self.flat)


@functools.lru_cache(maxsize=None)
def get_case() -> Case:
    return Case()


# ----------------------------------------------------------------------------
# The loss, and the fraction of TD errors beyond Huber's δ.


def test_huber_fraction_on_a_hand_made_batch():
    # DQN, δ = 1: with discount 0 the TD error is r − Q(s, a) = r here.
    dqn = kinds.make(AgentConfig(kind="dqn", huber_delta=1.0))
    q = jnp.zeros((4, 2))
    a = jnp.zeros(4, jnp.int32)
    r = jnp.array([0.5, 2.0, -3.0, 0.9])
    d = jnp.zeros(4)
    assert float(dqn.loss_diagnostics(q, a, r, d, q, q)["huber_fraction"]) == pytest.approx(0.5)
    # QR-DQN, κ = 1: the targets are all r = 1.5 and the online quantiles of action 0 are
    # θ = (0, 1, 2, 2.4), so u_ij = 1.5 − θ_i = (1.5, 0.5, −0.5, −0.9): one row in four beyond κ.
    qr = kinds.make(AgentConfig(kind="qrdqn", num_quantiles=4))
    dist = jnp.zeros((1, 2, 4)).at[0, 0].set(jnp.array([0.0, 1.0, 2.0, 2.4]))
    out = qr.loss_diagnostics(dist, jnp.zeros(1, jnp.int32), jnp.array([1.5]), jnp.zeros(1), dist,
                              jnp.zeros((1, 2)))
    assert float(out["huber_fraction"]) == pytest.approx(0.25)
    # C51's cross-entropy has no linear region: nothing.
    c51 = kinds.make(AgentConfig(kind="c51", num_atoms=5))
    logits = jnp.zeros((4, 2, 5))
    assert c51.loss_diagnostics(logits, a, r, d, logits, q) == {}


@pytest.mark.parametrize("kind, double_q", [("dqn", False), ("dqn", True), ("c51", False), ("qrdqn", True)])
def test_td_loss_parts_rebuild_the_loss(kind, double_q):
    """ℓ(f(θ)) of `readings.td_loss_parts` is the learner's TD loss (what the Gauss–Newton
    matrix and the diagnostics are made of)."""
    learner, batch = make_learner(kind, double_q=double_q), make_batch(1)
    outputs, targets = parts(learner, batch)
    loss, flat = flat_loss(learner, batch)
    rebuilt = learner.network.agent_kind.loss(outputs(learner.state.params), *targets)
    assert float(rebuilt) == pytest.approx(float(loss(flat)), rel=1e-6)


def test_every_probe_records_the_loss_and_huber_fraction():
    case = get_case()
    s, batch = case.learner.state, case.batch
    q_tm1 = np.asarray(case.learner.network.apply(s.params, s.net_state, batch.obs, False)[0], np.float64)
    q_t = np.asarray(case.learner.network.apply(s.target_params, s.target_net_state, batch.next_obs, False)[0])
    td = batch.reward + batch.discount * q_t.max(axis=1) - q_tm1[np.arange(BATCH), batch.action]
    fraction = float(np.mean(np.abs(td) > 1.0))  # δ = 1
    assert 0.1 < fraction < 0.9  # errors on both sides of δ
    for record in (case.full, case.partial):
        assert record["loss"] == pytest.approx(float(case.loss(case.flat)), rel=1e-6)
        assert record["huber_fraction"] == pytest.approx(fraction)


def test_c51_and_qrdqn_loss_readings():
    batch = make_batch(1)
    for kind in ("c51", "qrdqn"):
        learner = make_learner(kind)
        prober = make_prober(learner)
        snap = prober.snapshot(learner.state, 0.01, 0)
        out = jax.device_get(prober._loss_readings(snap, batch))
        loss, flat = flat_loss(learner, batch)
        assert float(out["loss"]) == pytest.approx(float(loss(flat)), rel=1e-6)
        if kind == "c51":
            assert set(out) == {"loss"}
            continue
        s = learner.state
        dist_tm1 = np.asarray(learner.network.apply(s.params, s.net_state, batch.obs, False)[0])   # [B, A, N]
        dist_t = np.asarray(learner.network.apply(s.target_params, s.net_state, batch.next_obs, False)[0])
        a_t = dist_t.mean(axis=2).argmax(axis=1)
        target = batch.reward[:, None] + batch.discount[:, None] * dist_t[np.arange(BATCH), a_t]  # [B, N]
        u = target[:, None, :] - dist_tm1[np.arange(BATCH), batch.action][:, :, None]               # [B, N, N]
        assert float(out["huber_fraction"]) == pytest.approx(float(np.mean(np.abs(u) > 1.0)))


# ----------------------------------------------------------------------------
# Gauss–Newton.


def dense_gauss_newton(learner: Learner, batch) -> np.ndarray:
    """Jᵀ ∇²ℓ J from the dense Jacobian of the outputs and Hessian of ℓ in output space."""
    flat, unravel = ravel_pytree(learner.state.params)
    outputs, targets = parts(learner, batch)
    shape = outputs(learner.state.params).shape
    f = lambda x: outputs(unravel(x)).reshape(-1)  # noqa: E731
    loss_of_out = lambda o: learner.network.agent_kind.loss(o.reshape(shape), *targets)  # noqa: E731
    jac = np.asarray(jax.jit(jax.jacfwd(f))(flat), np.float64)               # [outputs, params]
    h_out = np.asarray(jax.jit(jax.hessian(loss_of_out))(f(flat)), np.float64)  # [outputs, outputs]
    return jac.T @ h_out @ jac


def test_gauss_newton_sharpness_matches_dense():
    case = get_case()
    gn = dense_gauss_newton(case.learner, case.batch)
    assert_rel(case.full["gauss_newton_sharpness"], dense_top(gn))
    assert case.full["gauss_newton_converged"] is True
    assert case.full["gauss_newton_residual"] < REL * dense_top(gn)
    assert np.linalg.eigvalsh(0.5 * (gn + gn.T))[0] > -1e-4 * dense_top(gn)  # PSD: Huber is convex
    assert abs(dense_top(gn) - dense_top(case.hessian)) > 1e-3 * dense_top(gn)  # and G is not H here


def test_gauss_newton_matvec_is_the_dense_product_for_c51():
    """C51's cross-entropy couples the atoms of an output: the whole matrix, not just λ₁."""
    learner, batch = make_learner("c51", hidden=(6,)), make_batch(1, 16)
    flat, unravel = ravel_pytree(learner.state.params)
    outputs, targets = parts(learner, batch)
    matvec = readings.gauss_newton_matvec(lambda x: outputs(unravel(x)),
                                          lambda out: learner.network.agent_kind.loss(out, *targets), flat)
    expected = dense_gauss_newton(learner, batch)
    np.testing.assert_allclose(dense_of(matvec, flat.shape[0]), expected, rtol=1e-3,
                               atol=1e-5 * np.abs(expected).max())


def test_gauss_newton_equals_hessian_for_a_linear_model_and_quadratic_loss():
    """f linear in θ and ℓ quadratic in f: H = JᵀAJ = G exactly."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
    a = rng.normal(size=(20, 20))
    a = jnp.asarray(a @ a.T / 20, jnp.float32)
    y = jnp.asarray(rng.normal(size=20), jnp.float32)
    f = lambda theta: x @ theta  # noqa: E731
    loss_of_out = lambda out: 0.5 * (out - y) @ a @ (out - y)  # noqa: E731
    theta = jnp.asarray(rng.normal(size=6), jnp.float32)
    g = dense_of(readings.gauss_newton_matvec(f, loss_of_out, theta), 6)
    h = dense_hessian(lambda t: loss_of_out(f(t)), theta)
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Per-layer blocks.


def test_layer_sharpness_matches_the_dense_blocks():
    case = get_case()
    params, h = case.learner.state.params, case.hessian
    offset, expected = 0, {}
    for name in sorted(params):  # ravel_pytree's order
        size = ravel_pytree(params[name])[0].shape[0]
        expected[name] = dense_top(h[offset:offset + size, offset:offset + size])
        offset += size
    assert offset == h.shape[0]
    record = case.full
    assert set(record["layer_sharpness"]) == set(expected) == {"dense_0", "dense_1", "head"}
    for name, value in expected.items():
        assert_rel(record["layer_sharpness"][name], value)
    assert record["layer_converged"] is True
    assert max(expected.values()) <= dense_top(h) * (1 + 1e-6)  # a block's λ₁ is at most H's


# ----------------------------------------------------------------------------
# The penalised objective.


def test_objective_sharpness_matches_dense():
    case = get_case()
    objective, flat = flat_loss(case.learner, case.batch, case.learner.objective_fn)
    expected = dense_top(dense_hessian(objective, flat))
    assert_rel(case.full["objective_sharpness"], expected)
    assert case.full["objective_converged"] is True
    assert abs(expected - dense_top(case.hessian)) > 1e-2 * expected  # the penalty changes the curvature
    assert case.full["sharpness"] == pytest.approx(dense_top(case.hessian), rel=REL)  # λ₁ stays the TD loss's
    assert "objective_sharpness" not in case.partial  # full probes only
    plain = make_learner("dqn")
    assert make_prober(plain).objective_fn is None  # no penalty: no objective reading


# ----------------------------------------------------------------------------
# The loss over a dataset.


def tiny_dataset(count: int, seed: int = 0):
    """A `DeviceDataset` of `count` items of random CartPole transitions, and a learner for it."""
    from conftest import CONFIGS, random_items
    from eosrl.agents import offline
    from eosrl.launch.builder import Builder
    from eosrl.launch.config import load_config
    config = load_config(CONFIGS / "dqn_cartpole.yaml", ["agent.hidden_sizes=[8, 8]", "agent.optimizer.name=sgd",
                                                         "agent.optimizer.lr=0.01"])
    builder = Builder(config)
    rows = np.asarray(random_items(builder, count, np.random.default_rng(seed))["rows"])  # [count, window, bytes]
    window = rows.shape[1]
    data = offline.DeviceDataset(jnp.asarray(rows.reshape(count * window, -1)),
                                 jnp.arange(count, dtype=jnp.int32) * window, builder.layout)
    return data, moved_target(builder.make_learner())


def test_dataset_hvp_is_the_hessian_of_the_mean_loss():
    """All 101 transitions in chunks of 32 (3 full chunks and one of 5), against the dense
    Hessian of one batch of all of them."""
    data, learner = tiny_dataset(101)
    s = learner.state
    flat, unravel = ravel_pytree(s.params)

    def loss_on(x, batch):
        return learner.loss_fn(unravel(x), s.target_params, s.net_state, s.target_net_state, batch, False)[0]
    matvec = readings.dataset_hvp(loss_on, flat, data, jnp.arange(101), 32)
    expected = dense_hessian(lambda x: loss_on(x, readings.gather_batch(data, jnp.arange(101))), flat)
    np.testing.assert_allclose(dense_of(matvec, flat.shape[0]), expected, rtol=1e-3,
                               atol=1e-5 * np.abs(expected).max())


def test_dataset_sharpness_matches_dense():
    data, learner = tiny_dataset(101)
    config = ProbeConfig(enabled=True, every=1, num_eigs=1, iterations=ITERATIONS, tolerance=TOLERANCE,
                         batch_size=16, dataset_every=1, dataset_transitions=40)
    prober = probes.Prober(config, learner.agent, learner.loss_fn, learner.network, seed=7)
    batch = readings.gather_batch(data, jnp.arange(16))
    record = probe_now(prober, learner, batch, dataset=data, full=False)
    index = readings.dataset_index(101, 40, 7)
    assert record["dataset_transitions"] == len(index) == 40
    loss, flat = flat_loss(learner, readings.gather_batch(data, jnp.asarray(index)))
    assert_rel(record["dataset_sharpness"], dense_top(dense_hessian(loss, flat)))
    assert record["dataset_converged"] is True and record["dataset_hvps"] > 0
    again = probe_now(prober, learner, batch, dataset=data, full=False)
    assert again["dataset_sharpness"] == pytest.approx(record["dataset_sharpness"], rel=REL)  # the same subset
    assert "dataset_sharpness" not in probe_now(prober, learner, batch, full=False)  # no dataset: nothing


def test_dataset_index_is_a_seeded_subset():
    np.testing.assert_array_equal(readings.dataset_index(10, 0, 1), np.arange(10))
    np.testing.assert_array_equal(readings.dataset_index(10, 20, 1), np.arange(10))
    a, b = readings.dataset_index(1000, 50, 3), readings.dataset_index(1000, 50, 3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, readings.dataset_index(1000, 50, 4))


def test_new_probe_keys_are_validated():
    from conftest import CONFIGS
    from eosrl.launch.config import ConfigError, load_config
    config = load_config(CONFIGS / "dqn_cartpole.yaml")
    assert (config.probe.gauss_newton_every, config.probe.layer_every, config.probe.dataset_every,
            config.probe.dataset_transitions) == (0, 0, 0, 0)  # all off by default
    for key in ("gauss_newton_every", "layer_every", "dataset_every", "dataset_transitions"):
        with pytest.raises(ConfigError, match=f"probe.{key}: must be >= 0"):
            load_config(CONFIGS / "dqn_cartpole.yaml", [f"probe.{key}=-1"])
    with pytest.raises(ConfigError, match="probe.layer_every: 150 is not a multiple"):
        load_config(CONFIGS / "dqn_cartpole.yaml", ["probe.every=100", "probe.layer_every=150"])
