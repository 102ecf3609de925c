"""Readings of the step beside λ₁ (agents/step_readings.py, in agents/probes.py), each
against an analytic reference on quadratic losses, whose Hessians, gradients and
eigenvectors are known in closed form: the overlap of the top eigenvectors of two
probes, the projection of the last update on v₁, and the momentum batch sharpness."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eosrl.agents import probes, step_readings
from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
from eosrl.agents.types import LearnerState

DIM = 6
EIGENVALUES = np.array([5.0, 1.0, 0.5, 0.3, 0.2, 0.1])


def quadratic_loss(params, target_params, net_state, target_net_state, batch, update_sn=False):
    """½(w − c)ᵀH(w − c), H and c carried by the "batch"; the TD loss's signature."""
    r = params["w"] - batch["c"]
    return 0.5 * r @ batch["h"] @ r, (net_state, jnp.zeros(()))


def rotated(angle: float) -> np.ndarray:
    """H(α) = R(α) diag(EIGENVALUES) R(α)ᵀ, R a rotation by α in the plane of the first two
    axes: its top eigenvector is (cos α, sin α, 0, …)."""
    r = np.eye(DIM)
    r[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return (r * EIGENVALUES) @ r.T


def make_prober(opt: OptimizerConfig, **config) -> probes.Prober:
    config = ProbeConfig(enabled=True, num_eigs=1, iterations=50, tolerance=1e-6, **config)
    prober = probes.Prober(config, AgentConfig(optimizer=opt), quadratic_loss, network=None)
    # The curvature readings (agents/readings.py) read a Q-network's outputs: none here.
    prober._add_readings = lambda *args, **kwargs: None
    return prober


def snapshot(w, **fields) -> probes.ProbeSnapshot:
    params = {"w": jnp.asarray(w, jnp.float32)}
    return probes.ProbeSnapshot(params, params, {}, {}, step=fields.pop("step", 1), lr=0.1, **fields)


def batch_of(h, c=None):
    return {"h": jnp.asarray(h, jnp.float32), "c": jnp.zeros(DIM, jnp.float32) if c is None else jnp.asarray(c, jnp.float32)}


@pytest.mark.parametrize("method", ["lobpcg", "lanczos"])
def test_v1_overlap_is_the_cosine_of_the_rotation(method):
    """Probes of H(α_t) for a turning α: |⟨v₁(t), v₁(t−1)⟩| = |cos(α_t − α_{t−1})|."""
    prober = make_prober(OptimizerConfig(name="sgd", lr=0.1), method=method)
    angles = [0.0, 0.3, 1.0, 2.5, 2.5]
    records = [prober.probe(snapshot(np.ones(DIM), step=i + 1), batch_of(rotated(a))) for i, a in enumerate(angles)]
    assert "v1_overlap" not in records[0]  # no previous probe
    assert "update_projection_v1" not in records[0]  # no Δθ kept
    for record, before, now in zip(records[1:], angles, angles[1:]):
        assert record["sharpness"] == pytest.approx(5.0, rel=1e-5)
        assert record["v1_overlap"] == pytest.approx(abs(np.cos(now - before)), abs=1e-4)
    prober.forget_vectors()  # a restart: nothing to compare with
    assert "v1_overlap" not in prober.probe(snapshot(np.ones(DIM), step=9), batch_of(rotated(0.0)))


def test_update_projection_on_v1_and_its_sign_from_update_to_update():
    """⟨Δθ, v₁⟩ and its cosine for a known Δθ; v₁'s sign continues the last probe's, so an
    update and its reverse (period 2 at the edge) project with opposite signs."""
    prober = make_prober(OptimizerConfig(name="sgd", lr=0.1))
    h, v1 = batch_of(rotated(0.4)), np.array([np.cos(0.4), np.sin(0.4), 0, 0, 0, 0])
    delta = np.array([0.3, -0.2, 0.1, 0.0, 0.5, -0.1], np.float32)
    first = prober.probe(snapshot(np.ones(DIM), last_update=jnp.asarray(delta)), h)
    second = prober.probe(snapshot(np.ones(DIM), step=2, last_update=jnp.asarray(-delta)), h)
    expected = delta @ v1
    assert abs(first["update_projection_v1"]) == pytest.approx(abs(expected), abs=1e-5)
    assert first["update_projection_v1_cosine"] == pytest.approx(first["update_projection_v1"] / np.linalg.norm(delta),
                                                                 rel=1e-5)
    assert second["update_projection_v1"] == pytest.approx(-first["update_projection_v1"], abs=1e-6)
    assert second["v1_overlap"] == pytest.approx(1.0, abs=1e-6)


def test_update_projection_in_the_scaled_geometry():
    """With a step scaling D^½ (Adam, SN) v₁ is that of D^½HD^½ and Δθ is read as D^{-½}Δθ."""
    prober = make_prober(OptimizerConfig(name="sgd", lr=0.1))
    h = rotated(0.7)
    scale = np.array([1.0, 0.5, 2.0, 1.0, 0.8, 1.2])
    a = scale[:, None] * h * scale[None, :]
    values, vectors = np.linalg.eigh(a)
    delta = np.array([0.3, -0.2, 0.1, 0.4, 0.5, -0.1])
    record = prober.probe(snapshot(np.ones(DIM), step_scaling=jnp.asarray(scale, jnp.float32),
                                   last_update=jnp.asarray(delta, jnp.float32)), batch_of(h))
    phi = delta / scale
    assert record["sharpness"] == pytest.approx(values[-1], rel=1e-5)
    assert abs(record["update_projection_v1"]) == pytest.approx(abs(phi @ vectors[:, -1]), abs=1e-5)
    assert abs(record["update_projection_v1_cosine"]) == pytest.approx(abs(phi @ vectors[:, -1]) / np.linalg.norm(phi),
                                                                       abs=1e-5)


def test_orient_and_projection_helpers():
    v, overlap = step_readings.orient(jnp.array([0.0, 2.0]), jnp.array([0.6, -0.8]))
    np.testing.assert_allclose(v, [-0.6, 0.8], atol=1e-7)
    assert float(overlap) == pytest.approx(0.8)
    projection, cosine = step_readings.update_projection(jnp.zeros(2), v, None)
    assert float(projection) == 0.0 and float(cosine) == 0.0  # no change


# ----------------------------------------------------------------------------
# The momentum batch sharpness.

MOMENTUM_CASES = {
    # (optimiser, step direction s up to a positive factor, from m, g and D = scale²)
    "heavy_ball": (OptimizerConfig(name="sgd", lr=0.1, momentum=0.9), lambda m, g, d: 0.9 * m + g),
    "nesterov": (OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True),
                 lambda m, g, d: g + 0.9 * (0.9 * m + g)),
    "rule": (OptimizerConfig(name="sgd", lr=0.1, momentum=0.5, step_size_rule="corridor"),
             lambda m, g, d: 0.5 * m + 0.1 * g),  # η_t-scaled trace, η_t = the snapshot's lr
    "adam": (OptimizerConfig(name="adam", lr=1e-3, b1=0.8), lambda m, g, d: d * (0.8 * m + 0.2 * g)),
}


