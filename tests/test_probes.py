"""Tests of the Hessian probes against dense references.

Networks are tiny (a few hundred parameters) so the full Hessian can be built
with `jax.hessian` and diagonalised with numpy; the probes only ever use
Hessian-vector products, so agreement here means the matrix-free path is
right. Everything runs in float32, as in training.
"""
from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from eosrl.agents import eigensolvers, networks, probes
from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
from eosrl.agents.learner import Learner, Transition
from eosrl.agents.thresholds import is_adaptive, stability_threshold
from benchmarks import eos_supervised

OBS_SHAPE = (4,)
NUM_ACTIONS = 3
BATCH = 64
REL_TOL = 1e-3          # acceptance criterion for eigenvalues
ITERATIONS = 60         # most solver iterations: well below dim (139 DQN, 409 C51)
TOLERANCE = 1e-4        # residual tolerance of the solver, relative to λ₁
HUTCHINSON_SAMPLES = 4000


def make_batch(seed: int) -> Transition:
    rng = np.random.default_rng(seed)
    return Transition(
        obs=rng.normal(size=(BATCH,) + OBS_SHAPE).astype(np.float32),
        action=rng.integers(0, NUM_ACTIONS, BATCH).astype(np.int32),
        reward=rng.normal(size=BATCH).astype(np.float32),
        discount=(0.99 * (rng.random(BATCH) > 0.1)).astype(np.float32),
        next_obs=rng.normal(size=(BATCH,) + OBS_SHAPE).astype(np.float32))


def make_learner(kind: str, optimizer: OptimizerConfig, updates: int, batch: Transition) -> Learner:
    """A small learner after `updates` real updates on `batch` (so moments are non-zero
    and the target network differs from the online one)."""
    agent = AgentConfig(kind=kind, hidden_sizes=[8, 8], num_atoms=11, v_min=-5.0, v_max=5.0,
                        optimizer=optimizer, target_update_period=7)
    network = networks.make_network(agent, "gym", OBS_SHAPE, NUM_ACTIONS)
    learner = Learner(network, agent, seed=0)
    for _ in range(updates):
        learner.update(batch)
    return learner


def dense_hessian(learner: Learner, batch: Transition) -> np.ndarray:
    s = learner.state
    flat, unravel = ravel_pytree(s.params)

    def loss_of_flat(x):
        return learner.loss_fn(unravel(x), s.target_params, s.net_state, s.target_net_state,
                               batch, False)[0]

    h = np.asarray(jax.jit(jax.hessian(loss_of_flat))(flat), np.float64)
    return 0.5 * (h + h.T)


def probe_now(prober: probes.Prober, learner: Learner, batch: Transition) -> dict:
    """A probe of the learner's current state, as the learner loop makes it."""
    return prober.probe(prober.snapshot(learner.state, learner.current_lr(), 0), batch)


