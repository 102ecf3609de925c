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

from eosrl.agents import eigensolvers, networks, preconditioning, probes
from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
from eosrl.agents.learner import Learner, Transition
from eosrl.agents.thresholds import is_adaptive, stability_threshold
from benchmarks import eos_supervised

OBS_SHAPE = (4,)
NUM_ACTIONS = 3
BATCH = 64
REL_TOL = 1e-3          # acceptance criterion for eigenvalues
ITERATIONS = 60         # most solver iterations: well below dim (139 DQN, 409 C51 and QR-DQN)
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
    agent = AgentConfig(kind=kind, hidden_sizes=[8, 8], num_atoms=11, v_min=-5.0, v_max=5.0, num_quantiles=11,
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


def probe_now(prober: probes.Prober, learner: Learner, batch: Transition, sharpness_batches=None) -> dict:
    """A probe of the learner's current state, as the learner loop makes it."""
    return prober.probe(prober.snapshot(learner.state, learner.current_lr(), 0), batch, sharpness_batches)


def top_k_desc(matrix: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.eigvalsh(matrix)[::-1][:k]


def assert_rel_close(actual, expected, rel=REL_TOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected) / np.abs(expected)
    assert np.all(err < rel), f"relative errors {err} (actual {actual}, expected {expected})"


# ----------------------------------------------------------------------------
# Unpreconditioned probes (SGD), DQN, C51 and QR-DQN: one probe each, shared by tests.


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
        self.prober = probes.Prober(self.config, self.learner.agent, self.learner.loss_fn,
                                    self.learner.network)
        self.record = probe_now(self.prober, self.learner, self.batch)
        self.hessian = dense_hessian(self.learner, self.batch)


@functools.lru_cache(maxsize=None)
def get_case(kind: str) -> Case:
    return Case(kind)


@pytest.fixture(params=["dqn", "c51", "qrdqn"])
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
        return learner.network.agent_kind.q_values(out)[0]

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
    off = probes.Prober(ProbeConfig(enabled=False, every=10), case.learner.agent, case.learner.loss_fn,
                        case.learner.network)
    assert not off.should_probe(10)


@pytest.mark.slow  # several seconds of compilation and dense eigendecompositions
def test_lanczos_method_matches_dense():
    dqn = get_case("dqn")
    prober = probes.Prober(ProbeConfig(enabled=True, method="lanczos", num_eigs=3, iterations=ITERATIONS,
                                       smallest=True),
                           dqn.learner.agent, dqn.learner.loss_fn, dqn.learner.network)
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
                                                 tolerance=TOLERANCE), learner.agent, learner.loss_fn, learner.network),
                       learner, batch)
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
                                     learner.agent, learner.loss_fn, learner.network), learner, batch)
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
                                     learner.agent, learner.loss_fn, learner.network), learner, batch)
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
    assert preconditioning.diagonal_preconditioner(sgd.init(params), OptimizerConfig(name="sgd")) is None
    # Centred RMSProp: √(ν − μ² + ε).
    opt = OptimizerConfig(name="rmsprop", centered=True, decay=0.9, eps=1e-8)
    rms = optax.rmsprop(0.1, decay=0.9, eps=1e-8, centered=True)
    state = rms.update(grads, rms.init(params), params)[1]
    g = np.asarray(grads["w"])
    mu, nu = 0.1 * g, 0.1 * g ** 2
    np.testing.assert_allclose(preconditioning.diagonal_preconditioner(state, opt)["w"],
                               np.sqrt(nu - mu ** 2 + 1e-8), rtol=1e-6)
    # Adam: the preconditioner reproduces optax's actual update, η P⁻¹ μ.
    opt = OptimizerConfig(name="adam", b1=0.9, b2=0.999, eps=1e-8)
    adam = optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8)
    state = adam.init(params)
    for _ in range(3):
        updates, state = adam.update(grads, state, params)
    p = preconditioning.diagonal_preconditioner(state, opt)["w"]
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
    solve = jax.jit(lambda params, precond: probes.top_eigenvalues(loss, params, 3, 30, jax.random.PRNGKey(0),
                                                                   precond, smallest=True))
    out = solve(params, {"x": jnp.asarray(p, jnp.float32)})
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
# Batch sharpness (Andreyev & Beneventano, 2024) against dense batch Hessians.