@pytest.mark.parametrize("name", list(MOMENTUM_CASES))
def test_momentum_batch_sharpness_is_the_closed_form(name):
    """Batches B with known H_B and c_B (g_B = H_B(θ − c_B)), a known buffer m: the record's
    `momentum_batch_sharpness` is the mean of sᵀH_Bs/sᵀg_B over the batches."""
    opt, direction = MOMENTUM_CASES[name]
    rng = np.random.default_rng(0)
    theta, m = rng.normal(size=DIM), rng.normal(size=DIM)
    scale = rng.uniform(0.5, 1.5, DIM) if name == "adam" else None
    batches, expected = [], []
    for _ in range(3):
        q = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
        h, c = (q * rng.uniform(0.1, 4.0, DIM)) @ q.T, rng.normal(size=DIM)
        g = h @ (theta - c)
        s = direction(m, g, None if scale is None else scale ** 2)
        batches.append(batch_of(h, c))
        expected.append(s @ h @ s / (s @ g))
    prober = make_prober(opt, batch_sharpness_batches=3, method="lanczos")  # compiles faster than lobpcg
    snap = snapshot(theta, momentum=jnp.asarray(m, jnp.float32),
                    step_scaling=None if scale is None else jnp.asarray(scale, jnp.float32))
    record = prober.probe(snap, batches[0], batches)
    assert record["momentum_batch_sharpness"] == pytest.approx(np.mean(expected), rel=1e-4)
    assert record["momentum_batch_sharpness_stderr"] == pytest.approx(np.std(expected, ddof=1) / np.sqrt(3), rel=1e-3)
    assert record["momentum_batch_sharpness_over_threshold"] == pytest.approx(
        record["momentum_batch_sharpness"] / record["threshold"])
    if name != "heavy_ball":
        return
    # Without a buffer (plain SGD, RMSProp) the fields are absent and an HVP per batch is saved.
    plain = make_prober(opt, batch_sharpness_batches=3, method="lanczos").probe(snap._replace(momentum=None), batches[0], batches)
    assert "momentum_batch_sharpness" not in plain and plain["batch_hvps"] == record["batch_hvps"] - 3


def test_momentum_buffer_is_read_from_the_optax_state():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    grads = jax.tree_util.tree_map(lambda x: 0.5 * x, params)

    def after_one_update(opt):
        state = opt.init(params)
        return opt.update(grads, state, params)[1]

    trace = step_readings.momentum_buffer(after_one_update(optax.sgd(0.1, momentum=0.9)))
    np.testing.assert_allclose(trace["a"], 0.5)  # m ← βm + g from 0
    clipped = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3, b1=0.9))
    np.testing.assert_allclose(step_readings.momentum_buffer(after_one_update(clipped))["b"], 0.05)  # (1−β₁)g
    assert step_readings.momentum_buffer(after_one_update(optax.sgd(0.1))) is None
    assert step_readings.momentum_buffer(after_one_update(optax.rmsprop(1e-3))) is None
    assert step_readings.momentum_buffer(after_one_update(optax.rmsprop(1e-3, centered=True))) is None

    # The snapshot carries it flat, and Δθ from the parameters before the update.
    prober = make_prober(OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
    opt = optax.sgd(0.1, momentum=0.9)
    state = LearnerState(params, params, {}, {}, opt.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    updates, opt_state = opt.update(grads, state.opt_state, params)
    new = state._replace(params=optax.apply_updates(params, updates), opt_state=opt_state)
    snap = prober.snapshot(new, 0.1, 0, previous_params=params)
    np.testing.assert_allclose(snap.momentum, np.full(7, 0.5))
    np.testing.assert_allclose(snap.last_update, np.full(7, -0.05), rtol=1e-5)
    assert prober.snapshot(new, 0.1, 0).last_update is None