def top_k_desc(matrix: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.eigvalsh(matrix)[::-1][:k]


def assert_rel_close(actual, expected, rel=REL_TOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected) / np.abs(expected)
    assert np.all(err < rel), f"relative errors {err} (actual {actual}, expected {expected})"


# ----------------------------------------------------------------------------
# Unpreconditioned probes (SGD), DQN and C51: one probe each, shared by tests.


class Case:
    def __init__(self, kind: str):
        self.batch = make_batch(0)
        # Linear schedule 0.01 → 0 over 40 updates, probed after 20: lr = 0.005.
        opt = OptimizerConfig(name="sgd", lr=0.01, lr_schedule="linear", lr_end=0.0,
                              lr_decay_updates=40)
        self.learner = make_learner(kind, opt, 20, self.batch)
        self.config = ProbeConfig(enabled=True, every=10, num_eigs=5, iterations=ITERATIONS,
                                  tolerance=TOLERANCE, smallest=True, trace_every=10,
                                  hutchinson_samples=HUTCHINSON_SAMPLES, geometric_complexity_every=10)
        self.prober = probes.Prober(self.config, self.learner)
        self.record = probe_now(self.prober, self.learner, self.batch)
        self.hessian = dense_hessian(self.learner, self.batch)


@functools.lru_cache(maxsize=None)
def get_case(kind: str) -> Case:
    return Case(kind)


@pytest.fixture(params=["dqn", "c51"])
def case(request):
    return get_case(request.param)


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_top_eigenvalues_match_dense(case):
    expected = top_k_desc(case.hessian, 5)
    assert expected[0] > 0
    record = case.record
    assert record["kind"] == "probe" and record["step"] == 20
    assert record["preconditioned"] is False
    assert len(record["eigenvalues"]) == 5
    assert record["eigenvalues"] == sorted(record["eigenvalues"], reverse=True)
    assert_rel_close(record["eigenvalues"], expected)
    assert record["sharpness"] == record["eigenvalues"][0]
    # Converged pairs have small residuals (‖Hv − λv‖ ≥ distance to the spectrum).
    assert max(record["residuals"]) < REL_TOL * expected[0]


def test_smallest_eigenvalue_matches_dense(case):
    expected = np.linalg.eigvalsh(case.hessian)[0]
    assert expected < 0  # a ReLU TD loss has negative curvature
    assert_rel_close(case.record["lambda_min"], expected)
    assert case.record["lambda_min_residual"] < REL_TOL * abs(expected)


def test_hutchinson_trace_within_five_percent(case):
    h = case.hessian
    trace = np.trace(h)
    assert trace > 0.5 * np.abs(np.linalg.eigvalsh(h)).max()  # not near zero
    # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z: make sure 5% is ≥ 3 standard
    # errors, so passing is not luck of the seed.
    off_diagonal = np.sum(h ** 2) - np.sum(np.diag(h) ** 2)
    stderr = math.sqrt(2 * off_diagonal / HUTCHINSON_SAMPLES)
    assert 0.05 * trace >= 3 * stderr
    assert abs(case.record["trace"] - trace) <= 0.05 * trace
    assert case.record["trace_stderr"] == pytest.approx(stderr, rel=0.2)


def test_geometric_complexity_matches_dense_jacobian(case):
    learner, batch = case.learner, case.batch
    params, net_state = learner.acting_params()

    def q_single(x):
        out, _ = learner.network.apply(params, net_state, x[None], False)
        return networks.q_values(learner.network, out)[0]

    jac = jax.vmap(jax.jacrev(q_single))(jnp.asarray(batch.obs))   # [B, A, 4]
    expected = float(jnp.sum(jac ** 2)) / BATCH
    assert case.record["geometric_complexity"] == pytest.approx(expected, rel=1e-4)


def test_grad_and_param_norms(case):
    s, batch = case.learner.state, case.batch
    grads = jax.grad(lambda p: case.learner.loss_fn(p, s.target_params, s.net_state,
                                                    s.target_net_state, batch, False)[0])(s.params)
    assert case.record["grad_norm"] == pytest.approx(float(optax.global_norm(grads)), rel=1e-4)
    assert case.record["param_norm"] == pytest.approx(float(optax.global_norm(s.params)), rel=1e-5)


def test_record_threshold_follows_the_schedule(case):
    # Half-way through the linear decay from 0.01: η = 0.005, SGD threshold 2/η = 400.
    assert case.learner.current_lr() == pytest.approx(0.005)
    assert case.record["lr"] == pytest.approx(0.005)
    assert case.record["threshold"] == pytest.approx(400.0)
    assert case.record["sharpness_over_threshold"] == pytest.approx(
        case.record["sharpness"] / 400.0)
    assert case.record["seconds"] > 0
    json.dumps(case.record, allow_nan=False)  # JSON-ready


def test_should_probe(case):
    prober = case.prober
    assert [s for s in range(35) if prober.should_probe(s)] == [10, 20, 30]
    off = probes.Prober(ProbeConfig(enabled=False, every=10), case.learner)
    assert not off.should_probe(10)


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_lanczos_method_matches_dense():
    dqn = get_case("dqn")
    prober = probes.Prober(ProbeConfig(enabled=True, method="lanczos", num_eigs=3, iterations=ITERATIONS,
                                       smallest=True), dqn.learner)
    record = probe_now(prober, dqn.learner, dqn.batch)
    assert record["method"] == "lanczos" and record["warm_start"] is False
    assert_rel_close(record["eigenvalues"], top_k_desc(dqn.hessian, 3))
    assert_rel_close(record["lambda_min"], np.linalg.eigvalsh(dqn.hessian)[0])
    assert record["hvps"] == ITERATIONS + 3 + 1  # the steps, then one residual per reported pair and λ_min


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_scale_lr_probe_measures_the_scaled_step():
    """With agent.spectral_norm.scale_lr each SN layer's step is divided by max(1, σ):
    the update sees S^½ H S^½, not H, and the probe measures that."""
    batch = make_batch(0)
    agent = AgentConfig(kind="dqn", hidden_sizes=[8, 8], optimizer=OptimizerConfig(name="sgd", lr=0.01),
                        target_update_period=7)
    agent.spectral_norm.layers, agent.spectral_norm.mode, agent.spectral_norm.scale_lr = "-2", "log", True
    network = networks.make_network(agent, "gym", OBS_SHAPE, NUM_ACTIONS)
    learner = Learner(network, agent, seed=0)
    learner.state = learner.state._replace(params=jax.tree_util.tree_map(lambda w: 3.0 * w, learner.state.params))
    for _ in range(3):
        learner.update(batch)
    sigma = float(learner.state.net_state["dense_1"]["sigma"])
    assert sigma > 1.5  # the scaling is not a no-op
    ones = jax.tree_util.tree_map(jnp.ones_like, learner.state.params)
    scale = np.asarray(ravel_pytree({**ones, "dense_1": jax.tree_util.tree_map(lambda x: x / sigma, ones["dense_1"])})[0])
    hessian = dense_hessian(learner, batch)
    scaled = np.sqrt(scale)[:, None] * hessian * np.sqrt(scale)[None, :]
    record = probe_now(probes.Prober(ProbeConfig(enabled=True, num_eigs=3, iterations=ITERATIONS,
                                                 tolerance=TOLERANCE), learner), learner, batch)
    assert record["operator"] == "S H"
    assert_rel_close(record["eigenvalues"], top_k_desc(scaled, 3))
    assert_rel_close(record["raw_sharpness"], top_k_desc(hessian, 1)[0])
    assert record["sharpness"] < 0.9 * record["raw_sharpness"]


# ----------------------------------------------------------------------------
# Preconditioned probes (adaptive optimisers).


def preconditioned_dense(hessian: np.ndarray, p: np.ndarray) -> np.ndarray:
    d = 1.0 / np.sqrt(p)
    return d[:, None] * hessian * d[None, :]


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_adam_preconditioned_sharpness_with_clipping():
    batch = make_batch(0)
    opt = OptimizerConfig(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)
    learner = make_learner("dqn", opt, 5, batch)
    record = probe_now(probes.Prober(ProbeConfig(enabled=True, iterations=ITERATIONS, tolerance=TOLERANCE),
                                     learner), learner, batch)
    # chain(clip, adam): the Adam state is the first element of the second link.
    adam = learner.state.opt_state[1][0]
    assert isinstance(adam, optax.ScaleByAdamState) and int(adam.count) == 5
    nu, _ = ravel_pytree(adam.nu)
    t = 5
    p = (1 - 0.9 ** t) * (np.sqrt(np.asarray(nu, np.float64) / (1 - 0.999 ** t)) + 1e-8)
    hessian = dense_hessian(learner, batch)
    assert record["preconditioned"] is True
    assert_rel_close(record["eigenvalues"], top_k_desc(preconditioned_dense(hessian, p), 5))
    assert_rel_close(record["raw_sharpness"], top_k_desc(hessian, 1)[0])
    assert record["sharpness"] == record["eigenvalues"][0]
    assert record["threshold"] == pytest.approx(38.0 / 1e-3)


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_rmsprop_preconditioned_sharpness_c51():
    batch = make_batch(0)
    opt = OptimizerConfig(name="rmsprop", lr=1e-3, decay=0.95, eps=1e-8)
    learner = make_learner("c51", opt, 5, batch)
    record = probe_now(probes.Prober(ProbeConfig(enabled=True, iterations=ITERATIONS, tolerance=TOLERANCE),
                                     learner), learner, batch)
    rms = learner.state.opt_state[0]
    assert isinstance(rms, optax.ScaleByRmsState)
    nu, _ = ravel_pytree(rms.nu)
    # optax.rmsprop's default eps_in_sqrt=True: the denominator is √(ν + ε).
    p = np.sqrt(np.asarray(nu, np.float64) + 1e-8)
    hessian = dense_hessian(learner, batch)
    assert_rel_close(record["eigenvalues"], top_k_desc(preconditioned_dense(hessian, p), 5))
    assert_rel_close(record["raw_sharpness"], top_k_desc(hessian, 1)[0])
    assert record["threshold"] == pytest.approx(2.0 / 1e-3)


def test_diagonal_preconditioner_reads_optax_states():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    # SGD (with momentum) has no preconditioner.
    sgd = optax.sgd(0.1, momentum=0.9)
    assert probes.diagonal_preconditioner(sgd.init(params), OptimizerConfig(name="sgd")) is None
    # Centred RMSProp: √(ν − μ² + ε).
    opt = OptimizerConfig(name="rmsprop", centered=True, decay=0.9, eps=1e-8)
    rms = optax.rmsprop(0.1, decay=0.9, eps=1e-8, centered=True)
    state = rms.update(grads, rms.init(params), params)[1]
    g = np.asarray(grads["w"])
    mu, nu = 0.1 * g, 0.1 * g ** 2
    np.testing.assert_allclose(probes.diagonal_preconditioner(state, opt)["w"],
                               np.sqrt(nu - mu ** 2 + 1e-8), rtol=1e-6)
    # Adam: the preconditioner reproduces optax's actual update, η P⁻¹ μ.
    opt = OptimizerConfig(name="adam", b1=0.9, b2=0.999, eps=1e-8)
    adam = optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8)
    state = adam.init(params)
    for _ in range(3):
        updates, state = adam.update(grads, state, params)
    p = probes.diagonal_preconditioner(state, opt)["w"]
    np.testing.assert_allclose(updates["w"], -0.1 * state[0].mu["w"] / p, rtol=1e-5)