def dense_batch_sharpness(learner: Learner, batches, scale: np.ndarray):
    """Per batch, in the step's geometry A = D^½ H D^½ (scale = D^½): uᵀAu/‖u‖² with
    u = D^½ g, and λ_max(A), from the full gradient and Hessian of each batch's loss."""
    s = learner.state
    flat, unravel = ravel_pytree(s.params)

    def loss(x, batch):
        return learner.loss_fn(unravel(x), s.target_params, s.net_state, s.target_net_state, batch, False)[0]

    grad_and_hessian = jax.jit(lambda x, batch: (jax.grad(loss)(x, batch), jax.hessian(loss)(x, batch)))
    step, top = [], []
    for batch in batches:
        g, h = (np.asarray(v, np.float64) for v in grad_and_hessian(flat, batch))
        a = scale[:, None] * (0.5 * (h + h.T)) * scale[None, :]
        u = scale * g
        step.append(u @ a @ u / (u @ u))
        top.append(np.linalg.eigvalsh(a)[-1])
    return np.array(step), np.array(top)


SHARPNESS_CASES = {
    # SGD with heavy-ball momentum: D = 1, the paper's gᵀHg/‖g‖².
    "sgd": ("dqn", OptimizerConfig(name="sgd", lr=0.01, momentum=0.9), "lobpcg"),
    # Adam: D = P⁻¹ from the moments after 5 updates.
    "adam": ("dqn", OptimizerConfig(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8), "lobpcg"),
    # RMSProp on C51, with the Lanczos path.
    "rmsprop": ("c51", OptimizerConfig(name="rmsprop", lr=1e-3, decay=0.95, eps=1e-8), "lanczos"),
}


@pytest.mark.parametrize("name", list(SHARPNESS_CASES))
def test_batch_sharpness_matches_dense(name):
    kind, opt, method = SHARPNESS_CASES[name]
    batch = make_batch(0)
    learner = make_learner(kind, opt, 5, batch)
    prober = probes.Prober(ProbeConfig(enabled=True, num_eigs=2, method=method, iterations=ITERATIONS,
                                       tolerance=TOLERANCE, batch_sharpness_batches=3),
                           learner.agent, learner.loss_fn, learner.network)
    batches = [make_batch(seed) for seed in (1, 2, 3)]
    record = probe_now(prober, learner, batch, batches)

    flat = ravel_pytree(learner.state.params)[0]
    precond = preconditioning.diagonal_preconditioner(learner.state.opt_state, opt)
    scale = (np.ones(flat.shape[0]) if precond is None
             else 1.0 / np.sqrt(np.asarray(ravel_pytree(precond)[0], np.float64)))
    step, top = dense_batch_sharpness(learner, batches, scale)
    if precond is not None:  # the geometry matters here, so the test can tell
        unscaled, _ = dense_batch_sharpness(learner, batches, np.ones_like(scale))
        assert abs(np.mean(unscaled) - np.mean(step)) > 0.1 * np.mean(step)
    assert np.all(step <= top + 1e-9)  # a Rayleigh quotient is at most λ_max

    assert record["batch_sharpness_batches"] == 3 and record["batch_sharpness_batch_size"] == BATCH
    # Measured: relative errors 1e-8 to 3e-7 (float32 HVPs against float64 dense algebra).
    assert_rel_close(record["batch_sharpness"], np.mean(step), rel=1e-5)
    assert_rel_close(record["batch_lambda_max"], np.mean(top), rel=1e-4)
    assert record["batch_lambda_max_converged"] is True
    assert record["batch_lambda_max_residual"] < REL_TOL * np.min(top)
    assert record["batch_sharpness_stderr"] == pytest.approx(np.std(step, ddof=1) / np.sqrt(3), rel=1e-2)
    assert record["batch_lambda_max_stderr"] == pytest.approx(np.std(top, ddof=1) / np.sqrt(3), rel=1e-2)
    threshold = stability_threshold(opt, learner.current_lr())
    assert record["threshold"] == pytest.approx(threshold)
    assert record["batch_sharpness_over_threshold"] == pytest.approx(record["batch_sharpness"] / threshold)
    assert record["batch_lambda_max_over_threshold"] == pytest.approx(record["batch_lambda_max"] / threshold)
    # Per batch: one HVP along u, then the solver's (`lanczos`: its steps and a residual).
    if method == "lanczos":
        assert record["batch_hvps"] == 3 * (1 + ITERATIONS + 1)
    else:
        assert record["batch_hvps"] >= 3 * (1 + 2)
    prober.forget_vectors()  # the same cold start again, without the batches
    plain = probe_now(prober, learner, batch)
    assert "batch_sharpness" not in plain
    assert record["hvps"] == plain["hvps"] + record["batch_hvps"]
    json.dumps(record, allow_nan=False)


def test_batch_sharpness_batches_is_validated():
    from conftest import CONFIGS
    from eosrl.launch.config import ConfigError, load_config
    assert load_config(CONFIGS / "dqn_cartpole.yaml").probe.batch_sharpness_batches == 0  # off by default
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "dqn_cartpole.yaml", ["probe.batch_sharpness_batches=-1"])
    message = str(error.value)
    assert message.endswith("probe.batch_sharpness_batches: must be >= 0, got -1") and "\n" not in message


def test_learner_loop_writes_batch_sharpness_records(tmp_path, figure_axes):
    """An inline run of the learner loop with probe.batch_sharpness_batches: 2: its `probe`
    records carry the new fields, finite, measured on fresh batches of replay.batch_size."""
    from conftest import CONFIGS, random_items
    from eosrl.launch.builder import Builder
    from eosrl.launch.config import load_config
    from eosrl.launch.learning import LearnerLoop
    from eosrl.launch.rundir import MetricsWriter, RunDir, read_metrics
    config = load_config(CONFIGS / "dqn_cartpole.yaml", [
        "probe.enabled=true", "probe.every=3", "probe.batch_size=32", "probe.num_eigs=2", "probe.iterations=10",
        "probe.batch_sharpness_batches=2", "replay.batch_size=16", "agent.hidden_sizes=[16, 16]",
        "agent.optimizer.name=sgd", "agent.optimizer.lr=0.01", "agent.optimizer.momentum=0.9"])
    builder = Builder(config)
    rng = np.random.default_rng(0)
    drawn = []

    def sample_items(n):  # what the probes draw from "replay"
        drawn.append(n)
        return random_items(builder, n, rng)

    rdir = RunDir(tmp_path).create()
    metrics = MetricsWriter(rdir, tensorboard=False)
    loop = LearnerLoop(builder, rdir, metrics, iter(lambda: random_items(builder, 16, rng), None), sample_items=sample_items,
                       env_steps=lambda: 7)
    for _ in range(6):
        assert loop.step() is None
    metrics.close()
    records = list(read_metrics(rdir.metrics, "probe"))
    assert [r["step"] for r in records] == [3, 6]
    # Per probe: the fixed probe batch once (32), then 2 fresh batches of the training size (16).
    assert drawn == [32] + [16, 16] * 2
    for r in records:
        assert r["batch_sharpness_batches"] == 2 and r["batch_sharpness_batch_size"] == 16
        for key in ("batch_sharpness", "batch_sharpness_stderr", "batch_sharpness_over_threshold",
                    "batch_lambda_max", "batch_lambda_max_stderr", "batch_lambda_max_over_threshold",
                    "batch_lambda_max_residual"):
            assert math.isfinite(r[key]), key
        assert r["threshold"] == pytest.approx((2 + 2 * 0.9) / 0.01)
        assert r["batch_sharpness_over_threshold"] == pytest.approx(r["batch_sharpness"] / r["threshold"])
        assert r["batch_sharpness"] <= r["batch_lambda_max"] * (1 + 1e-3)  # means of Rayleigh quotients and maxima
        assert 0 < r["batch_hvps"] < r["hvps"]

    # The sharpness figure draws it beside λ₁: its own colour and line style, in the legend.
    from eosrl.launch import plot
    axes = figure_axes
    assert plot.plot_sharpness({"run": plot.read_metrics(rdir.metrics)}, tmp_path / "sharpness.png") is not None
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert set(lines) == {"run λ₁ (probe batch)", "run batch sharpness", "run threshold"}
    sharpness, batch = lines["run λ₁ (probe batch)"], lines["run batch sharpness"]
    assert batch.get_linestyle() == "-." and sharpness.get_linestyle() == "-"
    assert batch.get_color() != sharpness.get_color()
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == list(lines)


def test_draw_sharpness_batches_samples_the_training_batch_size():
    drawn = []

    def sample_items(n):
        drawn.append(n)
        return {"x": np.full((n,), len(drawn))}

    batches = probes.draw_sharpness_batches(3, 32, sample_items, lambda raw: raw["x"] * 10)
    assert drawn == [32, 32, 32]
    assert [b.tolist() for b in batches] == [[10] * 32, [20] * 32, [30] * 32]


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