def test_top_eigenvalues_generic_with_preconditioner():
    """The learner-free entry point on an explicit quadratic ½xᵀAx."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    a = (q * np.linspace(-1.0, 10.0, 30)) @ q.T
    p = rng.uniform(0.5, 2.0, size=30)

    def loss(params):
        x = params["x"]
        return 0.5 * x @ jnp.asarray(a, jnp.float32) @ x

    params = {"x": jnp.zeros(30)}
    # (The unpreconditioned path is exercised by the supervised EoS test below.)
    out = probes.top_eigenvalues(loss, params, 3, 30, jax.random.PRNGKey(0), smallest=True,
                                 precond={"x": jnp.asarray(p, jnp.float32)})
    expected = np.linalg.eigvalsh(preconditioned_dense(a, p))
    assert_rel_close(out["values"], expected[::-1][:3])
    assert_rel_close(out["lambda_min"], expected[0])


def test_lanczos_residuals_are_real_and_bound_the_error():
    """With too few iterations the Ritz values are off; the reported residual
    must then be large and bound the distance to the true eigenvalue."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    eigs = np.concatenate([[10.0, 9.5, 9.0], rng.uniform(0, 8.5, 197)])
    a = jnp.asarray((q * eigs) @ q.T, jnp.float32)
    matvec = lambda v: a @ v
    few = jax.jit(lambda k: eigensolvers.lanczos_eigenpairs(matvec, 200, 3, 6, k, 1e-3))(jax.random.PRNGKey(0))
    true_top = np.sort(eigs)[::-1][:3]
    vectors = np.asarray(few["vectors"])
    dense_res = np.linalg.norm(vectors @ np.asarray(a) - few["values"][:, None] * vectors, axis=1)
    np.testing.assert_allclose(few["residuals"], dense_res, rtol=1e-3, atol=1e-5)
    assert few["residuals"][0] > 1e-2 and not few["converged"][0]  # flagged, not passed off
    # Weyl/Bauer-Fike for symmetric matrices: some eigenvalue lies within the residual.
    for value, res in zip(np.asarray(few["values"]), np.asarray(few["residuals"])):
        assert np.min(np.abs(eigs - value)) <= res + 1e-5
    many = jax.jit(lambda k: eigensolvers.lanczos_eigenpairs(matvec, 200, 3, 60, k, 1e-3))(jax.random.PRNGKey(0))
    assert_rel_close(many["values"], true_top, rel=1e-5)
    assert np.max(many["residuals"]) < 1e-3 and np.all(many["converged"])


def test_lanczos_survives_an_exhausted_krylov_space():
    """A rank-2 matrix: the Krylov space is invariant after 2-3 steps; the
    restart must keep the basis orthonormal instead of dividing by β ≈ 0."""
    u = np.linalg.qr(np.random.default_rng(5).normal(size=(50, 2)))[0]
    a = jnp.asarray((u * np.array([3.0, 1.0])) @ u.T, jnp.float32)
    values, vectors = jax.jit(lambda k: eigensolvers.lanczos(lambda v: a @ v, 50, 20, k))(
        jax.random.PRNGKey(0))
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values[:2], [3.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(values[2:], 0.0, atol=1e-5)
    gram = np.asarray(vectors @ vectors.T)
    np.testing.assert_allclose(gram, np.eye(20), atol=1e-4)


# ----------------------------------------------------------------------------
# Thresholds.


@pytest.mark.parametrize("opt, lr, expected", [
    (OptimizerConfig(name="sgd"), 0.1, 20.0),
    (OptimizerConfig(name="sgd", momentum=0.9), 0.1, 38.0),                      # (2+2β)/η
    (OptimizerConfig(name="sgd", momentum=0.9, nesterov=True), 0.1, 3.8 / 0.28),  # (2+2β)/((1+2β)η)
    (OptimizerConfig(name="rmsprop"), 0.1, 20.0),
    (OptimizerConfig(name="adam", b1=0.9), 0.1, 380.0),                          # 38/η
    (OptimizerConfig(name="adam", b1=0.5), 0.1, 60.0),                           # 3/(0.5η)
])
def test_stability_thresholds_match_the_table(opt, lr, expected):
    assert stability_threshold(opt, lr) == pytest.approx(expected)
    assert is_adaptive(opt) == (opt.name in ("rmsprop", "adam"))


def test_threshold_unbounded_at_zero_lr():
    assert stability_threshold(OptimizerConfig(name="sgd"), 0.0) == math.inf


# ----------------------------------------------------------------------------
# Edge of stability in supervised learning, through the same probe code.


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_full_batch_gd_reaches_and_hovers_at_two_over_eta():
    result = eos_supervised.run(steps=2000, lr=0.1, probe_every=25, last_fraction=0.3,
                                verbose=False, plot_path=None)
    assert result["initial_ratio"] < 0.5                  # progressive sharpening from below
    assert result["last_part_probes"] >= 20
    assert result["last_part_within_fraction"] == 1.0     # every late probe within ±10% of 2/η
    assert abs(result["last_part_mean_ratio"] - 1.0) < 0.05
